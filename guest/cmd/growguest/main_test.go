package main

import (
	"testing"
	"time"

	"github.com/growserver/grow/guest/seed"
)

func TestCmdlineAndUserDataAddUp(t *testing.T) {
	cfg := defaultConfig()
	applyCmdline(&cfg, "console=ttyS0 grow.run=counter,diskwriter grow.disk=serial:data grow.slots=64 grow.port=9000 grow.write_interval=5ms quiet")
	if !cfg.run["counter"] || !cfg.run["diskwriter"] || cfg.run["responder"] {
		t.Fatalf("run %v", cfg.run)
	}
	if cfg.disk != "serial:data" || cfg.slots != 64 || cfg.port != 9000 || cfg.writeInterval != 5*time.Millisecond {
		t.Fatalf("config %+v", cfg)
	}
	err := applyGrowTest(&cfg, &seed.GrowTest{Run: []string{"responder", "dance"}, CounterInterval: "fast", HTTPPort: 8080})
	if err == nil {
		t.Fatal("an unknown workload and a bad interval were accepted")
	}
	if !cfg.run["responder"] || !cfg.run["counter"] || cfg.run["dance"] || cfg.httpPort != 8080 || cfg.counterInterval != 500*time.Millisecond {
		t.Fatalf("after user-data: %+v", cfg)
	}
}

func TestFindInterface(t *testing.T) {
	ifs := map[string]string{"eth0": "52:54:00:00:00:01", "eth1": "52:54:00:00:00:02"}
	cases := []struct {
		id   string
		e    seed.Ethernet
		want string // "" = no match
	}{
		{"eth1", seed.Ethernet{}, "eth1"},
		{"eth9", seed.Ethernet{}, ""},
		{"x", seed.Ethernet{Match: &seed.Match{MACAddress: "52:54:00:00:00:02"}}, "eth1"},
		{"x", seed.Ethernet{Match: &seed.Match{MACAddress: "52:54:00:00:00:0a"}}, ""},
		{"x", seed.Ethernet{Match: &seed.Match{MACAddress: "52:54:00:00:00:01"}}, "eth0"},
		{"x", seed.Ethernet{Match: &seed.Match{Name: "eth*"}}, "eth0"},
		{"x", seed.Ethernet{Match: &seed.Match{Name: "eth*", MACAddress: "52:54:00:00:00:02"}}, "eth1"},
		{"x", seed.Ethernet{Match: &seed.Match{Name: "ens*"}}, ""},
	}
	for _, c := range cases {
		got, err := findInterface(c.id, c.e, ifs)
		if c.want == "" {
			if err == nil {
				t.Errorf("%s %+v matched %s, want no match", c.id, c.e.Match, got)
			}
			continue
		}
		if err != nil || got != c.want {
			t.Errorf("%s %+v: got %q, %v; want %s", c.id, c.e.Match, got, err, c.want)
		}
	}
}
