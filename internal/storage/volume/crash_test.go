package volume

const crashEnv = "GROW_VOLUME_CRASH_CHILD"

func crashChild() {}
