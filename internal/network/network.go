// Package network gives each VM NIC its host side: a tap on a bridge, anti-spoofing
// rules (nftables, bridge family) so a guest can only send from its own MAC and IP
// addresses, traffic shaping (tbf towards the guest, ifb + htb from it) and byte
// counters. It must never touch interfaces it did not create, other than the bridge it
// is told to use, and it holds no state: the agent persists what must survive restarts.
package network

import (
	"bytes"
	"errors"
	"fmt"
	"hash/fnv"
	"net"
	"os/exec"
	"strings"

	"github.com/vishvananda/netlink"
)

// TapName returns the tap name of NIC idx of a VM: short, stable and unique per VM name.
func TapName(vm string, idx int) string {
	return fmt.Sprintf("gt%08x-%d", hash32(vm), idx)
}

// IfbName returns the ifb device that shapes traffic coming from tap.
func IfbName(tap string) string {
	return "gi" + strings.TrimPrefix(tap, "gt")
}

func hash32(s string) uint32 {
	h := fnv.New32a()
	_, _ = h.Write([]byte(s))
	return h.Sum32()
}

// EnsureBridge creates the bridge if it does not exist and brings it up.
func EnsureBridge(name string) error {
	l, err := netlink.LinkByName(name)
	if err != nil {
		var nf netlink.LinkNotFoundError
		if !errors.As(err, &nf) {
			return fmt.Errorf("Failed to look up bridge %q: %w", name, err)
		}
		br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: name}}
		if err := netlink.LinkAdd(br); err != nil {
			return fmt.Errorf("Failed to create bridge %q: %w", name, err)
		}
		if l, err = netlink.LinkByName(name); err != nil {
			return fmt.Errorf("Failed to look up new bridge %q: %w", name, err)
		}
	}
	if l.Type() != "bridge" {
		return fmt.Errorf("Interface %q exists and is a %s, not a bridge", name, l.Type())
	}
	if err := netlink.LinkSetUp(l); err != nil {
		return fmt.Errorf("Failed to bring bridge %q up: %w", name, err)
	}
	return nil
}

// TapMAC is the host-side MAC of the tap of a NIC with guest MAC mac: the guest's MAC
// with its first byte set to 0xfe. A bridge without an explicit MAC takes the lowest
// MAC of its ports; taps that sort above every real NIC never change the bridge's MAC
// (which would make every neighbour's ARP entry for the host stale).
func TapMAC(mac net.HardwareAddr) net.HardwareAddr {
	t := append(net.HardwareAddr(nil), mac...)
	t[0] = 0xfe
	return t
}

// CreateTap (re)creates a persistent tap for QEMU, enslaves it to bridge and brings it
// up; guestMAC is the MAC of the NIC inside the guest.
func CreateTap(name, bridge, guestMAC string) error {
	gm, err := net.ParseMAC(guestMAC)
	if err != nil || len(gm) != 6 {
		return fmt.Errorf("Invalid guest MAC %q for tap %q", guestMAC, name)
	}
	br, err := netlink.LinkByName(bridge)
	if err != nil {
		return fmt.Errorf("Failed to find bridge %q for tap %q: %w", bridge, name, err)
	}
	_ = DeleteTap(name)
	tap := &netlink.Tuntap{
		LinkAttrs: netlink.LinkAttrs{Name: name, MTU: br.Attrs().MTU, HardwareAddr: TapMAC(gm)},
		Mode:      netlink.TUNTAP_MODE_TAP,
		Flags:     netlink.TUNTAP_NO_PI | netlink.TUNTAP_VNET_HDR | netlink.TUNTAP_ONE_QUEUE,
	}
	if err := netlink.LinkAdd(tap); err != nil {
		return fmt.Errorf("Failed to create tap %q: %w", name, err)
	}
	l, err := netlink.LinkByName(name)
	if err != nil {
		return fmt.Errorf("Failed to look up tap %q: %w", name, err)
	}
	if err := netlink.LinkSetHardwareAddr(l, TapMAC(gm)); err != nil {
		_ = netlink.LinkDel(l)
		return fmt.Errorf("Failed to set the MAC of tap %q: %w", name, err)
	}
	if err := netlink.LinkSetMaster(l, br); err != nil {
		_ = netlink.LinkDel(l)
		return fmt.Errorf("Failed to add tap %q to bridge %q: %w", name, bridge, err)
	}
	if err := netlink.LinkSetUp(l); err != nil {
		_ = netlink.LinkDel(l)
		return fmt.Errorf("Failed to bring tap %q up: %w", name, err)
	}
	return nil
}

// DeleteTap removes a tap and its ifb (missing devices are not an error).
func DeleteTap(name string) error {
	var errs []error
	for _, n := range []string{IfbName(name), name} {
		l, err := netlink.LinkByName(n)
		if err != nil {
			continue
		}
		if err := netlink.LinkDel(l); err != nil {
			errs = append(errs, fmt.Errorf("Failed to delete %q: %w", n, err))
		}
	}
	return errors.Join(errs...)
}

// TapExists reports whether a network device of that name exists.
func TapExists(name string) bool {
	_, err := netlink.LinkByName(name)
	return err == nil
}

// ReadCounters returns the bytes the guest received (the tap's tx) and sent (its rx).
// It asks the kernel over netlink, which answers for the caller's network namespace
// (sysfs may show another one when the agent runs inside a namespace).
func ReadCounters(tap string) (rx, tx uint64, err error) {
	l, err := netlink.LinkByName(tap)
	if err != nil {
		return 0, 0, fmt.Errorf("Failed to read counters of %q: %w", tap, err)
	}
	st := l.Attrs().Statistics
	if st == nil {
		return 0, 0, fmt.Errorf("Interface %q reports no statistics", tap)
	}
	return st.TxBytes, st.RxBytes, nil
}

// run executes a command and returns its error with its stderr.
func run(stdin string, name string, args ...string) error {
	cmd := exec.Command(name, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if stdin != "" {
		cmd.Stdin = strings.NewReader(stdin)
	}
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(out.String()))
	}
	return nil
}
