package network

import (
	"fmt"

	"github.com/vishvananda/netlink"
)

// burstBytes is the token bucket size for a rate: 20 ms worth, at least 32 KiB, so
// the measured rate stays close to the set one at any HZ.
func burstBytes(rateBps uint64) uint64 {
	b := rateBps / 8 / 50
	if b < 32<<10 {
		b = 32 << 10
	}
	return b
}

// ShapeCommands returns the tc commands that shape one tap: in (to the guest) with tbf
// on the tap's root, out (from the guest) with the tap's ingress redirected to ifb
// where htb limits it. A zero rate leaves that direction unshaped.
func ShapeCommands(tap string, in, out uint64) [][]string {
	var cmds [][]string
	if in > 0 {
		cmds = append(cmds, []string{"qdisc", "replace", "dev", tap, "root", "tbf",
			"rate", fmt.Sprintf("%dbit", in), "burst", fmt.Sprint(burstBytes(in)), "latency", "100ms"})
	}
	if out > 0 {
		ifb := IfbName(tap)
		cmds = append(cmds,
			[]string{"qdisc", "replace", "dev", ifb, "root", "handle", "1:", "htb", "default", "1"},
			[]string{"class", "replace", "dev", ifb, "parent", "1:", "classid", "1:1", "htb",
				"rate", fmt.Sprintf("%dbit", out), "ceil", fmt.Sprintf("%dbit", out), "burst", fmt.Sprint(burstBytes(out))},
			[]string{"qdisc", "replace", "dev", tap, "handle", "ffff:", "ingress"},
			[]string{"filter", "replace", "dev", tap, "parent", "ffff:", "protocol", "all", "prio", "1", "u32",
				"match", "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", ifb})
	}
	return cmds
}

// Shape applies rates (bits per second, 0 = unlimited) to a tap.
func Shape(tap string, in, out uint64) error {
	if !validIfName(tap) {
		return fmt.Errorf("Invalid tap name %q", tap)
	}
	if out > 0 {
		ifb := IfbName(tap)
		if _, err := netlink.LinkByName(ifb); err != nil {
			if err := netlink.LinkAdd(&netlink.Ifb{LinkAttrs: netlink.LinkAttrs{Name: ifb, TxQLen: 1000}}); err != nil {
				return fmt.Errorf("Failed to create ifb %q for %q: %w", ifb, tap, err)
			}
		}
		l, err := netlink.LinkByName(ifb)
		if err != nil {
			return fmt.Errorf("Failed to look up ifb %q: %w", ifb, err)
		}
		if err := netlink.LinkSetUp(l); err != nil {
			return fmt.Errorf("Failed to bring ifb %q up: %w", ifb, err)
		}
	}
	for _, c := range ShapeCommands(tap, in, out) {
		if err := run("", "tc", c...); err != nil {
			return fmt.Errorf("Failed to shape %q: %w", tap, err)
		}
	}
	return nil
}

// Reshape sets a tap's rates while its guest runs: its shaping is removed and, for a
// direction whose rate is not 0, applied again as Shape does (htb cannot be changed in
// place by "replace").
func Reshape(tap string, in, out uint64) error {
	if !validIfName(tap) {
		return fmt.Errorf("Invalid tap name %q", tap)
	}
	_ = run("", "tc", "qdisc", "del", "dev", tap, "root")
	_ = run("", "tc", "qdisc", "del", "dev", tap, "ingress")
	if _, err := netlink.LinkByName(IfbName(tap)); err == nil {
		_ = run("", "tc", "qdisc", "del", "dev", IfbName(tap), "root")
	}
	return Shape(tap, in, out)
}
