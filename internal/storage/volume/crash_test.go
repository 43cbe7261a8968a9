package volume

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"fmt"
	"golang.org/x/sys/unix"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/growserver/grow/internal/storage/dev"
)

// The kill -9 test: a child process (this test binary re-executed with crashEnv set)
// opens the volumes and issues writes, trims, zeroes, FUA writes, flushes, snapshots
// and snapshot deletions, reporting each step on a pipe before and after it. The parent
// kills it at a random moment, reopens the metadata, runs Check and verifies every
// 512-byte sector against the values the NBD durability rules allow.

const (
	crashEnv     = "GROW_VOLUME_CRASH_CHILD"
	crashDevSize = 64 << 20
	crashVolSize = 4 << 20
	sector       = 512
)

var crashVols = []string{"a", "b"}

// sectorData fills p (one sector) with the content of version v at sector s.
func sectorData(p []byte, v uint32, s int64) {
	if v == 0 {
		clear(p)
		return
	}
	for i := 0; i < len(p); i += 8 {
		binary.LittleEndian.PutUint32(p[i:], v)
		binary.LittleEndian.PutUint32(p[i+4:], uint32(s))
	}
}

// sectorVersion decodes a sector written by sectorData; ok is false for anything else.
func sectorVersion(p []byte, s int64) (uint32, bool) {
	if isZero(p) {
		return 0, true
	}
	v := binary.LittleEndian.Uint32(p)
	var want [sector]byte
	sectorData(want[:], v, s)
	return v, bytes.Equal(p, want[:])
}

func crashChild() {
	err := crashChildRun()
	fmt.Fprintf(os.Stderr, "crash child: %v\n", err)
	os.Exit(1)
}

func crashChildRun() error {
	dir := os.Getenv(crashEnv)
	seq, _ := strconv.ParseUint(os.Getenv(crashEnv+"_SEQ"), 10, 32)
	seed, _ := strconv.ParseUint(os.Getenv(crashEnv+"_SEED"), 10, 64)
	rng := rand.New(rand.NewPCG(seed, seq))
	out := os.NewFile(3, "report")
	report := func(format string, a ...any) {
		out.Write([]byte(fmt.Sprintf(format, a...) + "\n"))
	}
	d, err := dev.OpenFile(filepath.Join(dir, "disk.img"), crashDevSize)
	if err != nil {
		return err
	}
	// Half the writes take their data from a pipe (SpliceFrom), as large NBD writes do.
	m, err := Open(filepath.Join(dir, "meta"), &pipeFile{File: d}, Options{SyncInterval: 5 * time.Millisecond, JournalLimit: 16 << 10})
	if err != nil {
		return err
	}
	hs := make([]*Handle, len(crashVols))
	for i, n := range crashVols {
		if hs[i], err = m.Open(n); err != nil {
			return err
		}
	}
	buf := make([]byte, 3*ClusterSize)
	var fds [2]int
	if err := unix.Pipe2(fds[:], unix.O_NONBLOCK|unix.O_CLOEXEC); err != nil {
		return err
	}
	if _, err := unix.FcntlInt(uintptr(fds[1]), unix.F_SETPIPE_SZ, len(buf)); err != nil {
		return err
	}
	snaps := 0
	for {
		seq++
		vi := rng.IntN(len(hs))
		h := hs[vi]
		switch op := rng.IntN(100); {
		case op < 70:
			n := int64(1+rng.IntN(len(buf)/sector)) * sector
			off := rng.Int64N((crashVolSize-n)/sector+1) * sector
			fua := op < 10
			for i := int64(0); i < n; i += sector {
				sectorData(buf[i:i+sector], uint32(seq), (off+i)/sector)
			}
			report("B %d %d w %d %d", seq, vi, off, n)
			if rng.IntN(2) == 0 {
				if err := h.WriteAt(buf[:n], off, fua); err != nil {
					return err
				}
			} else {
				for b := buf[:n]; len(b) > 0; {
					k, err := unix.Write(fds[1], b)
					if err != nil {
						return err
					}
					b = b[k:]
				}
				if err := h.SpliceFrom(fds[0], off, int(n), fua); err != nil {
					return err
				}
			}
			if fua {
				report("U %d", seq)
			}
		case op < 80:
			if err := h.Flush(); err != nil {
				return err
			}
			report("F %d", seq)
		case op < 88:
			c := rng.Int64N(crashVolSize / ClusterSize)
			n := int64(1 + rng.IntN(2))
			n = min(n, crashVolSize/ClusterSize-c)
			report("B %d %d z %d %d", seq, vi, c*ClusterSize, n*ClusterSize)
			if err := h.Trim(c*ClusterSize, n*ClusterSize, false); err != nil {
				return err
			}
		case op < 95:
			n := int64(1+rng.IntN(len(buf)/sector)) * sector
			off := rng.Int64N((crashVolSize-n)/sector+1) * sector
			report("B %d %d z %d %d", seq, vi, off, n)
			if err := h.WriteZeroes(off, n, rng.IntN(2) == 0, false, false); err != nil {
				return err
			}
		default:
			// Snapshots of "a" come and go; they must never disturb "a" itself.
			var names []string
			for _, i := range m.List() {
				if i.Kind == KindSnapshot && strings.HasPrefix(i.Name, "a@") {
					names = append(names, i.Name)
				}
			}
			if len(names) < 2 {
				snaps++
				if _, err := m.Snapshot("a", fmt.Sprintf("s%d-%d", seq, snaps)); err != nil {
					return err
				}
			} else if err := m.Delete(names[rng.IntN(len(names))]); err != nil {
				return err
			}
		}
	}
}

