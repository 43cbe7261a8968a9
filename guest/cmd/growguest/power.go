package main

import (
	"encoding/binary"
	"os"
	"os/exec"
	"path/filepath"
	"time"
)

// watchPowerButton powers the guest off when the ACPI power button is pressed
// (QMP system_powerdown), so that hosts can stop it cleanly.
func watchPowerButton() {
	seen := map[string]bool{}
	for range 20 {
		devs, _ := filepath.Glob("/dev/input/event*")
		for _, d := range devs {
			if seen[d] {
				continue
			}
			seen[d] = true
			go readEvents(d)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

func readEvents(dev string) {
	f, err := os.Open(dev)
	if err != nil {
		return
	}
	defer f.Close()
	// struct input_event on 64-bit: timeval (16 bytes), type u16, code u16, value s32.
	var ev [24]byte
	for {
		if _, err := f.Read(ev[:]); err != nil {
			return
		}
		typ := binary.LittleEndian.Uint16(ev[16:])
		code := binary.LittleEndian.Uint16(ev[18:])
		val := int32(binary.LittleEndian.Uint32(ev[20:]))
		const evKey, keyPower = 1, 116
		if typ == evKey && code == keyPower && val == 1 {
			out.printf("GROW-POWEROFF power button")
			_ = exec.Command("poweroff").Run()
			return
		}
	}
}
