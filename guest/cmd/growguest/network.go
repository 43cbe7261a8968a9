package main

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"

	"github.com/growserver/grow/guest/seed"
)

func ip(args ...string) error {
	out, err := exec.Command("ip", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ip %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// interfaces returns the guest's non-loopback interfaces with their MAC addresses.
func interfaces() map[string]string {
	m := map[string]string{}
	paths, _ := filepath.Glob("/sys/class/net/*")
	for _, p := range paths {
		name := filepath.Base(p)
		if name == "lo" {
			continue
		}
		mac, _ := os.ReadFile(filepath.Join(p, "address"))
		m[name] = strings.ToLower(strings.TrimSpace(string(mac)))
	}
	return m
}

// findInterface picks the interface an ethernets entry means.
func findInterface(id string, e seed.Ethernet, ifs map[string]string) (string, error) {
	if e.Match == nil {
		if _, ok := ifs[id]; ok {
			return id, nil
		}
		return "", fmt.Errorf("no interface named %q", id)
	}
	names := make([]string, 0, len(ifs))
	for n := range ifs {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		if e.Match.MACAddress != "" && !strings.EqualFold(ifs[n], e.Match.MACAddress) {
			continue
		}
		if e.Match.Name != "" {
			if ok, _ := filepath.Match(e.Match.Name, n); !ok {
				continue
			}
		}
		return n, nil
	}
	return "", fmt.Errorf("no interface matches %q (mac %q, name %q)", id, e.Match.MACAddress, e.Match.Name)
}

// configureNetwork applies static addresses and routes and returns the addresses set
// (IPv4 first, in CIDR form).
func configureNetwork(nc seed.NetworkConfig) ([]string, error) {
	var errs []error
	if err := ip("link", "set", "lo", "up"); err != nil {
		errs = append(errs, err)
	}
	ids := make([]string, 0, len(nc.Ethernets))
	for id := range nc.Ethernets {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	var v4, v6 []string
	var resolv []string
	var search []string
	for _, id := range ids {
		e := nc.Ethernets[id]
		ifs := interfaces()
		dev, err := findInterface(id, e, ifs)
		if err != nil {
			errs = append(errs, fmt.Errorf("Failed to configure ethernet %q: %w", id, err))
			continue
		}
		if e.SetName != "" && e.SetName != dev {
			if err := ip("link", "set", dev, "name", e.SetName); err != nil {
				errs = append(errs, err)
			} else {
				dev = e.SetName
			}
		}
		// Static configuration only: no router advertisements, no duplicate detection delay.
		_ = os.WriteFile("/proc/sys/net/ipv6/conf/"+dev+"/accept_ra", []byte("0"), 0o644)
		_ = os.WriteFile("/proc/sys/net/ipv6/conf/"+dev+"/accept_dad", []byte("0"), 0o644)
		if e.MTU > 0 {
			if err := ip("link", "set", dev, "mtu", fmt.Sprint(e.MTU)); err != nil {
				errs = append(errs, err)
			}
		}
		if err := ip("link", "set", dev, "up"); err != nil {
			errs = append(errs, err)
			continue
		}
		for _, a := range e.Addresses {
			addr, _, err := net.ParseCIDR(a)
			if err != nil {
				errs = append(errs, fmt.Errorf("Bad address %q on %s: %w", a, dev, err))
				continue
			}
			fam := "-4"
			if addr.To4() == nil {
				fam = "-6"
			}
			if err := ip(fam, "addr", "add", a, "dev", dev); err != nil {
				errs = append(errs, err)
				continue
			}
			if fam == "-4" {
				v4 = append(v4, a)
			} else {
				v6 = append(v6, a)
			}
		}
		routes := append([]seed.Route(nil), e.Routes...)
		if e.Gateway4 != "" {
			routes = append(routes, seed.Route{To: "0.0.0.0/0", Via: e.Gateway4})
		}
		if e.Gateway6 != "" {
			routes = append(routes, seed.Route{To: "::/0", Via: e.Gateway6})
		}
		for _, r := range routes {
			via := net.ParseIP(r.Via)
			if via == nil {
				errs = append(errs, fmt.Errorf("Bad route gateway %q on %s", r.Via, dev))
				continue
			}
			fam, to := "-4", r.To
			if via.To4() == nil {
				fam = "-6"
			}
			if to == "default" || to == "" {
				to = "default"
			}
			args := []string{fam, "route", "add", to, "via", r.Via, "dev", dev}
			if r.Metric > 0 {
				args = append(args, "metric", fmt.Sprint(r.Metric))
			}
			if err := ip(args...); err != nil {
				errs = append(errs, err)
			}
		}
		if e.Nameservers != nil {
			resolv = append(resolv, e.Nameservers.Addresses...)
			search = append(search, e.Nameservers.Search...)
		}
	}
	if len(resolv) > 0 || len(search) > 0 {
		var b strings.Builder
		if len(search) > 0 {
			fmt.Fprintf(&b, "search %s\n", strings.Join(search, " "))
		}
		for _, ns := range resolv {
			fmt.Fprintf(&b, "nameserver %s\n", ns)
		}
		if err := os.WriteFile("/etc/resolv.conf", []byte(b.String()), 0o644); err != nil {
			errs = append(errs, fmt.Errorf("Failed to write /etc/resolv.conf: %w", err))
		}
	}
	return append(v4, v6...), errors.Join(errs...)
}
