package seed

import (
	"reflect"
	"strings"
	"testing"
)

func TestRoundTrip(t *testing.T) {
	nc := NetworkConfig{Ethernets: map[string]Ethernet{
		"eth0": {
			Match:       &Match{MACAddress: "52:54:00:aa:bb:cc"},
			Addresses:   []string{"10.0.0.5/24", "fd00::5/64"},
			Gateway4:    "10.0.0.1",
			Routes:      []Route{{To: "192.168.0.0/16", Via: "10.0.0.254", Metric: 50}},
			Nameservers: &Nameservers{Addresses: []string{"10.0.0.1"}, Search: []string{"example.net"}},
		},
	}}
	b, err := nc.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	got, err := ParseNetworkConfig(b)
	if err != nil {
		t.Fatal(err)
	}
	nc.Version = 2
	if !reflect.DeepEqual(got, nc) {
		t.Fatalf("round trip:\n%s\ngot  %+v\nwant %+v", b, got, nc)
	}

	u := UserData{SSHAuthorizedKeys: []string{"ssh-ed25519 AAAA a@b"},
		GrowTest: &GrowTest{Run: []string{"counter", "responder"}, WriteInterval: "10ms"}}
	ub, err := u.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(string(ub), "#cloud-config\n") {
		t.Fatalf("user-data does not start with #cloud-config:\n%s", ub)
	}
	pu, ok, err := ParseUserData(ub)
	if err != nil || !ok || !reflect.DeepEqual(pu, u) {
		t.Fatalf("user-data round trip: %+v %v %v", pu, ok, err)
	}

	m := MetaData{InstanceID: "i-1", LocalHostname: "web1"}
	mb, _ := m.Marshal()
	pm, err := ParseMetaData(mb)
	if err != nil || pm != m {
		t.Fatalf("meta-data round trip: %+v %v", pm, err)
	}
}

// Documents written the way people write them for cloud-init are understood.
func TestParsesCloudInitStyle(t *testing.T) {
	n, err := ParseNetworkConfig([]byte(`network:
  version: 2
  ethernets:
    id0:
      match: {macaddress: "52:54:00:12:34:56"}
      set-name: eth0
      addresses:
        - 192.0.2.10/24
      routes:
        - to: default
          via: 192.0.2.1
`))
	if err != nil {
		t.Fatal(err)
	}
	e := n.Ethernets["id0"]
	if e.SetName != "eth0" || e.Match.MACAddress != "52:54:00:12:34:56" || e.Routes[0].To != "default" {
		t.Fatalf("parsed %+v", e)
	}
	// JSON is YAML too.
	if _, err := ParseNetworkConfig([]byte(`{"version": 2, "ethernets": {"eth0": {"addresses": ["10.1.1.1/24"]}}}`)); err != nil {
		t.Fatal(err)
	}
	u, ok, err := ParseUserData([]byte("#cloud-config\nusers:\n  - default\n  - name: root\n    ssh_authorized_keys: [\"ssh-rsa AAAA x\"]\nssh_authorized_keys:\n  - ssh-ed25519 BBBB y\n"))
	if err != nil || !ok {
		t.Fatalf("user-data: %v %v", ok, err)
	}
	if keys := u.AuthorizedKeys(); len(keys) != 2 {
		t.Fatalf("keys %v", keys)
	}
	if _, ok, err := ParseUserData([]byte("#!/bin/sh\necho hi\n")); ok || err != nil {
		t.Fatalf("script user-data: ok=%v err=%v", ok, err)
	}
}

func TestRejectsBadInput(t *testing.T) {
	if _, err := ParseNetworkConfig([]byte("version: 1\nconfig: []\n")); err == nil {
		t.Fatal("network-config version 1 accepted")
	}
	if _, err := ParseNetworkConfig([]byte("version: 2\nethernets: [a, b]\n")); err == nil {
		t.Fatal("malformed ethernets accepted")
	}
	if _, _, err := ParseUserData([]byte("#cloud-config\ngrow_test: {run: counter: x}\n")); err == nil {
		t.Fatal("malformed user-data accepted")
	}
}
