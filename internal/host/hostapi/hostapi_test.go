package hostapi

import (
	"strings"
	"testing"
)

func valid() VMSpec {
	return VMSpec{Name: "vm-1", VCPUs: 1, MemoryMiB: 256,
		Disks: []Disk{{ID: "root", Socket: "/run/nbd.sock", Export: "v"}},
		NICs:  []NIC{{MAC: "52:54:00:AB:cd:01", IPv4: []string{"10.0.0.2"}, IPv6: []string{"2001:db8::2"}}},
	}
}

func TestValidateDefaults(t *testing.T) {
	s := valid()
	if err := s.Validate(); err != nil {
		t.Fatal(err)
	}
	if s.CPUModel != DefaultCPUModel || s.MaxVCPUs != 1 || s.MaxMemMiB != 256 {
		t.Errorf("defaults not filled: %+v", s)
	}
	if s.NICs[0].MAC != "52:54:00:ab:cd:01" {
		t.Errorf("MAC not normalised: %q", s.NICs[0].MAC)
	}
}

func TestValidateRejects(t *testing.T) {
	cases := map[string]func(s *VMSpec){
		"Invalid VM name":          func(s *VMSpec) { s.Name = "Web_1" },
		"VM name \"\"":             func(s *VMSpec) { s.Name = "" },
		"Invalid vcpus":            func(s *VMSpec) { s.VCPUs = 0 },
		"Invalid max_vcpus":        func(s *VMSpec) { s.MaxVCPUs = 1; s.VCPUs = 2 },
		"Invalid memory_mib":       func(s *VMSpec) { s.MemoryMiB = 8 },
		"max_memory_mib":           func(s *VMSpec) { s.MaxMemMiB = 128 },
		"Invalid cpu_model":        func(s *VMSpec) { s.CPUModel = "host,+vmx" },
		"Invalid disk id":          func(s *VMSpec) { s.Disks[0].ID = "Root Disk" },
		"Duplicate disk id":        func(s *VMSpec) { s.Disks = append(s.Disks, s.Disks[0]) },
		"exactly one":              func(s *VMSpec) { s.Disks[0].Host = "h" },
		"invalid port":             func(s *VMSpec) { s.Disks[0].Socket = ""; s.Disks[0].Host = "h" },
		"absolute path":            func(s *VMSpec) { s.Disks[0].Socket = "nbd.sock" },
		"reconnect_delay":          func(s *VMSpec) { s.Disks[0].ReconnectDelay = -1 },
		"invalid host":             func(s *VMSpec) { s.Disks[0].Socket = ""; s.Disks[0].Host = "h,x"; s.Disks[0].Port = 1 },
		"invalid MAC":              func(s *VMSpec) { s.NICs[0].MAC = "52:54:00:00:01" },
		"multicast":                func(s *VMSpec) { s.NICs[0].MAC = "01:00:5e:00:00:01" },
		"duplicate MAC":            func(s *VMSpec) { s.NICs = append(s.NICs, s.NICs[0]) },
		"invalid IPv4":             func(s *VMSpec) { s.NICs[0].IPv4 = []string{"2001:db8::1"} },
		"invalid IPv6":             func(s *VMSpec) { s.NICs[0].IPv6 = []string{"10.0.0.1"} },
		"invalid bridge":           func(s *VMSpec) { s.NICs[0].Bridge = "a-very-long-bridge-name" },
		"neither a disk":           func(s *VMSpec) { s.Disks = nil },
		"kernel":                   func(s *VMSpec) { s.Boot = &DirectBoot{Kernel: "vmlinuz"} },
		"meta_data":                func(s *VMSpec) { s.Seed = &Seed{} },
		"cpu_percent":              func(s *VMSpec) { s.Limits.CPUPercent = -5 },
		"below the guest memory":   func(s *VMSpec) { s.Limits.MemoryMaxBytes = 100 << 20 },
		"tls_creds_dir must be an": func(s *VMSpec) { s.Disks[0].TLSCredsDir = "pki" },
	}
	for want, mutate := range cases {
		s := valid()
		mutate(&s)
		err := s.Validate()
		if err == nil {
			t.Errorf("%s: accepted", want)
			continue
		}
		if !strings.Contains(err.Error(), want) {
			t.Errorf("%s: error %q does not say so", want, err)
		}
	}
}
