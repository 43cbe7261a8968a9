package network

import (
	"encoding/binary"
	"fmt"
	"net"

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

// Announce tells the network at once that the NIC with guest MAC mac is now behind
// tap on bridge (after a migration, before the guest itself can say so): the local
// bridge gets a forwarding entry for mac on tap, and a RARP from mac is sent out of
// the bridge so that every other bridge and switch learns the new way.
func Announce(bridge, tap, mac string) error {
	hw, err := net.ParseMAC(mac)
	if err != nil || len(hw) != 6 {
		return fmt.Errorf("Invalid MAC %q", mac)
	}
	br, err := netlink.LinkByName(bridge)
	if err != nil {
		return fmt.Errorf("Failed to find bridge %q: %w", bridge, err)
	}
	t, err := netlink.LinkByName(tap)
	if err != nil {
		return fmt.Errorf("Failed to find tap %q: %w", tap, err)
	}
	entry := &netlink.Neigh{LinkIndex: t.Attrs().Index, Family: unix.AF_BRIDGE, HardwareAddr: hw,
		Flags: netlink.NTF_MASTER, State: netlink.NUD_REACHABLE, MasterIndex: br.Attrs().Index}
	if err := netlink.NeighSet(entry); err != nil {
		return fmt.Errorf("Failed to point %s at %q on %q: %w", mac, tap, bridge, err)
	}
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ALL)))
	if err != nil {
		return fmt.Errorf("Failed to open a packet socket: %w", err)
	}
	defer unix.Close(fd)
	addr := &unix.SockaddrLinklayer{Ifindex: br.Attrs().Index, Halen: 6, Protocol: htons(0x8035)}
	copy(addr.Addr[:], []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
	if err := unix.Sendto(fd, rarpFrame(hw), 0, addr); err != nil {
		return fmt.Errorf("Failed to send an announce for %s on %q: %w", mac, bridge, err)
	}
	return nil
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }
