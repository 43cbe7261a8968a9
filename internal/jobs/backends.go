package jobs

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"strconv"
	"time"

	"github.com/growserver/grow/internal/host/agentclient"
	"github.com/growserver/grow/internal/host/hostapi"
	"github.com/growserver/grow/internal/storage/adminclient"
	"github.com/growserver/grow/internal/store"
)

// Storage is what jobs need from one storage controller.
type Storage interface {
	// CloneVolume makes dst a copy-on-write clone of the image src.
	CloneVolume(ctx context.Context, src, dst string) error
	// ResizeVolume sets a volume's virtual size.
	ResizeVolume(ctx context.Context, name string, size int64) error
	// DeleteVolume deletes a volume; a volume that does not exist is not an error.
	DeleteVolume(ctx context.Context, name string) error
	// ImportImage stores r as the read-only image name and returns its size.
	ImportImage(ctx context.Context, name string, r io.Reader, size int64, format string, progress func(int64)) (int64, error)
	// Endpoint tells QEMU how to reach a volume of this controller over NBD.
	Endpoint(ctx context.Context, volume string) (hostapi.Disk, error)
	// Health answers whether the controller responds, with its pool's state.
	Health(ctx context.Context) (string, error)
}

// Host is what jobs need from one host agent.
type Host interface {
	Define(ctx context.Context, spec hostapi.VMSpec) error
	Get(ctx context.Context, name string) (hostapi.VM, error)
	Start(ctx context.Context, name string) error
	Stop(ctx context.Context, name string, timeout time.Duration) error
	Reboot(ctx context.Context, name string) error
	// Delete removes a VM, killing it if needed; a VM that does not exist is not an error.
	Delete(ctx context.Context, name string) error
	Resize(ctx context.Context, name string, req hostapi.ResizeRequest) error
	// Shape sets the rates of every NIC of a VM (bits per second, 0 = unlimited).
	Shape(ctx context.Context, name string, in, out uint64) error
	ConsoleLog(ctx context.Context, name string) ([]byte, error)
	Counters(ctx context.Context, name string) (hostapi.Counters, error)
	// Migrate moves a running VM to the agent at target and waits until it is done.
	Migrate(ctx context.Context, name string, target store.Host) error
	// Health answers whether the agent responds, with how many VMs it runs.
	Health(ctx context.Context) (string, error)
}

// Connector reaches the registered daemons.
type Connector interface {
	Storage(c store.StorageController) (Storage, error)
	Host(h store.Host) (Host, error)
}

// ErrGone reports that a host agent does not know a VM.
var ErrGone = fmt.Errorf("VM does not exist on the host")

// Clients is the Connector over the real HTTP clients of `grow storaged` and `grow hostd`.
type Clients struct{}

// Storage returns an adminclient-backed Storage: the controller's API, and its mirror
// partner's for when the controller does not answer.
func (Clients) Storage(c store.StorageController) (Storage, error) {
	sc := &storageClient{name: c.Name}
	for _, ep := range [][2]string{{c.URL, c.Token}, {c.PartnerURL, c.PartnerToken}} {
		if ep[0] == "" {
			continue
		}
		cl, err := adminclient.New(ep[0], ep[1])
		if err == nil && c.CACert != "" {
			cl, err = cl.WithCAPEM([]byte(c.CACert))
		}
		if err != nil {
			return nil, fmt.Errorf("Failed to reach storage controller %q: %w", c.Name, err)
		}
		sc.cls = append(sc.cls, cl)
	}
	sc.c = sc.cls[0]
	return sc, nil
}

// Host returns an agentclient-backed Host.
func (Clients) Host(h store.Host) (Host, error) {
	cl, err := agentclient.NewWithCAPEM(h.URL, h.Token, h.CACert)
	if err != nil {
		return nil, fmt.Errorf("Failed to reach host %q: %w", h.Name, err)
	}
	return &hostClient{c: cl, name: h.Name}, nil
}

type storageClient struct {
	c    *adminclient.Client   // the controller
	cls  []*adminclient.Client // the controller, then its mirror partner if registered
	name string
}

// either runs call on the controller or, when it does not answer at all, on its mirror
// partner, which answers for the pair (mirrored controllers forward and proxy volume
// changes to each other, and make them alone while the other is away).
func (s *storageClient) either(call func(*adminclient.Client) error) error {
	var err error
	for _, c := range s.cls {
		if err = call(c); !errors.Is(err, adminclient.ErrUnreachable) {
			return err
		}
	}
	return err
}

func (s *storageClient) CloneVolume(ctx context.Context, src, dst string) error {
	err := s.either(func(c *adminclient.Client) error { _, err := c.CloneVolume(ctx, src, dst); return err })
	if err != nil {
		return fmt.Errorf("Failed to clone %q to %q on %q: %w", src, dst, s.name, err)
	}
	return nil
}

