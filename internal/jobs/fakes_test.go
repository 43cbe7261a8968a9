package jobs

import (
	"context"
	"fmt"
	"io"
	"strings"
	"sync"
	"time"

	"github.com/growserver/grow/internal/host/hostapi"
	"github.com/growserver/grow/internal/store"
)

// cluster is an in-memory set of storage controllers and host agents with failure
// injection; it stands in for `grow storaged` and `grow hostd` (the e2e tests use real ones).
type cluster struct {
	mu      sync.Mutex
	volumes map[string]int64              // name -> size
	vms     map[string]map[string]*fakeVM // host ID -> VM name -> VM
	fail    map[string]error              // "clone", "define", "start", "resize", "migrate"
	// readyAfter delays the guest's ready report after start.
	readyAfter time.Duration
	calls      []string
}

type fakeVM struct {
	spec    hostapi.VMSpec
	state   string
	started time.Time
	disk    int64
}

func newCluster() *cluster {
	return &cluster{volumes: map[string]int64{}, vms: map[string]map[string]*fakeVM{}, fail: map[string]error{}}
}

func (c *cluster) Storage(s store.StorageController) (Storage, error) { return &fakeStorage{c: c}, nil }
func (c *cluster) Host(h store.Host) (Host, error)                    { return &fakeHost{c: c, id: h.ID}, nil }

func (c *cluster) failing(step string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.calls = append(c.calls, step)
	return c.fail[step]
}

func (c *cluster) vmCount() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, h := range c.vms {
		n += len(h)
	}
	return n
}

func (c *cluster) volumeCount() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for name := range c.volumes {
		if !strings.HasPrefix(name, "image-") {
			n++
		}
	}
	return n
}

type fakeStorage struct{ c *cluster }

func (s *fakeStorage) CloneVolume(ctx context.Context, src, dst string) error {
	if err := s.c.failing("clone"); err != nil {
		return err
	}
	s.c.mu.Lock()
	defer s.c.mu.Unlock()
	size, ok := s.c.volumes[src]
	if !ok {
		return fmt.Errorf("no image %q", src)
	}
	if _, dup := s.c.volumes[dst]; dup {
		return fmt.Errorf("volume %q exists", dst)
	}
	s.c.volumes[dst] = size
	return nil
}

func (s *fakeStorage) ResizeVolume(ctx context.Context, name string, size int64) error {
	s.c.mu.Lock()
	defer s.c.mu.Unlock()
	if _, ok := s.c.volumes[name]; !ok {
		return fmt.Errorf("no volume %q", name)
	}
	s.c.volumes[name] = size
	return nil
}

func (s *fakeStorage) DeleteVolume(ctx context.Context, name string) error {
	s.c.mu.Lock()
	defer s.c.mu.Unlock()
	delete(s.c.volumes, name)
	return nil
}

func (s *fakeStorage) ImportImage(ctx context.Context, name string, r io.Reader, size int64, format string, progress func(int64)) (int64, error) {
	n, err := io.Copy(io.Discard, r)
	if err != nil {
		return 0, err
	}
	s.c.mu.Lock()
	defer s.c.mu.Unlock()
	s.c.volumes[name] = n
	return n, nil
}

func (s *fakeStorage) Endpoint(ctx context.Context) (hostapi.Disk, error) {
	return hostapi.Disk{Socket: "/run/fake-nbd.sock"}, nil
}

type fakeHost struct {
	c  *cluster
	id string
}

func (h *fakeHost) vm(name string) (*fakeVM, error) {
	v := h.c.vms[h.id][name]
	if v == nil {
		return nil, ErrGone
	}
	return v, nil
}

func (h *fakeHost) Define(ctx context.Context, spec hostapi.VMSpec) error {
	if err := h.c.failing("define"); err != nil {
		return err
	}
	if err := spec.Validate(); err != nil {
		return err
	}
	h.c.mu.Lock()
	defer h.c.mu.Unlock()
	if h.c.vms[h.id] == nil {
		h.c.vms[h.id] = map[string]*fakeVM{}
	}
	if h.c.vms[h.id][spec.Name] != nil {
		return fmt.Errorf("VM %q exists", spec.Name)
	}
	h.c.vms[h.id][spec.Name] = &fakeVM{spec: spec, state: hostapi.StateDefined, disk: h.c.volumes[spec.Disks[0].Export]}
	return nil
}

func (h *fakeHost) Get(ctx context.Context, name string) (hostapi.VM, error) {
	h.c.mu.Lock()
	defer h.c.mu.Unlock()
	v, err := h.vm(name)
	if err != nil {
		return hostapi.VM{}, err
	}
	return hostapi.VM{Spec: v.spec, State: v.state}, nil
}

func (h *fakeHost) setState(name, want string, from ...string) error {
	h.c.mu.Lock()
	defer h.c.mu.Unlock()
	v, err := h.vm(name)
	if err != nil {
		return err
	}
	v.state = want
	if want == hostapi.StateRunning {
		v.started = time.Now()
	}
	return nil
}

func (h *fakeHost) Start(ctx context.Context, name string) error {
	if err := h.c.failing("start"); err != nil {
		return err
	}
	return h.setState(name, hostapi.StateRunning)
}

func (h *fakeHost) Stop(ctx context.Context, name string, timeout time.Duration) error {
	return h.setState(name, hostapi.StateStopped)
}

func (h *fakeHost) Reboot(ctx context.Context, name string) error {
	return h.setState(name, hostapi.StateRunning)
}

func (h *fakeHost) Delete(ctx context.Context, name string) error {
	h.c.mu.Lock()
	defer h.c.mu.Unlock()
	delete(h.c.vms[h.id], name)
	return nil
}

func (h *fakeHost) Resize(ctx context.Context, name string, req hostapi.ResizeRequest) error {
	if err := h.c.failing("resize"); err != nil {
		return err
	}
	h.c.mu.Lock()
	defer h.c.mu.Unlock()
	v, err := h.vm(name)
	if err != nil {
		return err
	}
	if req.DiskBytes > 0 {
		v.disk = req.DiskBytes
	}
	if req.MemoryMiB > 0 {
		return fmt.Errorf("memory hotplug not configured")
	}
	return nil
}

func (h *fakeHost) ConsoleLog(ctx context.Context, name string) ([]byte, error) {
	h.c.mu.Lock()
	defer h.c.mu.Unlock()
	v, err := h.vm(name)
	if err != nil {
		return nil, err
	}
	if v.state != hostapi.StateRunning || time.Since(v.started) < h.c.readyAfter {
		return []byte("booting\r\n"), nil
	}
	host := ""
	for _, l := range strings.Split(v.spec.Seed.MetaData, "\n") {
		if s, ok := strings.CutPrefix(l, "local-hostname: "); ok {
			host = s
		}
	}
	addr := strings.Join(v.spec.NICs[0].IPv4, ",")
	return []byte("booting\r\n" + ReadyPrefix + "hostname=" + host + " ip=" + addr + "\r\n"), nil
}

func (h *fakeHost) Counters(ctx context.Context, name string) (hostapi.Counters, error) {
	return hostapi.Counters{}, nil
}

func (h *fakeHost) Migrate(ctx context.Context, name string, target store.Host) error {
	if err := h.c.failing("migrate"); err != nil {
		return err
	}
	h.c.mu.Lock()
	defer h.c.mu.Unlock()
	v, err := h.vm(name)
	if err != nil {
		return err
	}
	if h.c.vms[target.ID] == nil {
		h.c.vms[target.ID] = map[string]*fakeVM{}
	}
	h.c.vms[target.ID][name] = v
	delete(h.c.vms[h.id], name)
	return nil
}
