package network

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net"
	"os"
	"runtime"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// TestAnnouncer announces a MAC behind a bridge port in a network namespace of its own
// and checks what the rest of the network would see: the bridge's forwarding entry
// for the MAC on the port, and the RARP from the MAC coming out of the port.
func TestAnnouncer(t *testing.T) {
	if testing.Short() || os.Geteuid() != 0 {
		t.Skip("needs root (network namespace, bridge, packet socket)")
	}
	// The thread enters a new namespace and is never returned to the pool: when
	// this test's goroutine ends, the locked thread ends with it.
	runtime.LockOSThread()
	ns, err := netns.New()
	if err != nil {
		t.Fatalf("Failed to create a network namespace: %v", err)
	}
	defer ns.Close()

	br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "br-ann"}}
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "port-ann"}, PeerName: "peer-ann"}
	for _, l := range []netlink.Link{br, veth} {
		if err := netlink.LinkAdd(l); err != nil {
			t.Fatalf("Failed to add %s: %v", l.Attrs().Name, err)
		}
	}
	port, err := netlink.LinkByName("port-ann")
	if err != nil {
		t.Fatal(err)
	}
	peer, err := netlink.LinkByName("peer-ann")
	if err != nil {
		t.Fatal(err)
	}
	if err := netlink.LinkSetMaster(port, br); err != nil {
		t.Fatal(err)
	}
	for _, l := range []netlink.Link{br, port, peer} {
		if err := netlink.LinkSetUp(l); err != nil {
			t.Fatal(err)
		}
	}
	// What leaves the bridge through the port arrives at the peer.
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ALL)))
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: peer.Attrs().Index}); err != nil {
		t.Fatal(err)
	}
	tv := unix.NsecToTimeval(int64(200 * time.Millisecond))
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		t.Fatal(err)
	}

	if _, err := NewAnnouncer("br-ann", "port-ann", "not-a-mac"); err == nil {
		t.Error("NewAnnouncer accepted a bad MAC")
	}
	if _, err := NewAnnouncer("br-ann", "no-such-tap", "52:54:00:aa:bb:cc"); err == nil {
		t.Error("NewAnnouncer accepted a missing tap")
	}
	mac, _ := net.ParseMAC("52:54:00:aa:bb:cc")
	a, err := NewAnnouncer("br-ann", "port-ann", mac.String())
	if err != nil {
		t.Fatal(err)
	}
	for round := 0; round < 2; round++ { // it can be fired again
		if err := a.Announce(); err != nil {
			t.Fatalf("Announce %d: %v", round, err)
		}
		if !fdbHas(t, port.Attrs().Index, mac) {
			t.Errorf("round %d: no forwarding entry for %s on the port", round, mac)
		}
		f := readRARP(t, fd)
		if f == nil {
			t.Fatalf("round %d: no RARP left the bridge", round)
		}
		if !bytes.Equal(f[6:12], mac) || !bytes.Equal(f[22:28], mac) || binary.BigEndian.Uint16(f[20:]) != 3 {
			t.Errorf("round %d: unexpected announce frame % x", round, f[:42])
		}
		if err := netlink.NeighDel(&netlink.Neigh{LinkIndex: port.Attrs().Index, Family: unix.AF_BRIDGE,
			HardwareAddr: mac, Flags: netlink.NTF_MASTER, MasterIndex: br.Attrs().Index}); err != nil {
			t.Fatal(err)
		}
	}
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	if err := a.Announce(); !errors.Is(err, ErrAnnouncerClosed) {
		t.Errorf("Announce after Close = %v, want ErrAnnouncerClosed", err)
	}
	if err := a.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

func fdbHas(t *testing.T, ifindex int, mac net.HardwareAddr) bool {
	t.Helper()
	l, err := netlink.NeighList(ifindex, unix.AF_BRIDGE)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range l {
		if bytes.Equal(n.HardwareAddr, mac) && n.LinkIndex == ifindex {
			return true
		}
	}
	return false
}

// readRARP returns the next RARP frame read from fd, or nil after a quiet 200 ms.
func readRARP(t *testing.T, fd int) []byte {
	t.Helper()
	buf := make([]byte, 2048)
	for {
		n, _, err := unix.Recvfrom(fd, buf, 0)
		if err != nil {
			if errors.Is(err, unix.EAGAIN) {
				return nil
			}
			t.Fatal(err)
		}
		if n >= 42 && binary.BigEndian.Uint16(buf[12:]) == 0x8035 {
			return buf[:n]
		}
	}
}
