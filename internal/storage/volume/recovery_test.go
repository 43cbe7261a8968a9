package volume

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/growserver/grow/internal/storage/dev"
)

func journalPath(t *testing.T, dir string) string {
	t.Helper()
	l, _ := filepath.Glob(filepath.Join(dir, "journal.*"))
	if len(l) != 1 {
		t.Fatalf("want one journal, have %v", l)
	}
	return l[0]
}

// writeSome creates a volume with a few flushed writes and closes without a checkpoint,
// so the state lives in the journal.
func writeSome(t *testing.T, b *bed) []byte {
	t.Helper()
	if _, err := b.m.Create("v", MiB); err != nil {
		t.Fatal(err)
	}
	h := mustOpen(t, b.m, "v")
	want := make([]byte, MiB)
	for i := int64(0); i < 4; i++ {
		p := pattern(ClusterSize, byte(i+1))
		if err := h.WriteAt(p, i*3*ClusterSize, false); err != nil {
			t.Fatal(err)
		}
		copy(want[i*3*ClusterSize:], p)
		if err := h.Flush(); err != nil {
			t.Fatal(err)
		}
	}
	h.Close()
	b.m.opts.NoCheckpointOnClose = true
	if err := b.m.Close(); err != nil {
		t.Fatal(err)
	}
	b.dev.Close()
	b.m, b.dev = nil, nil
	return want
}

func TestTornJournalTailIsDropped(t *testing.T) {
	for name, tail := range map[string][]byte{
		"half header":  {9, 0, 0},
		"short record": {40, 0, 0, 0, 1, 2, 3, 4, recMap, 1},
		"zeroes":       make([]byte, 4096),
	} {
		t.Run(name, func(t *testing.T) {
			b := newBed(t, 16*MiB)
			want := writeSome(t, b)
			jp := journalPath(t, b.dir)
			before, _ := os.ReadFile(jp)
			os.WriteFile(jp, append(before, tail...), 0o600)
			b.open()
			b.check()
			h := mustOpen(t, b.m, "v")
			mustEqual(t, "after torn tail", readAll(t, h), want)
			after, _ := os.ReadFile(journalPath(t, b.dir))
			if !bytes.HasPrefix(after, before) {
				t.Fatal("good journal records were lost")
			}
		})
	}
}

func TestCorruptMetadataIsRefused(t *testing.T) {
	b := newBed(t, 16*MiB)
	writeSome(t, b)
	jp := journalPath(t, b.dir)
	good, _ := os.ReadFile(jp)
	// Flip one byte inside the first record: durable records follow it.
	bad := bytes.Clone(good)
	bad[journalHeader+recordHeader+2] ^= 0x40
	os.WriteFile(jp, bad, 0o600)
	d, err := dev.OpenFile(b.path, b.size)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if _, err := Open(b.dir, d, Options{SyncInterval: -1}); err == nil || !strings.Contains(err.Error(), "CRC") {
		t.Fatalf("Open of a journal with a damaged record: %v", err)
	}
	rep, err := CheckDir(b.dir, b.size)
	if err != nil || rep.Clean() {
		t.Fatalf("CheckDir missed the damaged record: %v %+v", err, rep)
	}
	if after, _ := os.ReadFile(jp); !bytes.Equal(after, bad) {
		t.Fatal("a refused Open changed the journal")
	}
	os.WriteFile(jp, good, 0o600)
	if rep, err := CheckDir(b.dir, b.size); err != nil || !rep.Clean() {
		t.Fatalf("CheckDir of the repaired journal: %v %q", err, rep.Problems)
	}

	// A checkpoint that maps one physical cluster twice is refused and reported.
	st := newState()
	for _, r := range []record{
		{typ: recCreate, name: "a", kind: kVolume, size: MiB, layer: 1},
		{typ: recCreate, name: "b", kind: kVolume, size: MiB, layer: 2},
		{typ: recMap, layer: 1, vc: 0, entry: physEntry(3)},
		{typ: recMap, layer: 2, vc: 5, entry: physEntry(3)},
	} {
		if err := st.apply(&r, func(uint64) {}); err != nil {
			t.Fatal(err)
		}
	}
	dir := t.TempDir()
	if err := writeFileSync(dir, checkpointName, encodeCheckpoint(st, 1)); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(dir, d, Options{SyncInterval: -1}); err == nil || !strings.Contains(err.Error(), "mapped twice") {
		t.Fatalf("Open of a checkpoint mapping a cluster twice: %v", err)
	}
	rep, err = CheckDir(dir, b.size)
	if err != nil || len(rep.Problems) != 1 || !strings.Contains(rep.Problems[0], "more than once") {
		t.Fatalf("CheckDir: %v %q", err, rep.Problems)
	}
	// A cluster beyond the device (the device shrank).
	rep, _ = CheckDir(dir, 2*ClusterSize)
	if rep.Clean() {
		t.Fatal("CheckDir accepted a cluster beyond the device")
	}
}

func TestSecondOpenIsRefused(t *testing.T) {
	b := newBed(t, 16*MiB)
	if _, err := Open(b.dir, b.dev, Options{SyncInterval: -1}); err == nil {
		t.Fatal("a second Manager opened the same metadata directory")
	}
}

func TestCheckpointCompactsJournal(t *testing.T) {
	b := newBed(t, 64*MiB) // default 64 MiB journal limit: no compaction on its own here
	if _, err := b.m.Create("v", 32*MiB); err != nil {
		t.Fatal(err)
	}
	h := mustOpen(t, b.m, "v")
	for round := 0; round < 20; round++ {
		if err := h.WriteAt(pattern(32*MiB, byte(round)), 0, false); err != nil {
			t.Fatal(err)
		}
		if err := h.Trim(0, 32*MiB, true); err != nil {
			t.Fatal(err)
		}
	}
	if err := h.WriteAt(pattern(MiB, 77), 0, true); err != nil {
		t.Fatal(err)
	}
	jb := b.m.Stats().JournalBytes
	if err := b.m.Checkpoint(); err != nil {
		t.Fatal(err)
	}
	after := b.m.Stats().JournalBytes
	if jb < 100<<10 || after > journalHeader {
		t.Fatalf("journal %d bytes before checkpoint, %d after", jb, after)
	}
	if l, _ := filepath.Glob(filepath.Join(b.dir, "journal.*")); len(l) != 1 {
		t.Fatalf("old journals left behind: %v", l)
	}
	b.check()
	h.Close()
	b.reopen(false)
	b.check()
	h = mustOpen(t, b.m, "v")
	got := make([]byte, MiB)
	if err := h.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	mustEqual(t, "after checkpoint and reopen", got, pattern(MiB, 77))
}

// TestCheckpointInterrupted simulates a crash after the new journal started but
// before the new checkpoint replaced the old one: replay must use both journals.
func TestCheckpointInterrupted(t *testing.T) {
	b := newBed(t, 16*MiB)
	if _, err := b.m.Create("v", MiB); err != nil {
		t.Fatal(err)
	}
	h := mustOpen(t, b.m, "v")
	if err := h.WriteAt(pattern(ClusterSize, 1), 0, true); err != nil {
		t.Fatal(err)
	}
	old, _ := os.ReadFile(filepath.Join(b.dir, checkpointName))
	oldGen := b.m.jgen
	oldJournal, _ := os.ReadFile(filepath.Join(b.dir, journalName(oldGen)))
	if err := b.m.Checkpoint(); err != nil {
		t.Fatal(err)
	}
	if err := h.WriteAt(pattern(ClusterSize, 2), ClusterSize, true); err != nil {
		t.Fatal(err)
	}
	// Put back the old checkpoint and the journal it needs, as a crash would have left them.
	h.Close()
	b.m.opts.NoCheckpointOnClose = true
	b.m.Close()
	b.dev.Close()
	b.m, b.dev = nil, nil
	os.WriteFile(filepath.Join(b.dir, checkpointName), old, 0o600)
	os.WriteFile(filepath.Join(b.dir, journalName(oldGen)), oldJournal, 0o600)
	b.open()
	b.check()
	h = mustOpen(t, b.m, "v")
	want := make([]byte, MiB)
	copy(want, pattern(ClusterSize, 1))
	copy(want[ClusterSize:], pattern(ClusterSize, 2))
	mustEqual(t, "after interrupted checkpoint", readAll(t, h), want)
}

