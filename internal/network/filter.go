package network

import (
	"fmt"
	"net"
	"net/netip"
	"strings"
)

// Table is the nftables bridge-family table holding every anti-spoofing rule of the agent.
const Table = "grow"

// FilterSpec is what one NIC may send: its MAC and its addresses.
type FilterSpec struct {
	Tap  string
	MAC  string
	IPv4 []string
	IPv6 []string
}

func chainName(tap string) string { return "from-" + tap }

// baseRules creates the table, the verdict map keyed by input port and the base chain.
// Frames entering the bridge from a port listed in the map jump to that port's chain.
func baseRules() string {
	return fmt.Sprintf(`add table bridge %[1]s
add map bridge %[1]s ports { type ifname : verdict; }
add chain bridge %[1]s prerouting { type filter hook prerouting priority -200; policy accept; }
flush chain bridge %[1]s prerouting
add rule bridge %[1]s prerouting iifname vmap @ports
`, Table)
}

// linkLocal returns the EUI-64 IPv6 link-local address derived from mac.
func linkLocal(mac net.HardwareAddr) netip.Addr {
	var b [16]byte
	b[0], b[1] = 0xfe, 0x80
	b[8], b[9], b[10] = mac[0]^0x02, mac[1], mac[2]
	b[11], b[12] = 0xff, 0xfe
	b[13], b[14], b[15] = mac[3], mac[4], mac[5]
	return netip.AddrFrom16(b)
}

// ndTarget is an IPv6 address as the 128-bit integer nft compares a raw payload with.
func ndTarget(a netip.Addr) string {
	b := a.As16()
	return fmt.Sprintf("0x%x", b[:])
}

// FilterRules returns the nft script that installs (or replaces) the rules of one tap.
// A frame from the guest passes only if its source MAC is the NIC's MAC and it is ARP,
// IPv4 or IPv6 from one of the NIC's addresses; everything else is dropped. IPv4 DHCP
// requests from 0.0.0.0 and IPv6 from :: (duplicate address detection) and from the
// NIC's EUI-64 link-local address are allowed, and RARP (QEMU's announce after a
// migration) from the NIC's MAC. Neighbour advertisements must name the NIC's own
// addresses; DHCP server answers, router advertisements and redirects are dropped.
func FilterRules(f FilterSpec) (string, error) {
	mac, err := net.ParseMAC(f.MAC)
	if err != nil || len(mac) != 6 {
		return "", fmt.Errorf("Invalid MAC %q for tap %q", f.MAC, f.Tap)
	}
	if !validIfName(f.Tap) {
		return "", fmt.Errorf("Invalid tap name %q", f.Tap)
	}
	var v4, v6 []string
	for _, a := range f.IPv4 {
		ip, err := netip.ParseAddr(a)
		if err != nil || !ip.Is4() {
			return "", fmt.Errorf("Invalid IPv4 address %q for tap %q", a, f.Tap)
		}
		v4 = append(v4, ip.String())
	}
	for _, a := range f.IPv6 {
		ip, err := netip.ParseAddr(a)
		if err != nil || !ip.Is6() || ip.Is4In6() {
			return "", fmt.Errorf("Invalid IPv6 address %q for tap %q", a, f.Tap)
		}
		v6 = append(v6, ip.String())
	}
	ch := chainName(f.Tap)
	var b strings.Builder
	b.WriteString(baseRules())
	// Declare, then flush, so that re-applying replaces the rules atomically.
	fmt.Fprintf(&b, "add chain bridge %s %s\n", Table, ch)
	fmt.Fprintf(&b, "flush chain bridge %s %s\n", Table, ch)
	r := func(format string, a ...any) {
		fmt.Fprintf(&b, "add rule bridge %s %s "+format+"\n", append([]any{Table, ch}, a...)...)
	}
	r("ether saddr != %s drop", mac)
	r("ether type arp arp saddr ether != %s drop", mac)
	// RARP from the NIC's own MAC: QEMU announces a migrated guest with it, so that
	// the bridges learn its new port at once.
	r("ether type 0x8035 accept")
	if len(v4) > 0 {
		r("ether type arp arp saddr ip != { %s } drop", strings.Join(v4, ", "))
		r("ether type arp accept")
		r("ether type ip ip saddr 0.0.0.0 udp sport 68 udp dport 67 accept")
		r("ether type ip ip saddr != { %s } drop", strings.Join(v4, ", "))
		// A guest is never a DHCP server for its neighbours.
		r("ether type ip udp sport 67 drop")
		r("ether type ip accept")
	} else {
		r("ether type arp drop")
		r("ether type ip ip saddr 0.0.0.0 udp sport 68 udp dport 67 accept")
		r("ether type ip drop")
	}
	if len(v6) > 0 {
		ll := linkLocal(mac)
		allowed := append([]string{"::", ll.String()}, v6...)
		r("ether type ip6 ip6 saddr != { %s } drop", strings.Join(allowed, ", "))
		// Neighbour advertisements only for its own addresses (the target, 8 bytes into
		// the ICMPv6 header); no router advertisements, redirects or DHCPv6 server
		// answers: a guest can neither claim a neighbour's address nor become its router.
		targets := []string{ndTarget(ll)}
		for _, a := range v6 {
			targets = append(targets, ndTarget(netip.MustParseAddr(a)))
		}
		r("ether type ip6 icmpv6 type nd-neighbor-advert @th,64,128 != { %s } drop", strings.Join(targets, ", "))
		r("ether type ip6 icmpv6 type { nd-router-advert, nd-redirect } drop")
		r("ether type ip6 udp sport 547 drop")
		r("ether type ip6 accept")
	} else {
		r("ether type ip6 drop")
	}
	r("drop")
	fmt.Fprintf(&b, "add element bridge %s ports { \"%s\" : jump %s }\n", Table, f.Tap, ch)
	return b.String(), nil
}

// RemoveRules returns the nft script that removes one tap's rules.
func RemoveRules(tap string) string {
	return fmt.Sprintf("delete element bridge %s ports { \"%s\" }\ndelete chain bridge %s %s\n", Table, tap, Table, chainName(tap))
}

// ApplyFilter installs the anti-spoofing rules of one NIC.
func ApplyFilter(f FilterSpec) error {
	script, err := FilterRules(f)
	if err != nil {
		return err
	}
	if err := run(script, "nft", "-f", "-"); err != nil {
		return fmt.Errorf("Failed to install anti-spoofing rules for %q: %w", f.Tap, err)
	}
	return nil
}

// RemoveFilter removes the rules of one tap; rules that are already gone are not an error.
func RemoveFilter(tap string) error {
	if !validIfName(tap) {
		return fmt.Errorf("Invalid tap name %q", tap)
	}
	if err := run(RemoveRules(tap), "nft", "-f", "-"); err != nil {
		if strings.Contains(err.Error(), "No such file or directory") {
			return nil
		}
		return fmt.Errorf("Failed to remove anti-spoofing rules of %q: %w", tap, err)
	}
	return nil
}

func validIfName(s string) bool {
	if len(s) == 0 || len(s) > 15 {
		return false
	}
	for _, c := range s {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.') {
			return false
		}
	}
	return true
}
