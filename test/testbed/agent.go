package testbed

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/growserver/grow/guest/seed"
	"github.com/growserver/grow/internal/host/agentclient"
	"github.com/growserver/grow/internal/host/hostapi"
)

// Agent is grow hostd running on a bed host, with an API client for the test process.
type Agent struct {
	*Daemon
	Host *Host
	API  *agentclient.Client
}

// StartAgent starts grow hostd on the host (see StartHostd) and connects a client to its API.
func (h *Host) StartAgent(t testing.TB, opts HostdOptions) *Agent {
	t.Helper()
	d := h.StartHostd(t, opts)
	var api *agentclient.Client
	var err error
	if opts.TLS != nil {
		var ca []byte
		if ca, err = os.ReadFile(opts.TLS.CA); err == nil {
			api, err = agentclient.NewWithCAPEM(d.URL, d.Token, string(ca))
		}
	} else {
		api, err = agentclient.New(d.URL, d.Token)
	}
	if err != nil {
		t.Fatalf("Failed to connect to %s: %v", d.Name, err)
	}
	return &Agent{Daemon: d, Host: h, API: api}
}

// StartAgents starts grow hostd with default options on every host of the bed, in host order.
func (b *Bed) StartAgents(t testing.TB) []*Agent {
	t.Helper()
	agents := make([]*Agent, len(b.Hosts))
	for i, h := range b.Hosts {
		agents[i] = h.StartAgent(t, HostdOptions{})
	}
	return agents
}

// WaitState polls a VM every 50 ms until it reaches state and returns it; it fails the
// test after timeout.
func (a *Agent) WaitState(t testing.TB, name, state string, timeout time.Duration) hostapi.VM {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		vm, err := a.API.Get(context.Background(), name)
		if err == nil && vm.State == state {
			return vm
		}
		if time.Now().After(deadline) {
			t.Fatalf("VM %s did not reach %s within %s (now %+v, err %v)", name, state, timeout, vm.State, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// AttachConsole follows a VM's serial console over the agent's websocket API until the
// test ends (scrollback first); what the console's Type sends goes to the guest.
func (a *Agent) AttachConsole(t testing.TB, name string) *Console {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	hdr := http.Header{}
	hdr.Set("Authorization", "Bearer "+a.Token)
	ws, _, err := websocket.Dial(ctx, a.API.ConsoleURL(name), &websocket.DialOptions{HTTPHeader: hdr, HTTPClient: a.API.HTTPClient()})
	if err != nil {
		cancel()
		t.Fatalf("Failed to attach to the console of %s: %v", name, err)
	}
	conn := websocket.NetConn(ctx, ws, websocket.MessageBinary)
	c := NewConsole()
	c.In = conn
	go c.Copy(conn)
	t.Cleanup(func() { cancel(); conn.Close() })
	return c
}

// QEMUPIDs lists the live (not zombie) QEMU processes of the agent's VMs: those whose
// command line names its data directory.
func (a *Agent) QEMUPIDs() []int {
	var pids []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || !strings.HasPrefix(string(b), "qemu-system") || !strings.Contains(string(b), a.DataDir+"/") {
			continue
		}
		if st, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat")); err == nil {
			if i := strings.LastIndexByte(string(st), ')'); i > 0 && i+2 < len(st) && st[i+2] == 'Z' {
				continue
			}
		}
		pids = append(pids, pid)
	}
	return pids
}

// AgentGuest is a test guest for grow hostd: its VM spec on qemu-nbd disks, its address
// and the writer's disk image.
type AgentGuest struct {
	Spec     hostapi.VMSpec
	IP       string // IPv4 address on the guest network, without prefix
	DataFile string // the disk writer's image ("" without a data disk)
}

// NewAgentGuest prepares guest i of a bed (GuestIP(i), GuestMAC(i); hostname NAME-host,
// instance id NAME-iid) running the given workloads: a root disk copied from the gold
// master and, with dataDisk, a blank 16 MiB disk for the writer, each served by qemu-nbd
// until the test ends.
func NewAgentGuest(t testing.TB, name string, i int, dataDisk bool, run ...string) *AgentGuest {
	t.Helper()
	dir := t.TempDir()
	guestDir := GuestDir(t)
	root := StartQemuNBD(t, CopyGuestImage(t, dir))
	g := &AgentGuest{IP: strings.TrimSuffix(GuestIP(i), "/24")}
	disks := []hostapi.Disk{{ID: "root", Socket: root.Socket, ReconnectDelay: 5}}
	if dataDisk {
		g.DataFile = BlankImage(t, filepath.Join(dir, "data.raw"), 16<<20)
		d := StartQemuNBD(t, g.DataFile)
		disks = append(disks, hostapi.Disk{ID: "data", Socket: d.Socket, ReconnectDelay: 5})
	}
	mac := GuestMAC(i)
	s := Seed{
		Meta:    seed.MetaData{InstanceID: name + "-iid", LocalHostname: name + "-host"},
		Network: StaticNetwork(mac, []string{GuestIP(i)}, ""),
		User:    Workloads(run...),
	}
	meta, user, netcfg, err := s.Files()
	if err != nil {
		t.Fatalf("Failed to render the seed of %s: %v", name, err)
	}
	g.Spec = hostapi.VMSpec{
		Name: name, VCPUs: 1, MemoryMiB: 256,
		Disks: disks,
		NICs:  []hostapi.NIC{{MAC: mac, IPv4: []string{g.IP}}},
		Seed:  &hostapi.Seed{MetaData: meta, UserData: user, NetworkConfig: netcfg},
		Boot: &hostapi.DirectBoot{Kernel: filepath.Join(guestDir, "vmlinux"), Initrd: filepath.Join(guestDir, "initrd.img"),
			Append: "console=ttyS0 no_timer_check"},
	}
	return g
}

// Responder returns the address of the guest's responder (TCP 7777), for Bed.Query.
func (g *AgentGuest) Responder() string { return fmt.Sprintf("%s:7777", g.IP) }