func TestMetadataMemoryFollowsAllocation(t *testing.T) {
	b := newBed(t, 16*MiB)
	for _, n := range []string{"a", "b", "c"} {
		if _, err := b.m.Create(n, 1<<50); err != nil {
			t.Fatal(err)
		}
	}
	h := mustOpen(t, b.m, "a")
	for _, off := range []int64{0, 1 << 40, 1<<50 - ClusterSize} {
		if err := h.WriteAt([]byte{1}, off, false); err != nil {
			t.Fatal(err)
		}
	}
	leaves := 0
	for _, l := range b.m.st.layers {
		leaves += len(l.tab.leaves)
	}
	if leaves != 3 {
		t.Fatalf("%d table leaves for 3 clusters in three 1 PiB volumes", leaves)
	}
}

// TestBackgroundCompaction checks that the journal is compacted on its own once it
// passes the limit when clients flush, even without a timed sync.
func TestBackgroundCompaction(t *testing.T) {
	dir := t.TempDir()
	d, err := dev.OpenFile(filepath.Join(dir, "disk.img"), 64*MiB)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	m, err := Open(filepath.Join(dir, "meta"), d, Options{SyncInterval: -1, JournalLimit: 64 << 10})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if _, err := m.Create("v", 32*MiB); err != nil {
		t.Fatal(err)
	}
	h := mustOpen(t, m, "v")
	_, gen0, err := readCheckpoint(filepath.Join(dir, "meta"))
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for round := 0; ; round++ {
		if err := h.WriteAt(pattern(32*MiB, byte(round)), 0, false); err != nil {
			t.Fatal(err)
		}
		if err := h.Trim(0, 32*MiB, true); err != nil {
			t.Fatal(err)
		}
		if _, gen, err := readCheckpoint(filepath.Join(dir, "meta")); err == nil && gen > gen0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no compaction after %d rounds; journal %d bytes", round, m.Stats().JournalBytes)
		}
	}
	rep, err := m.Check()
	if err != nil || !rep.Clean() {
		t.Fatalf("check: %v %q", err, rep.Problems)
	}
}

// TestCrashWhileStartingJournal leaves the next journal empty or with a partial
// header, as a crash inside a checkpoint's journal switch would, and reopens.
func TestCrashWhileStartingJournal(t *testing.T) {
	for name, content := range map[string][]byte{
		"empty":          nil,
		"partial header": []byte(journalMagic)[:5],
		"zero header":    make([]byte, journalHeader),
	} {
		t.Run(name, func(t *testing.T) {
			b := newBed(t, 16*MiB)
			want := writeSome(t, b)
			gen := uint64(0)
			l, _ := filepath.Glob(filepath.Join(b.dir, "journal.*"))
			fmt.Sscanf(filepath.Base(l[0]), "journal.%x", &gen)
			if err := os.WriteFile(filepath.Join(b.dir, journalName(gen+1)), content, 0o600); err != nil {
				t.Fatal(err)
			}
			b.open()
			b.check()
			h := mustOpen(t, b.m, "v")
			mustEqual(t, "after reopen", readAll(t, h), want)
			if err := h.WriteAt([]byte("more"), 0, true); err != nil {
				t.Fatal(err)
			}
			copy(want, "more")
			h.Close()
			b.reopen(false)
			b.check()
			h = mustOpen(t, b.m, "v")
			mustEqual(t, "after writing to the reset journal", readAll(t, h), want)
		})
	}
	// A damaged header with records behind it is not a crash artefact: refused.
	b := newBed(t, 16*MiB)
	writeSome(t, b)
	jp := journalPath(t, b.dir)
	j, _ := os.ReadFile(jp)
	j[3] ^= 1
	os.WriteFile(jp, j, 0o600)
	d, err := dev.OpenFile(b.path, b.size)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if _, err := Open(b.dir, d, Options{SyncInterval: -1}); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("Open with a damaged journal header: %v", err)
	}
}
