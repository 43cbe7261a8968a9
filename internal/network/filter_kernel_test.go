package network

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"os"
	"runtime"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// TestFilterOnBridge installs a NIC's anti-spoofing rules on a bridge port in a network
// namespace of its own, sends crafted frames into the bridge as the guest would, and
// checks which of them come out of another port: the kernel's verdict on the rules,
// not their text.
func TestFilterOnBridge(t *testing.T) {
	if testing.Short() || os.Geteuid() != 0 {
		t.Skip("needs root (network namespace, bridge, nftables, packet sockets)")
	}
	runtime.LockOSThread() // never unlocked: the thread dies with the namespace
	ns, err := netns.New()
	if err != nil {
		t.Fatalf("Failed to create a network namespace: %v", err)
	}
	defer ns.Close()

	br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "br-flt"}}
	links := []netlink.Link{br,
		&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "tap-flt"}, PeerName: "guest-flt"},
		&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "out-flt"}, PeerName: "obs-flt"}}
	for _, l := range links {
		if err := netlink.LinkAdd(l); err != nil {
			t.Fatalf("Failed to add %s: %v", l.Attrs().Name, err)
		}
	}
	idx := map[string]int{}
	for _, name := range []string{"br-flt", "tap-flt", "guest-flt", "out-flt", "obs-flt"} {
		l, err := netlink.LinkByName(name)
		if err != nil {
			t.Fatal(err)
		}
		if name == "tap-flt" || name == "out-flt" {
			if err := netlink.LinkSetMaster(l, br); err != nil {
				t.Fatal(err)
			}
		}
		if err := netlink.LinkSetUp(l); err != nil {
			t.Fatal(err)
		}
		idx[name] = l.Attrs().Index
	}

	mac, _ := net.ParseMAC("52:54:00:77:00:10")
	own4, other4 := netip.MustParseAddr("10.77.0.10"), netip.MustParseAddr("10.77.0.11")
	own6, other6 := netip.MustParseAddr("fd77::10"), netip.MustParseAddr("fd77::11")
	ll := linkLocal(mac)
	if err := ApplyFilter(FilterSpec{Tap: "tap-flt", MAC: mac.String(), IPv4: []string{own4.String()}, IPv6: []string{own6.String()}}); err != nil {
		t.Fatal(err)
	}

	out := packetSocket(t, idx["obs-flt"])
	in := packetSocket(t, idx["guest-flt"])
	otherMAC, _ := net.ParseMAC("52:54:00:77:00:11")
	cases := []struct {
		name  string
		frame func(mark []byte) []byte // the marker goes inside the IP payload
		pass  bool
	}{
		{"IPv4 from its own address", func(mark []byte) []byte { return ipv4Frame(mac, own4, 17, append(udp(40000, 7777), mark...)) }, true},
		{"DHCP request from 0.0.0.0", func(mark []byte) []byte {
			return ipv4Frame(mac, netip.IPv4Unspecified(), 17, append(udp(68, 67), mark...))
		}, true},
		{"IPv4 from a neighbour's address", func(mark []byte) []byte { return ipv4Frame(mac, other4, 17, append(udp(40000, 7777), mark...)) }, false},
		{"IPv4 from another MAC", func(mark []byte) []byte { return ipv4Frame(otherMAC, own4, 17, append(udp(40000, 7777), mark...)) }, false},
		{"DHCP server answer", func(mark []byte) []byte { return ipv4Frame(mac, own4, 17, append(udp(67, 68), mark...)) }, false},
		{"IPv6 from its own address", func(mark []byte) []byte { return ipv6Frame(mac, own6, 17, append(udp(40000, 7777), mark...)) }, true},
		{"IPv6 from a neighbour's address", func(mark []byte) []byte { return ipv6Frame(mac, other6, 17, append(udp(40000, 7777), mark...)) }, false},
		{"neighbour advertisement of its own address", func(mark []byte) []byte { return ipv6Frame(mac, ll, 58, append(icmp6(136, own6), mark...)) }, true},
		{"neighbour advertisement of its link-local address", func(mark []byte) []byte { return ipv6Frame(mac, ll, 58, append(icmp6(136, ll), mark...)) }, true},
		{"neighbour advertisement of a neighbour's address", func(mark []byte) []byte { return ipv6Frame(mac, ll, 58, append(icmp6(136, other6), mark...)) }, false},
		{"neighbour advertisement of a neighbour's address from its own", func(mark []byte) []byte { return ipv6Frame(mac, own6, 58, append(icmp6(136, other6), mark...)) }, false},
		{"neighbour solicitation", func(mark []byte) []byte { return ipv6Frame(mac, own6, 58, append(icmp6(135, other6), mark...)) }, true},
		{"router advertisement", func(mark []byte) []byte { return ipv6Frame(mac, ll, 58, icmp6(134, netip.IPv6Unspecified())) }, false},
		{"redirect", func(mark []byte) []byte { return ipv6Frame(mac, ll, 58, append(icmp6(137, other6), mark...)) }, false},
		{"DHCPv6 server answer", func(mark []byte) []byte { return ipv6Frame(mac, ll, 17, append(udp(547, 546), mark...)) }, false},
	}
	for i, c := range cases {
		// A marker at the end tells the frames apart on the other side.
		frame := c.frame([]byte{'G', 'R', 'O', 'W', byte(i), 0xa5, 0x5a, 0xff})
		if err := unix.Sendto(in, frame, 0, &unix.SockaddrLinklayer{Ifindex: idx["guest-flt"], Halen: 6}); err != nil {
			t.Fatalf("send %s: %v", c.name, err)
		}
	}
	seen := map[int]bool{}
	buf := make([]byte, 2048)
	for {
		n, _, err := unix.Recvfrom(out, buf, 0)
		if errors.Is(err, unix.EAGAIN) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		f := buf[:n]
		if n >= 8 && bytes.Equal(f[n-8:n-4], []byte("GROW")) && bytes.Equal(f[n-3:], []byte{0xa5, 0x5a, 0xff}) {
			seen[int(f[n-4])] = true
		}
	}
	for i, c := range cases {
		if seen[i] != c.pass {
			t.Errorf("%s: came through = %v, want %v", c.name, seen[i], c.pass)
		}
	}
}

