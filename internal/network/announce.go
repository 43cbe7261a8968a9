package network

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"sync"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// rarpFrame builds the frame QEMU sends to announce a migrated NIC: a broadcast RARP
// "request reverse" from mac.
func rarpFrame(mac net.HardwareAddr) []byte {
	f := make([]byte, 60) // minimum Ethernet payload, zero padded
	copy(f[0:6], []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
	copy(f[6:12], mac)
	binary.BigEndian.PutUint16(f[12:], 0x8035) // RARP
	binary.BigEndian.PutUint16(f[14:], 1)      // hardware: Ethernet
	binary.BigEndian.PutUint16(f[16:], 0x0800) // protocol: IPv4
	f[18], f[19] = 6, 4
	binary.BigEndian.PutUint16(f[20:], 3) // request reverse
	copy(f[22:28], mac)                   // sender hardware address
	copy(f[32:38], mac)                   // target hardware address
	return f
}

// Announcer is a prepared announcement that the NIC with a guest MAC is now behind a
// tap on a bridge: its sockets are open and its frame built, so that Announce costs
// two system calls at the moment it matters (a migration's switch-over).
type Announcer struct {
	mu     sync.Mutex
	nl     *netlink.Handle
	fd     int
	entry  *netlink.Neigh
	addr   *unix.SockaddrLinklayer
	frame  []byte
	closed bool
}

// ErrAnnouncerClosed is returned by Announce after Close.
var ErrAnnouncerClosed = errors.New("announcer closed")

// NewAnnouncer prepares the announcement of guest MAC mac behind tap on bridge; both
// links must exist. Close it when done.
func NewAnnouncer(bridge, tap, mac string) (*Announcer, error) {
	hw, err := net.ParseMAC(mac)
	if err != nil || len(hw) != 6 {
		return nil, fmt.Errorf("Invalid MAC %q", mac)
	}
	br, err := netlink.LinkByName(bridge)
	if err != nil {
		return nil, fmt.Errorf("Failed to find bridge %q: %w", bridge, err)
	}
	t, err := netlink.LinkByName(tap)
	if err != nil {
		return nil, fmt.Errorf("Failed to find tap %q: %w", tap, err)
	}
	nl, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("Failed to open a netlink socket: %w", err)
	}
	// Protocol 0: the socket only sends. One opened for ETH_P_ALL would be handed a
	// copy of every frame of the host while it waits (a migration stream included).
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		nl.Close()
		return nil, fmt.Errorf("Failed to open a packet socket: %w", err)
	}
	a := &Announcer{nl: nl, fd: fd, frame: rarpFrame(hw),
		entry: &netlink.Neigh{LinkIndex: t.Attrs().Index, Family: unix.AF_BRIDGE, HardwareAddr: hw,
			Flags: netlink.NTF_MASTER, State: netlink.NUD_REACHABLE, MasterIndex: br.Attrs().Index},
		addr: &unix.SockaddrLinklayer{Ifindex: br.Attrs().Index, Halen: 6, Protocol: htons(0x8035)}}
	copy(a.addr.Addr[:], []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
	return a, nil
}

// Announce points the local bridge's forwarding entry for the MAC at the tap, then
// sends a RARP from the MAC out of the bridge so that every other bridge and switch
// learns the new way (in this order: frames that arrive in between already go to
// the tap). It may be called more than once.
func (a *Announcer) Announce() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.closed {
		return ErrAnnouncerClosed
	}
	mac := a.entry.HardwareAddr
	if err := a.nl.NeighSet(a.entry); err != nil {
		return fmt.Errorf("Failed to point %s at link %d: %w", mac, a.entry.LinkIndex, err)
	}
	if err := unix.Sendto(a.fd, a.frame, 0, a.addr); err != nil {
		return fmt.Errorf("Failed to send an announce for %s on link %d: %w", mac, a.addr.Ifindex, err)
	}
	return nil
}

// Close releases the sockets; later calls to Announce fail.
func (a *Announcer) Close() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.closed {
		return nil
	}
	a.closed = true
	a.nl.Close()
	return unix.Close(a.fd)
}

// Announce tells the network at once that the NIC with guest MAC mac is now behind
// tap on bridge (after a migration, before the guest itself can say so), as
// Announcer.Announce does, preparing and releasing everything in one call.
func Announce(bridge, tap, mac string) error {
	a, err := NewAnnouncer(bridge, tap, mac)
	if err != nil {
		return err
	}
	defer a.Close()
	return a.Announce()
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }
