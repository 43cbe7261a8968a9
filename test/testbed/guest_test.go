package testbed

import (
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/growserver/grow/guest/block"
)

// TestGuestPowerOffAndWriterResume checks two things hostd and the migration test rely
// on: the ACPI power button (QMP system_powerdown) shuts the guest down cleanly, so
// QEMU exits by itself; and after a restart on the same disks the disk writer verifies
// the blocks already written and resumes after the last acknowledged one.
func TestGuestPowerOffAndWriterResume(t *testing.T) {
	// Mostly waiting (or unrelated to the others): overlap with the other parallel tests.
	t.Parallel()
	if testing.Short() {
		t.Skip("boots QEMU guests: skipped with -short")
	}
	dir := t.TempDir()
	root := CopyGuestImage(t, dir)
	data := BlankImage(t, filepath.Join(dir, "data.raw"), 4<<20)
	cfg := VMConfig{
		Name:   "resume",
		Append: "grow.run=diskwriter,verify grow.write_interval=10ms",
		Disks:  []Disk{{File: root}, {File: data}},
	}
	vm := StartVM(t, cfg)
	if _, err := vm.Console.WaitReady(0, bootTimeout); err != nil {
		t.Fatal(err)
	}
	if _, err := vm.Console.WaitFor(regexp.MustCompile(`GROW-VERIFY ok disk=vdb slots=1024 newest=0`), 20*time.Second); err != nil {
		t.Fatal(err)
	}
	if _, err := vm.Console.WaitAckAbove(25, 60*time.Second); err != nil {
		t.Fatal(err)
	}
	q, err := vm.QMP()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := q.Execute("system_powerdown", nil); err != nil {
		t.Fatal(err)
	}
	select {
	case <-vm.Done():
	case <-time.After(30 * time.Second):
		t.Fatalf("the guest did not power off within 30 s of the ACPI power button:\n%s", vm.Console.Tail(2000))
	}
	if _, err := vm.Console.WaitFor(regexp.MustCompile(`GROW-POWEROFF`), time.Second); err != nil {
		t.Fatal(err)
	}
	last, ok := vm.Console.LastAck()
	if !ok {
		t.Fatal("no acknowledged block")
	}
	if _, err := VerifyBlocksFile(data, 1024, last); err != nil {
		t.Fatalf("after power-off, blocks up to %d: %v", last, err)
	}
	// The writer may have completed a write whose GROW-ACK line the power-off cut off.
	f, err := os.Open(data)
	if err != nil {
		t.Fatal(err)
	}
	newest, err := block.Scan(f, 1024)
	f.Close()
	if err != nil || newest < last || newest > last+1 {
		t.Fatalf("scan after power-off: newest %d (last acknowledged %d): %v", newest, last, err)
	}

	// Same disks again: the guest finds its history, checks it and goes on.
	vm2 := StartVM(t, cfg)
	m, err := vm2.Console.WaitFor(regexp.MustCompile(`GROW-WRITER disk=vdb slots=1024 start=(\d+)\r?\n`), bootTimeout)
	if err != nil {
		t.Fatal(err)
	}
	start, _ := strconv.ParseUint(m[1], 10, 64)
	if start != newest+1 {
		t.Fatalf("writer resumed at %d; last acknowledged %d, newest on disk %d", start, last, newest)
	}
	if _, err := vm2.Console.WaitFor(regexp.MustCompile(`GROW-VERIFY ok disk=vdb slots=1024 newest=`+strconv.FormatUint(newest, 10)+`\r?\n`), 20*time.Second); err != nil {
		t.Fatal(err)
	}
	if _, err := vm2.Console.WaitAckAbove(start, 30*time.Second); err != nil {
		t.Fatal(err)
	}
}
