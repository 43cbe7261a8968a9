package testbed

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

func netnsExists(name string) bool {
	_, err := os.Stat("/run/netns/" + name)
	return err == nil
}

func pidAlive(pid int) bool {
	err := syscall.Kill(pid, 0)
	if err != nil {
		return errors.Is(err, syscall.EPERM)
	}
	// A zombie is dead for our purpose.
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	f := strings.Fields(string(b))
	return len(f) > 2 && f[2] != "Z"
}

// TestTeardownLeavesNothing runs a bed with a guest and a stray process that left its
// parent's session inside a subtest, and checks that afterwards no namespace, link or
// process of it is left. The same cleanups run when a test fails.
func TestTeardownLeavesNothing(t *testing.T) {
	if testing.Short() {
		t.Skip("needs root, QEMU and namespaces: skipped with -short")
	}
	var nss []string
	var pids []int
	t.Run("bed", func(t *testing.T) {
		bed := New(t, Options{Hosts: 2})
		nss = bed.Namespaces()
		h := bed.Hosts[1]
		tap, err := h.AddTap()
		if err != nil {
			t.Fatal(err)
		}
		vm := StartVM(t, VMConfig{Name: "gone", Netns: h.Netns, NICs: []NIC{{Tap: tap, MAC: GuestMAC(5)}}})
		pids = append(pids, vm.Cmd.Process.Pid)
		// A daemon-like process detached into its own session inside the host namespace.
		stray := h.Command("setsid", "sleep", "600")
		if err := stray.Start(); err != nil {
			t.Fatal(err)
		}
		go func() { _ = stray.Wait() }()
		pids = append(pids, stray.Process.Pid)
		// QEMU is up once QMP answers; the guest need not finish booting.
		if _, err := vm.QMP(); err != nil {
			t.Fatal(err)
		}
		out, err := h.Exec("ip", "-o", "link", "show")
		if err != nil || !strings.Contains(out, tap) || !strings.Contains(out, "br0") {
			t.Fatalf("links in the host namespace: %v\n%s", err, out)
		}
	})
	if len(nss) != 4 {
		t.Fatalf("expected switch, client and 2 host namespaces, got %v", nss)
	}
	for _, ns := range nss {
		if netnsExists(ns) {
			t.Errorf("namespace %s is still there", ns)
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for _, pid := range pids {
		for pidAlive(pid) && time.Now().Before(deadline) {
			time.Sleep(50 * time.Millisecond)
		}
		if pidAlive(pid) {
			t.Errorf("process %d is still running", pid)
		}
	}
}

// TestCleanStaleRemovesDeadOwnersLeftovers fakes the namespace of a crashed test
// process (a dead pid in its name) with a process inside, and checks CleanStale
// removes both, while a live owner's namespace is kept.
func TestCleanStaleRemovesDeadOwnersLeftovers(t *testing.T) {
	if testing.Short() {
		t.Skip("needs root: skipped with -short")
	}
	dead := exec.Command("true")
	if err := dead.Run(); err != nil {
		t.Fatal(err)
	}
	stale := fmt.Sprintf("%s%d-1-h0", namePrefix, dead.Process.Pid)
	live := fmt.Sprintf("%s%d-999-h0", namePrefix, os.Getpid())
	for _, ns := range []string{stale, live} {
		if out, err := exec.Command("ip", "netns", "add", ns).CombinedOutput(); err != nil {
			t.Fatalf("ip netns add %s: %v: %s", ns, err, out)
		}
	}
	t.Cleanup(func() { _ = removeNetns(stale); _ = removeNetns(live) })
	sleeper := NetnsCommand(stale, "sleep", "600")
	if err := sleeper.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { _ = sleeper.Wait() }()
	// Wait until `ip netns exec` has entered the namespace and exec'd sleep.
	inside := false
	for deadline := time.Now().Add(5 * time.Second); !inside && time.Now().Before(deadline); {
		out, _ := exec.Command("ip", "netns", "pids", stale).Output()
		inside = slices.Contains(strings.Fields(string(out)), strconv.Itoa(sleeper.Process.Pid))
		time.Sleep(20 * time.Millisecond)
	}
	if !inside {
		t.Fatal("the process never showed up in the stale namespace")
	}

	CleanStale()
	if netnsExists(stale) {
		t.Fatalf("stale namespace %s survived", stale)
	}
	deadline := time.Now().Add(5 * time.Second)
	for pidAlive(sleeper.Process.Pid) && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if pidAlive(sleeper.Process.Pid) {
		t.Fatal("the process in the stale namespace survived")
	}
	if !netnsExists(live) {
		t.Fatalf("CleanStale removed %s, whose owner is alive", live)
	}
}