type crashModel struct {
	// cands[v][s] are the versions sector s of volume v may hold: the durable one
	// first, then every later write or zeroing that began.
	cands [][][]uint32
}

func (cm *crashModel) begin(v int, off, n int64, ver uint32) {
	for s := off / sector; s < (off+n)/sector; s++ {
		cm.cands[v][s] = append(cm.cands[v][s], ver)
	}
}

// durable makes the newest candidate of each sector in the range the only one.
func (cm *crashModel) durable(v int, off, n int64) {
	for s := off / sector; s < (off+n)/sector; s++ {
		c := cm.cands[v][s]
		cm.cands[v][s] = append(c[:0], c[len(c)-1])
	}
}

func TestCrashKill9(t *testing.T) {
	if testing.Short() {
		t.Skip("kill -9 crash test skipped in -short mode")
	}
	dir := t.TempDir()
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, 1))
	cm := &crashModel{cands: make([][][]uint32, len(crashVols))}
	sectors := int64(crashVolSize / sector)
	for v := range cm.cands {
		cm.cands[v] = make([][]uint32, int(sectors))
	}
	// Set up: "a" is a plain volume, "b" a clone of an image with data in every other cluster.
	func() {
		d, err := dev.OpenFile(filepath.Join(dir, "disk.img"), crashDevSize)
		if err != nil {
			t.Fatal(err)
		}
		defer d.Close()
		m, err := Open(filepath.Join(dir, "meta"), d, Options{SyncInterval: -1})
		if err != nil {
			t.Fatal(err)
		}
		defer m.Close()
		if _, err := m.Create("a", crashVolSize); err != nil {
			t.Fatal(err)
		}
		img := make([]byte, crashVolSize)
		for s := int64(0); s < sectors; s++ {
			if (s*sector/ClusterSize)%2 == 0 {
				sectorData(img[s*sector:(s+1)*sector], 1, s)
				cm.cands[1][s] = []uint32{1}
			} else {
				cm.cands[1][s] = []uint32{0}
			}
			cm.cands[0][s] = []uint32{0}
		}
		if _, err := m.ImportImage("img", crashVolSize, bytes.NewReader(img), nil); err != nil {
			t.Fatal(err)
		}
		if _, err := m.Clone("img", "b"); err != nil {
			t.Fatal(err)
		}
	}()

	seq := uint64(1)
	totalOps, totalFlushes := 0, 0
	const rounds = 25
	for round := 0; round < rounds; round++ {
		ops, flushes := runCrashChild(t, dir, seed+uint64(round), seq, 20+rng.IntN(600), cm, &seq)
		totalOps += ops
		totalFlushes += flushes
		verifyAfterCrash(t, dir, round, cm)
	}
	_, gen, err := readCheckpoint(filepath.Join(dir, "meta"))
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%d rounds, %d operations, %d flushes, checkpoint generation %d", rounds, totalOps, totalFlushes, gen)
	if gen < 3 {
		t.Fatalf("the children wrote no checkpoints (generation %d): compaction under crashes is untested", gen)
	}
	if totalFlushes < rounds {
		t.Fatalf("only %d flushes in %d rounds: the child did too little to test anything", totalFlushes, rounds)
	}
}

