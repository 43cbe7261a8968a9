package network

import (
	"net"
	"strings"
	"testing"
)

func TestTapNames(t *testing.T) {
	a, b := TapName("web-1", 0), TapName("web-2", 0)
	if a == b || len(a) > 15 || !strings.HasPrefix(a, "gt") {
		t.Errorf("tap names %q %q", a, b)
	}
	if TapName("web-1", 0) != a {
		t.Error("tap name not stable")
	}
	if ifb := IfbName(a); len(ifb) > 15 || ifb == a || !strings.HasPrefix(ifb, "gi") {
		t.Errorf("ifb name %q", ifb)
	}
	mac, _ := net.ParseMAC("52:54:00:12:34:56")
	if got := TapMAC(mac).String(); got != "fe:54:00:12:34:56" {
		t.Errorf("TapMAC = %s", got)
	}
	if mac.String() != "52:54:00:12:34:56" {
		t.Error("TapMAC changed its argument")
	}
}

func TestFilterRules(t *testing.T) {
	s, err := FilterRules(FilterSpec{Tap: "gt1-0", MAC: "52:54:00:12:34:56", IPv4: []string{"10.0.0.5", "10.0.0.6"}, IPv6: []string{"2001:db8::5"}})
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"add table bridge grow",
		"add chain bridge grow prerouting { type filter hook prerouting priority -200; policy accept; }",
		"add rule bridge grow prerouting iifname vmap @ports",
		"flush chain bridge grow from-gt1-0",
		"add rule bridge grow from-gt1-0 ether saddr != 52:54:00:12:34:56 drop",
		"add rule bridge grow from-gt1-0 ether type arp arp saddr ether != 52:54:00:12:34:56 drop",
		"add rule bridge grow from-gt1-0 ether type arp arp saddr ip != { 10.0.0.5, 10.0.0.6 } drop",
		"add rule bridge grow from-gt1-0 ether type ip ip saddr != { 10.0.0.5, 10.0.0.6 } drop",
		"add rule bridge grow from-gt1-0 ether type ip6 ip6 saddr != { ::, fe80::5054:ff:fe12:3456, 2001:db8::5 } drop",
		"add rule bridge grow from-gt1-0 ether type ip udp sport 67 drop",
		"add rule bridge grow from-gt1-0 ether type ip6 icmpv6 type nd-neighbor-advert @th,64,128 != { 0xfe80000000000000505400fffe123456, 0x20010db8000000000000000000000005 } drop",
		"add rule bridge grow from-gt1-0 ether type ip6 icmpv6 type { nd-router-advert, nd-redirect } drop",
		"add rule bridge grow from-gt1-0 drop",
		`add element bridge grow ports { "gt1-0" : jump from-gt1-0 }`,
	} {
		if !strings.Contains(s, want+"\n") {
			t.Errorf("missing %q in\n%s", want, s)
		}
	}
	// The MAC check comes first, the catch-all drop last.
	lines := strings.Split(strings.TrimSpace(s), "\n")
	var chain []string
	for _, l := range lines {
		if strings.HasPrefix(l, "add rule bridge grow from-gt1-0 ") {
			chain = append(chain, strings.TrimPrefix(l, "add rule bridge grow from-gt1-0 "))
		}
	}
	if chain[0] != "ether saddr != 52:54:00:12:34:56 drop" || chain[len(chain)-1] != "drop" {
		t.Errorf("rule order: %v", chain)
	}
}

func TestFilterRulesWithoutAddresses(t *testing.T) {
	s, err := FilterRules(FilterSpec{Tap: "gt1-0", MAC: "52:54:00:12:34:56"})
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"ether type arp drop", "ether type ip drop", "ether type ip6 drop"} {
		if !strings.Contains(s, want) {
			t.Errorf("a NIC without addresses must not send %q:\n%s", want, s)
		}
	}
	if strings.Contains(s, "ether type ip accept") {
		t.Error("IPv4 accepted without an address")
	}
}

func TestFilterRulesRejectsBadInput(t *testing.T) {
	for _, f := range []FilterSpec{
		{Tap: "gt1-0", MAC: "nope"},
		{Tap: "gt1-0; flush ruleset", MAC: "52:54:00:12:34:56"},
		{Tap: "gt1-0", MAC: "52:54:00:12:34:56", IPv4: []string{"10.0.0.1 } accept {"}},
		{Tap: "gt1-0", MAC: "52:54:00:12:34:56", IPv6: []string{"10.0.0.1"}},
	} {
		if _, err := FilterRules(f); err == nil {
			t.Errorf("accepted %+v", f)
		}
	}
	if err := RemoveFilter("x\"; flush ruleset"); err == nil {
		t.Error("RemoveFilter accepted a hostile name")
	}
}

func TestShapeCommands(t *testing.T) {
	if c := ShapeCommands("gt1-0", 0, 0); len(c) != 0 {
		t.Errorf("unshaped NIC got commands %v", c)
	}
	in := ShapeCommands("gt1-0", 100_000_000, 0)
	if len(in) != 1 || strings.Join(in[0], " ") != "qdisc replace dev gt1-0 root tbf rate 100000000bit burst 250000 latency 100ms" {
		t.Errorf("in: %v", in)
	}
	out := ShapeCommands("gt1-0", 0, 8_000_000)
	joined := []string{}
	for _, c := range out {
		joined = append(joined, strings.Join(c, " "))
	}
	all := strings.Join(joined, "\n")
	for _, want := range []string{
		"qdisc replace dev gi1-0 root handle 1: htb default 1",
		"class replace dev gi1-0 parent 1: classid 1:1 htb rate 8000000bit ceil 8000000bit burst 32768",
		"qdisc replace dev gt1-0 handle ffff: ingress",
		"filter replace dev gt1-0 parent ffff: protocol all prio 1 u32 match u32 0 0 action mirred egress redirect dev gi1-0",
	} {
		if !strings.Contains(all, want) {
			t.Errorf("missing %q in\n%s", want, all)
		}
	}
}

func TestRARPFrame(t *testing.T) {
	mac, _ := net.ParseMAC("52:54:00:12:34:56")
	f := rarpFrame(mac)
	if len(f) != 60 || f[12] != 0x80 || f[13] != 0x35 || f[21] != 3 || net.HardwareAddr(f[6:12]).String() != "52:54:00:12:34:56" ||
		net.HardwareAddr(f[22:28]).String() != "52:54:00:12:34:56" || f[0] != 0xff {
		t.Errorf("frame % x", f)
	}
}
