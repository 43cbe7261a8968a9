package host_test

import (
	"context"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/growserver/grow/internal/host/hostapi"
	"github.com/growserver/grow/test/testbed"
)

// TestLifecycle boots a guest from an NBD disk with a cloud-init seed and drives it as
// an operator would: console, stop, start, reboot, agent restart, external death, kill.
func TestLifecycle(t *testing.T) {
	t.Parallel()
	b := testbed.New(t, testbed.Options{Hosts: 1})
	h := b.StartAgents(t)[0]
	ctx := context.Background()
	g := testbed.NewAgentGuest(t, "life", 0, false, "counter", "responder")
	g.Spec.MaxVCPUs = 2 // room for a vCPU hot-add

	if _, err := h.API.Define(ctx, g.Spec); err != nil {
		t.Fatal(err)
	}
	// Bad input is refused and changes nothing.
	bad := g.Spec
	bad.Name = "Bad_Name"
	if _, err := h.API.Define(ctx, bad); err == nil {
		t.Fatal("a spec with an invalid name was accepted")
	}
	if _, err := h.API.Define(ctx, g.Spec); err == nil {
		t.Fatal("defining the same VM twice was accepted")
	}
	if vms, _ := h.API.List(ctx); len(vms) != 1 {
		t.Fatalf("want 1 VM after refused defines, got %d", len(vms))
	}

	start := time.Now()
	if err := h.API.Start(ctx, "life"); err != nil {
		t.Fatal(err)
	}
	con := h.AttachConsole(t, "life")
	ready, err := con.WaitReady(0, 90*time.Second)
	if err != nil {
		t.Fatalf("guest not ready: %v\n%s", err, con.Tail(2000))
	}
	t.Logf("guest ready after %s: %+v", time.Since(start).Round(time.Millisecond), ready)
	if ready.Hostname != "life-host" || len(ready.IPs) == 0 || ready.IPs[0] != g.IP+"/24" || ready.InstanceID != "life-iid" {
		t.Fatalf("guest reported %+v, want hostname life-host, ip %s/24 from the seed", ready, g.IP)
	}
	if !strings.Contains(ready.Root, "vda") && ready.Root != "" {
		t.Fatalf("guest did not boot from its NBD disk: root=%q", ready.Root)
	}
	if r := b.WaitQuery(t, g.Responder(), 30*time.Second); r.Hostname != "life-host" {
		t.Fatalf("responder over the bridge answered as %q", r.Hostname)
	}

	// Console round trip: type a command, read its output.
	mark := con.Len()
	if err := con.Type("echo round-$((20+22))-trip\n"); err != nil {
		t.Fatal(err)
	}
	if _, _, err := con.WaitFrom(mark, regexp.MustCompile(`round-42-trip`), 20*time.Second); err != nil {
		t.Fatalf("console round trip: %v\n%s", err, con.Tail(500))
	}
	// A second viewer gets the scrollback.
	if sb, err := h.API.ConsoleLog(ctx, "life"); err != nil || !strings.Contains(string(sb), "GROW-READY") {
		t.Fatalf("scrollback lacks the ready line (err %v)", err)
	}

	// The operator's CLI: list, show and a piped console session.
	cli := func(stdin string, args ...string) string {
		full := append(append([]string{"host"}, args...), "--agent", h.PeerURL, "--token", h.Token)
		cmd := testbed.NetnsCommand(h.Host.Netns, testbed.GrowBinary(t), full...)
		cmd.Stdin = strings.NewReader(stdin)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("grow host %v: %v: %s", args, err, out)
		}
		return string(out)
	}
	if out := cli("", "vm", "list"); !strings.Contains(out, "life") || !strings.Contains(out, "running") {
		t.Fatalf("grow host vm list:\n%s", out)
	}
	if out := cli("", "vm", "show", "life"); !strings.Contains(out, `"state": "running"`) || !strings.Contains(out, `"rx_bytes"`) {
		t.Fatalf("grow host vm show:\n%s", out)
	}
	if out := cli("echo cli-$((6*7))-ok\n", "console", "life"); !strings.Contains(out, "cli-42-ok") || !strings.Contains(out, "GROW-READY") {
		t.Fatalf("grow host console (scrollback and round trip):\n%s", out)
	}

	// vCPU hot-add: the guest sees a second CPU.
	if err := h.API.Resize(ctx, "life", hostapi.ResizeRequest{VCPUs: 2}); err != nil {
		t.Fatal(err)
	}
	mark = con.Len()
	_ = con.Type("ls -d /sys/devices/system/cpu/cpu1 && echo cpu1-$((0+1))-present\n")
	if _, _, err := con.WaitFrom(mark, regexp.MustCompile(`cpu1-1-present`), 20*time.Second); err != nil {
		t.Fatalf("hot-added vCPU not seen by the guest: %v\n%s", err, con.Tail(500))
	}
	if err := h.API.Resize(ctx, "life", hostapi.ResizeRequest{VCPUs: 3}); err == nil {
		t.Fatal("resize beyond max_vcpus accepted")
	}

	// Counters move and are read through netlink in the host's namespace.
	cnt, err := h.API.Counters(ctx, "life")
	if err != nil || cnt.RxBytes == 0 || cnt.TxBytes == 0 {
		t.Fatalf("counters after traffic: %+v %v", cnt, err)
	}

	// Agent restart: the VM is untouched (same QEMU, still counting, same state).
	before, _ := h.API.Get(ctx, "life")
	r1, err := b.Query(g.Responder(), 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	h.Kill() // even a crash of the agent must not touch the VM
	time.Sleep(time.Second)
	if r2, err := b.Query(g.Responder(), 10*time.Second); err != nil || r2.Counter <= r1.Counter {
		t.Fatalf("guest while the agent is down: counter %d -> %d, %v", r1.Counter, r2.Counter, err)
	}
	if err := h.Start(); err != nil {
		t.Fatal(err)
	}
	after := h.WaitState(t, "life", hostapi.StateRunning, 10*time.Second)
	if after.PID != before.PID || after.PID == 0 {
		t.Fatalf("QEMU pid changed across the agent restart: %d -> %d", before.PID, after.PID)
	}
	cnt2, err := h.API.Counters(ctx, "life")
	if err != nil || cnt2.RxBytes < cnt.RxBytes || cnt2.TxBytes < cnt.TxBytes {
		t.Fatalf("counters went back across the agent restart: %+v -> %+v (%v)", cnt, cnt2, err)
	}
	con = h.AttachConsole(t, "life")
	mark = con.Len()
	_ = con.Type("echo after-$((1+1))-restart\n")
	if _, _, err := con.WaitFrom(mark, regexp.MustCompile(`after-2-restart`), 20*time.Second); err != nil {
		t.Fatalf("console after the agent restart: %v", err)
	}

	// Reboot: the guest comes up again.
	mark = con.Len()
	if err := h.API.Reboot(ctx, "life"); err != nil {
		t.Fatal(err)
	}
	if _, err := con.WaitReady(mark, 90*time.Second); err != nil {
		t.Fatalf("guest not ready after reboot: %v", err)
	}

	// Stop: ACPI shutdown, the guest powers off cleanly.
	if err := h.API.Stop(ctx, "life", 60*time.Second); err != nil {
		t.Fatal(err)
	}
	vm := h.WaitState(t, "life", hostapi.StateStopped, 5*time.Second)
	if vm.ExitReason != "guest-shutdown" {
		t.Fatalf("stop ended with %q, want an ACPI guest-shutdown", vm.ExitReason)
	}
	if vm.PID != 0 || len(vm.Taps) != 0 {
		t.Fatalf("stopped VM still has pid %d or taps %v", vm.PID, vm.Taps)
	}
	cnt3, err := h.API.Counters(ctx, "life")
	if err != nil || cnt3.RxBytes < cnt2.RxBytes {
		t.Fatalf("counters lost when the tap went away: %+v -> %+v (%v)", cnt2, cnt3, err)
	}

	// Start again, then QEMU dies behind the agent's back: noticed within a second.
	if err := h.API.Start(ctx, "life"); err != nil {
		t.Fatal(err)
	}
	vm = h.WaitState(t, "life", hostapi.StateRunning, 5*time.Second)
	con = h.AttachConsole(t, "life")
	if _, err := con.WaitReady(0, 90*time.Second); err != nil {
		t.Fatalf("guest not ready after start: %v", err)
	}
	if err := syscall.Kill(vm.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	died := time.Now()
	vm = h.WaitState(t, "life", hostapi.StateStopped, 3*time.Second)
	if d := time.Since(died); d > time.Second {
		t.Fatalf("QEMU death noticed after %s", d)
	}
	if !strings.Contains(vm.ExitReason, "killed") {
		t.Fatalf("exit reason %q does not say QEMU was killed", vm.ExitReason)
	}
	t.Logf("external kill noticed: %q", vm.ExitReason)

	// Kill through the API, then delete: nothing is left.
	if err := h.API.Start(ctx, "life"); err != nil {
		t.Fatal(err)
	}
	if err := h.API.Delete(ctx, "life", false); err == nil {
		t.Fatal("deleting a running VM without force was accepted")
	}
	if err := h.API.Kill(ctx, "life"); err != nil {
		t.Fatal(err)
	}
	vm = h.WaitState(t, "life", hostapi.StateStopped, 5*time.Second)
	if err := h.API.Delete(ctx, "life", false); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(h.DataDir, "vms", "life")); !os.IsNotExist(err) {
		t.Fatalf("VM directory left after delete: %v", err)
	}
	if out, _ := h.Host.Exec("ip", "-o", "link"); strings.Contains(out, vm.Spec.NICs[0].Bridge+"x") || strings.Contains(out, "gt") {
		t.Fatalf("taps left after delete:\n%s", out)
	}
}
