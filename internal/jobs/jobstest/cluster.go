// Package jobstest is an in-memory stand-in for storage controllers and host agents,
// with failure injection, for tests of internal/jobs and internal/api. It must never be
// used outside tests: it runs nothing. End-to-end tests use the real daemons.
package jobstest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"time"

	"github.com/growserver/grow/internal/host/hostapi"
	"github.com/growserver/grow/internal/jobs"
	"github.com/growserver/grow/internal/store"
)

// Cluster is an in-memory set of storage controllers and host agents with failure
// injection; it stands in for `grow storaged` and `grow hostd` (the e2e tests use real ones).
// It implements jobs.Connector. Lock Mu before reading the maps while jobs run.
type Cluster struct {
	Mu      sync.Mutex
	Volumes map[string]int64          // name -> size
	VMs     map[string]map[string]*VM // host ID -> VM name -> VM
	Fail    map[string]error          // "clone", "define", "start", "resize", "migrate"
	// Lost makes a step succeed but answer this error (its answer lost on the way): "migrate".
	Lost map[string]error
	// ReadyAfter delays the guest's ready report after start.
	ReadyAfter time.Duration
	// Calls lists the injectable steps in the order they were attempted.
	Calls []string
	// Traffic holds each VM's cumulative traffic counters.
	Traffic map[string]hostapi.Counters
	// Down lists host and storage controller IDs whose daemons do not answer.
	Down map[string]bool
}

// VM is one fake VM.
type VM struct {
	Spec    hostapi.VMSpec
	State   string
	Started time.Time
	Disk    int64
}

// NewCluster returns an empty cluster.
func NewCluster() *Cluster {
	return &Cluster{Volumes: map[string]int64{}, VMs: map[string]map[string]*VM{}, Fail: map[string]error{}, Traffic: map[string]hostapi.Counters{}, Down: map[string]bool{}}
}

// Storage returns the fake controller.
// SetDown makes the daemon of a host or storage controller stop (or resume) answering.
func (c *Cluster) SetDown(id string, down bool) {
	c.Mu.Lock()
	defer c.Mu.Unlock()
	c.Down[id] = down
}

func (c *Cluster) health(id, detail string) (string, error) {
	c.Mu.Lock()
	defer c.Mu.Unlock()
	if c.Down[id] {
		return "", errors.New("connection refused")
	}
	return detail, nil
}

func (c *Cluster) Storage(s store.StorageController) (jobs.Storage, error) {
	return &fakeStorage{c: c, id: s.ID}, nil
}

// Host returns the fake agent of h.
func (c *Cluster) Host(h store.Host) (jobs.Host, error) { return &fakeHost{c: c, id: h.ID}, nil }

func (c *Cluster) failing(step string) error {
	c.Mu.Lock()
	defer c.Mu.Unlock()
	c.Calls = append(c.Calls, step)
	return c.Fail[step]
}

// VMCount counts VMs on every host.
func (c *Cluster) VMCount() int {
	c.Mu.Lock()
	defer c.Mu.Unlock()
	n := 0
	for _, h := range c.VMs {
		n += len(h)
	}
	return n
}

// VolumeCount counts volumes that are not images.
func (c *Cluster) VolumeCount() int {
	c.Mu.Lock()
	defer c.Mu.Unlock()
	n := 0
	for name := range c.Volumes {
		if !strings.HasPrefix(name, "image-") {
			n++
		}
	}
	return n
}

type fakeStorage struct {
	c  *Cluster
	id string
}

func (s *fakeStorage) Health(ctx context.Context) (string, error) { return s.c.health(s.id, "pool ok") }

func (h *fakeHost) Health(ctx context.Context) (string, error) { return h.c.health(h.id, "fake agent") }

func (s *fakeStorage) CloneVolume(ctx context.Context, src, dst string) error {
	if err := s.c.failing("clone"); err != nil {
		return err
	}
	s.c.Mu.Lock()
	defer s.c.Mu.Unlock()
	size, ok := s.c.Volumes[src]
	if !ok {
		return fmt.Errorf("no image %q", src)
	}
	if _, dup := s.c.Volumes[dst]; dup {
		return fmt.Errorf("volume %q exists", dst)
	}
	s.c.Volumes[dst] = size
	return nil
}

func (s *fakeStorage) ResizeVolume(ctx context.Context, name string, size int64) error {
	s.c.Mu.Lock()
	defer s.c.Mu.Unlock()
	if _, ok := s.c.Volumes[name]; !ok {
		return fmt.Errorf("no volume %q", name)
	}
	s.c.Volumes[name] = size
	return nil
}

func (s *fakeStorage) DeleteVolume(ctx context.Context, name string) error {
	s.c.Mu.Lock()
	defer s.c.Mu.Unlock()
	delete(s.c.Volumes, name)
	return nil
}

func (s *fakeStorage) ImportImage(ctx context.Context, name string, r io.Reader, size int64, format string, progress func(int64)) (int64, error) {
	n, err := io.Copy(io.Discard, r)
	if err != nil {
		return 0, err
	}
	s.c.Mu.Lock()
	defer s.c.Mu.Unlock()
	s.c.Volumes[name] = n
	return n, nil
}

func (s *fakeStorage) Endpoint(ctx context.Context, volume string) (hostapi.Disk, error) {
	s.c.Mu.Lock()
	defer s.c.Mu.Unlock()
	if _, ok := s.c.Volumes[volume]; !ok {
		return hostapi.Disk{}, fmt.Errorf("volume %q does not exist", volume)
	}
	return hostapi.Disk{Socket: "/run/fake-nbd.sock"}, nil
}

type fakeHost struct {
	c  *Cluster
	id string
}

func (h *fakeHost) vm(name string) (*VM, error) {
	v := h.c.VMs[h.id][name]
	if v == nil {
		return nil, jobs.ErrGone
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
	h.c.Mu.Lock()
	defer h.c.Mu.Unlock()
	if h.c.VMs[h.id] == nil {
		h.c.VMs[h.id] = map[string]*VM{}
	}
	if h.c.VMs[h.id][spec.Name] != nil {
		return fmt.Errorf("VM %q exists", spec.Name)
	}
	h.c.VMs[h.id][spec.Name] = &VM{Spec: spec, State: hostapi.StateDefined, Disk: h.c.Volumes[spec.Disks[0].Export]}
	return nil
}

func (h *fakeHost) Get(ctx context.Context, name string) (hostapi.VM, error) {
	h.c.Mu.Lock()
	defer h.c.Mu.Unlock()
	v, err := h.vm(name)
	if err != nil {
		return hostapi.VM{}, err
	}
	return hostapi.VM{Spec: v.Spec, State: v.State}, nil
}

func (h *fakeHost) setState(name, want string, from ...string) error {
	h.c.Mu.Lock()
	defer h.c.Mu.Unlock()
	v, err := h.vm(name)
	if err != nil {
		return err
	}
	v.State = want
	if want == hostapi.StateRunning {
		v.Started = time.Now()
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
	h.c.Mu.Lock()
	defer h.c.Mu.Unlock()
	delete(h.c.VMs[h.id], name)
	return nil
}

func (h *fakeHost) Shape(ctx context.Context, name string, in, out uint64) error {
	h.c.Mu.Lock()
	defer h.c.Mu.Unlock()
	v, err := h.vm(name)
	if err != nil {
		return err
	}
	for i := range v.Spec.NICs {
		v.Spec.NICs[i].InRate, v.Spec.NICs[i].OutRate = in, out
	}
	return nil
}

func (h *fakeHost) Resize(ctx context.Context, name string, req hostapi.ResizeRequest) error {
	if err := h.c.failing("resize"); err != nil {
		return err
	}
	h.c.Mu.Lock()
	defer h.c.Mu.Unlock()
	v, err := h.vm(name)
	if err != nil {
		return err
	}
	if req.DiskBytes > 0 {
		v.Disk = req.DiskBytes
	}
	if req.MemoryMiB > 0 {
		return fmt.Errorf("memory hotplug not configured")
	}
	return nil
}

func (h *fakeHost) ConsoleLog(ctx context.Context, name string) ([]byte, error) {
	h.c.Mu.Lock()
	defer h.c.Mu.Unlock()
	v, err := h.vm(name)
	if err != nil {
		return nil, err
	}
	if v.State != hostapi.StateRunning || time.Since(v.Started) < h.c.ReadyAfter {
		return []byte("booting\r\n"), nil
	}
	host := ""
	for _, l := range strings.Split(v.Spec.Seed.MetaData, "\n") {
		if s, ok := strings.CutPrefix(l, "local-hostname: "); ok {
			host = s
		}
	}
	addr := strings.Join(v.Spec.NICs[0].IPv4, ",")
	return []byte("booting\r\n" + jobs.ReadyPrefix + "hostname=" + host + " ip=" + addr + "\r\n"), nil
}

func (h *fakeHost) Counters(ctx context.Context, name string) (hostapi.Counters, error) {
	h.c.Mu.Lock()
	defer h.c.Mu.Unlock()
	if _, err := h.vm(name); err != nil {
		return hostapi.Counters{}, err
	}
	return h.c.Traffic[name], nil
}

func (h *fakeHost) Migrate(ctx context.Context, name string, target store.Host) error {
	if err := h.c.failing("migrate"); err != nil {
		return err
	}
	h.c.Mu.Lock()
	defer h.c.Mu.Unlock()
	v, err := h.vm(name)
	if err != nil {
		return err
	}
	if h.c.VMs[target.ID] == nil {
		h.c.VMs[target.ID] = map[string]*VM{}
	}
	h.c.VMs[target.ID][name] = v
	delete(h.c.VMs[h.id], name)
	return h.c.Lost["migrate"]
}