// packetSocket is a raw packet socket on one interface that gives up reading after a
// quiet 300 ms.
func packetSocket(t *testing.T, ifindex int) int {
	t.Helper()
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ALL)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: ifindex}); err != nil {
		t.Fatal(err)
	}
	tv := unix.NsecToTimeval(int64(300 * time.Millisecond))
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		t.Fatal(err)
	}
	return fd
}

// ipv4Frame is a broadcast Ethernet frame carrying an IPv4 packet with payload.
func ipv4Frame(src net.HardwareAddr, from netip.Addr, proto byte, payload []byte) []byte {
	h := make([]byte, 20)
	h[0], h[8], h[9] = 0x45, 64, proto
	binary.BigEndian.PutUint16(h[2:], uint16(20+len(payload)))
	f4, to := from.As4(), [4]byte{255, 255, 255, 255}
	copy(h[12:], f4[:])
	copy(h[16:], to[:])
	var sum uint32
	for i := 0; i < 20; i += 2 {
		sum += uint32(binary.BigEndian.Uint16(h[i:]))
	}
	for sum > 0xffff {
		sum = sum&0xffff + sum>>16
	}
	binary.BigEndian.PutUint16(h[10:], ^uint16(sum))
	return append(ether(net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, src, 0x0800), append(h, payload...)...)
}

// ipv6Frame is an Ethernet frame to all nodes (ff02::1) carrying an IPv6 packet.
func ipv6Frame(src net.HardwareAddr, from netip.Addr, next byte, payload []byte) []byte {
	h := make([]byte, 40)
	h[0], h[6], h[7] = 0x60, next, 255
	binary.BigEndian.PutUint16(h[4:], uint16(len(payload)))
	f6, to := from.As16(), netip.MustParseAddr("ff02::1").As16()
	copy(h[8:], f6[:])
	copy(h[24:], to[:])
	return append(ether(net.HardwareAddr{0x33, 0x33, 0, 0, 0, 1}, src, 0x86dd), append(h, payload...)...)
}

func ether(dst, src net.HardwareAddr, typ uint16) []byte {
	b := append(append([]byte{}, dst...), src...)
	return binary.BigEndian.AppendUint16(b, typ)
}

// udp is a UDP header (length and checksum 0: nothing on the bridge checks them).
func udp(sport, dport uint16) []byte {
	b := make([]byte, 8)
	binary.BigEndian.PutUint16(b[0:], sport)
	binary.BigEndian.PutUint16(b[2:], dport)
	binary.BigEndian.PutUint16(b[4:], 8)
	return b
}

// icmp6 is an ICMPv6 message of type typ whose 16 bytes after the first 8 are target
// (neighbour solicitation/advertisement and redirect layout).
func icmp6(typ byte, target netip.Addr) []byte {
	b := make([]byte, 24)
	b[0] = typ
	tg := target.As16()
	copy(b[8:], tg[:])
	return b
}