func (s *storageClient) ResizeVolume(ctx context.Context, name string, size int64) error {
	err := s.either(func(c *adminclient.Client) error { _, err := c.ResizeVolume(ctx, name, size); return err })
	if err != nil {
		return fmt.Errorf("Failed to resize volume %q on %q: %w", name, s.name, err)
	}
	return nil
}

func (s *storageClient) DeleteVolume(ctx context.Context, name string) error {
	err := s.either(func(c *adminclient.Client) error { return c.DeleteVolume(ctx, name) })
	if err != nil && !adminclient.IsNotFound(err) {
		return fmt.Errorf("Failed to delete volume %q on %q: %w", name, s.name, err)
	}
	return nil
}

func (s *storageClient) ImportImage(ctx context.Context, name string, r io.Reader, size int64, format string, progress func(int64)) (int64, error) {
	v, err := s.c.ImportImage(ctx, name, r, size, format, progress)
	if err != nil {
		return 0, fmt.Errorf("Failed to import image %q into %q: %w", name, s.name, err)
	}
	return v.Size, nil
}

// mirroredReconnectDelay is how long QEMU holds a mirrored volume's requests while
// its NBD connection is down: long enough for the partner controller to take the
// volume's service address over, so a failover is a stall and never an I/O error.
const mirroredReconnectDelay = 30

// Endpoint tells a host how to reach a volume: address, reconnect window, and TLS
// (with the name to verify) when the controller speaks NBD over TLS.
func (s *storageClient) Endpoint(ctx context.Context, volume string) (hostapi.Disk, error) {
	var v *adminclient.Volume
	var st *adminclient.Stats
	err := s.either(func(c *adminclient.Client) error {
		var err error
		if v, err = c.GetVolume(ctx, volume); err != nil {
			return err
		}
		st, err = c.Stats(ctx)
		return err
	})
	if v == nil {
		return hostapi.Disk{}, fmt.Errorf("Failed to read volume %q on %q: %w", volume, s.name, err)
	}
	if err != nil {
		return hostapi.Disk{}, fmt.Errorf("Failed to read NBD address of %q: %w", s.name, err)
	}
	d, err := s.endpoint(v, st)
	if err != nil {
		return hostapi.Disk{}, err
	}
	// TLS where offered: a customer's disk does not cross the storage network in clear
	// (a local unix socket needs it only if the controller insists).
	if st.NBDTLS == "required" || (st.NBDTLS != "" && d.Socket == "") {
		d.TLS, d.TLSHostname = true, st.NBDTLSName
	}
	return d, nil
}

func (s *storageClient) endpoint(v *adminclient.Volume, st *adminclient.Stats) (hostapi.Disk, error) {
	// On a mirrored pair a volume has its own address, which follows its primary.
	if v.Mirror != nil && v.NBDAddress != "" {
		h, p, err := net.SplitHostPort(v.NBDAddress)
		port, perr := strconv.Atoi(p)
		if err != nil || perr != nil {
			return hostapi.Disk{}, fmt.Errorf("Storage controller %q reports a bad NBD address %q for %q", s.name, v.NBDAddress, v.Name)
		}
		return hostapi.Disk{Host: h, Port: port, ReconnectDelay: mirroredReconnectDelay}, nil
	}
	// A TCP address other hosts can reach wins; a unix socket (or loopback) only serves
	// hosts on the controller's own machine, as in the all-in-one installation.
	if st.NBDAddress != "" {
		h, p, err := net.SplitHostPort(st.NBDAddress)
		if err != nil {
			return hostapi.Disk{}, fmt.Errorf("Storage controller %q reports a bad NBD address %q: %w", s.name, st.NBDAddress, err)
		}
		port, _ := strconv.Atoi(p)
		ip := net.ParseIP(h)
		if st.NBDSocket == "" || (ip != nil && !ip.IsLoopback() && !ip.IsUnspecified()) {
			return hostapi.Disk{Host: h, Port: port, ReconnectDelay: 5}, nil
		}
	}
	if st.NBDSocket == "" {
		return hostapi.Disk{}, fmt.Errorf("Storage controller %q serves NBD on neither TCP nor a unix socket", s.name)
	}
	return hostapi.Disk{Socket: st.NBDSocket, ReconnectDelay: 5}, nil
}