// runCrashChild runs one child, kills it once it has begun killAfter operations (or
// after a few seconds), and folds its report into the model.
func runCrashChild(t *testing.T, dir string, seed, seq uint64, killAfter int, cm *crashModel, next *uint64) (ops, flushes int) {
	t.Helper()
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pr.Close()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), crashEnv+"="+dir, fmt.Sprintf("%s_SEQ=%d", crashEnv, seq), fmt.Sprintf("%s_SEED=%d", crashEnv, seed))
	cmd.ExtraFiles = []*os.File{pw}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		pw.Close()
		t.Fatal(err)
	}
	pw.Close()
	t.Cleanup(func() { cmd.Process.Kill() })
	var once sync.Once
	kill := func() { once.Do(func() { cmd.Process.Signal(syscall.SIGKILL) }) }
	timer := time.AfterFunc(5*time.Second, kill)
	defer timer.Stop()
	type op struct {
		v       int
		off, n  int64
		zero    bool
		hasData bool
	}
	begun := map[uint64]op{}
	sc := bufio.NewScanner(pr)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		num := func(i int) int64 { x, _ := strconv.ParseInt(f[i], 10, 64); return x }
		s := uint64(num(1))
		*next = max(*next, s+1)
		switch f[0] {
		case "B":
			o := op{v: int(num(2)), zero: f[3] == "z", off: num(4), n: num(5)}
			ver := uint32(s)
			if o.zero {
				ver = 0
			}
			cm.begin(o.v, o.off, o.n, ver)
			begun[s] = o
			if ops++; ops >= killAfter {
				kill()
			}
		case "U":
			o := begun[s]
			cm.durable(o.v, o.off, o.n)
		case "F":
			for v := range cm.cands {
				cm.durable(v, 0, crashVolSize)
			}
			flushes++
		}
	}
	kill()
	err = cmd.Wait()
	if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); !ok || !ws.Signaled() {
		t.Fatalf("child did not die by the signal (%v): %s", err, stderr.String())
	}
	return ops, flushes
}

func verifyAfterCrash(t *testing.T, dir string, round int, cm *crashModel) {
	t.Helper()
	d, err := dev.OpenFile(filepath.Join(dir, "disk.img"), crashDevSize)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	// No checkpoint on close: the journals and checkpoints the children leave are what
	// the next round replays.
	m, err := Open(filepath.Join(dir, "meta"), d, Options{SyncInterval: -1, NoCheckpointOnClose: true})
	if err != nil {
		t.Fatalf("round %d: reopen after kill -9: %v", round, err)
	}
	defer m.Close()
	rep, err := m.Check()
	if err != nil || !rep.Clean() {
		t.Fatalf("round %d: check after kill -9: %v %q", round, err, rep.Problems)
	}
	for v, name := range crashVols {
		h, err := m.Open(name)
		if err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		p := make([]byte, crashVolSize)
		if err := h.ReadAt(p, 0); err != nil {
			t.Fatal(err)
		}
		h.Close()
		for s := range cm.cands[v] {
			got, ok := sectorVersion(p[s*sector:(s+1)*sector], int64(s))
			found := false
			for _, c := range cm.cands[v][s] {
				found = found || (ok && c == got)
			}
			if !found {
				t.Fatalf("round %d: volume %q sector %d holds version %d (valid pattern %v), allowed %v",
					round, name, s, got, ok, cm.cands[v][s])
			}
			cm.cands[v][s] = []uint32{got}
		}
	}
	// Snapshots must still read as valid sector patterns.
	for _, i := range m.List() {
		if i.Kind != KindSnapshot {
			continue
		}
		h, err := m.Open(i.Name)
		if err != nil {
			t.Fatal(err)
		}
		p := make([]byte, i.Size)
		if err := h.ReadAt(p, 0); err != nil {
			t.Fatal(err)
		}
		h.Close()
		for s := int64(0); s < i.Size/sector; s++ {
			if _, ok := sectorVersion(p[s*sector:(s+1)*sector], s); !ok {
				t.Fatalf("round %d: snapshot %q sector %d holds foreign data", round, i.Name, s)
			}
		}
	}
}