func (s *storageClient) Health(ctx context.Context) (string, error) {
	p, err := s.c.Pool(ctx)
	if err == nil {
		return "pool " + p.State, nil
	}
	if len(s.cls) > 1 && errors.Is(err, adminclient.ErrUnreachable) {
		if pp, perr := s.cls[1].Pool(ctx); perr == nil {
			return "unreachable; its mirror partner answers for the pair (pool " + pp.State + ")", nil
		}
	}
	return "", fmt.Errorf("Storage controller %q does not answer: %w", s.name, err)
}

func (h *hostClient) Health(ctx context.Context) (string, error) {
	vms, err := h.c.List(ctx)
	if err != nil {
		return "", fmt.Errorf("Host agent %q does not answer: %w", h.name, err)
	}
	return fmt.Sprintf("%d VMs", len(vms)), nil
}

type hostClient struct {
	c    *agentclient.Client
	name string
}

func (h *hostClient) Define(ctx context.Context, spec hostapi.VMSpec) error {
	if _, err := h.c.Define(ctx, spec); err != nil {
		return fmt.Errorf("Failed to define VM %q on %q: %w", spec.Name, h.name, err)
	}
	return nil
}

func (h *hostClient) Get(ctx context.Context, name string) (hostapi.VM, error) {
	vm, err := h.c.Get(ctx, name)
	if agentclient.IsNotFound(err) {
		return hostapi.VM{}, ErrGone
	}
	if err != nil {
		return hostapi.VM{}, fmt.Errorf("Failed to read VM %q on %q: %w", name, h.name, err)
	}
	return vm, nil
}

func (h *hostClient) Start(ctx context.Context, name string) error {
	if err := h.c.Start(ctx, name); err != nil {
		return fmt.Errorf("Failed to start VM %q on %q: %w", name, h.name, err)
	}
	return nil
}

func (h *hostClient) Stop(ctx context.Context, name string, timeout time.Duration) error {
	if err := h.c.Stop(ctx, name, timeout); err != nil {
		return fmt.Errorf("Failed to stop VM %q on %q: %w", name, h.name, err)
	}
	return nil
}

func (h *hostClient) Shape(ctx context.Context, name string, in, out uint64) error {
	if err := h.c.Shape(ctx, name, hostapi.ShapeRequest{InRate: in, OutRate: out}); err != nil {
		return fmt.Errorf("Failed to shape VM %q on %q: %w", name, h.name, err)
	}
	return nil
}

func (h *hostClient) Reboot(ctx context.Context, name string) error {
	if err := h.c.Reboot(ctx, name); err != nil {
		return fmt.Errorf("Failed to reboot VM %q on %q: %w", name, h.name, err)
	}
	return nil
}

func (h *hostClient) Delete(ctx context.Context, name string) error {
	if err := h.c.Delete(ctx, name, true); err != nil && !agentclient.IsNotFound(err) {
		return fmt.Errorf("Failed to delete VM %q on %q: %w", name, h.name, err)
	}
	return nil
}

func (h *hostClient) Resize(ctx context.Context, name string, req hostapi.ResizeRequest) error {
	if err := h.c.Resize(ctx, name, req); err != nil {
		return fmt.Errorf("Failed to resize VM %q on %q: %w", name, h.name, err)
	}
	return nil
}

func (h *hostClient) ConsoleLog(ctx context.Context, name string) ([]byte, error) {
	b, err := h.c.ConsoleLog(ctx, name)
	if err != nil {
		return nil, fmt.Errorf("Failed to read console of VM %q on %q: %w", name, h.name, err)
	}
	return b, nil
}

func (h *hostClient) Counters(ctx context.Context, name string) (hostapi.Counters, error) {
	c, err := h.c.Counters(ctx, name)
	if err != nil {
		return hostapi.Counters{}, fmt.Errorf("Failed to read counters of VM %q on %q: %w", name, h.name, err)
	}
	return c, nil
}

func (h *hostClient) Migrate(ctx context.Context, name string, target store.Host) error {
	u, err := url.Parse(target.URL)
	if err != nil {
		return fmt.Errorf("Host %q has a bad URL %q: %w", target.Name, target.URL, err)
	}
	op, err := h.c.Migrate(ctx, name, hostapi.MigrateRequest{TargetURL: target.URL, TargetToken: target.Token, TargetCACert: target.CACert, ListenHost: u.Hostname()})
	if err != nil {
		return fmt.Errorf("Failed to start migrating VM %q from %q to %q: %w", name, h.name, target.Name, err)
	}
	op, err = h.c.Wait(ctx, op.ID, 200*time.Millisecond)
	if err != nil {
		return fmt.Errorf("Failed to follow migration of VM %q: %w", name, err)
	}
	if op.Status != hostapi.OpSucceeded {
		return fmt.Errorf("Migration of VM %q from %q to %q %s: %s", name, h.name, target.Name, op.Status, op.Error)
	}
	return nil
}
