// Package seed holds the cloud-init NoCloud seed documents the test guest understands
// (meta-data, network-config version 2, #cloud-config user-data): their Go types, how
// they render to the files of a seed and how the guest parses them back. It only
// converts documents; it must never touch devices or the network.
package seed

import (
	"bytes"
	"fmt"
	"strings"

	"go.yaml.in/yaml/v3"
)

// MetaData is the NoCloud meta-data file.
type MetaData struct {
	InstanceID    string `yaml:"instance-id,omitempty"`
	LocalHostname string `yaml:"local-hostname,omitempty"`
}

// NetworkConfig is a netplan-style network configuration, version 2.
type NetworkConfig struct {
	Version   int                 `yaml:"version"`
	Ethernets map[string]Ethernet `yaml:"ethernets,omitempty"`
}

// Ethernet configures one interface, matched by MAC address or name (or by its key).
type Ethernet struct {
	Match       *Match       `yaml:"match,omitempty"`
	SetName     string       `yaml:"set-name,omitempty"`
	DHCP4       bool         `yaml:"dhcp4,omitempty"`
	DHCP6       bool         `yaml:"dhcp6,omitempty"`
	Addresses   []string     `yaml:"addresses,omitempty"`
	Gateway4    string       `yaml:"gateway4,omitempty"`
	Gateway6    string       `yaml:"gateway6,omitempty"`
	Routes      []Route      `yaml:"routes,omitempty"`
	Nameservers *Nameservers `yaml:"nameservers,omitempty"`
	MTU         int          `yaml:"mtu,omitempty"`
}

// Match selects an interface.
type Match struct {
	MACAddress string `yaml:"macaddress,omitempty"`
	Name       string `yaml:"name,omitempty"`
}

// Route is a static route; To may be "default" or a CIDR.
type Route struct {
	To     string `yaml:"to"`
	Via    string `yaml:"via"`
	Metric int    `yaml:"metric,omitempty"`
}

// Nameservers lists DNS servers and search domains.
type Nameservers struct {
	Addresses []string `yaml:"addresses,omitempty"`
	Search    []string `yaml:"search,omitempty"`
}

// UserData is the subset of #cloud-config the test guest applies.
type UserData struct {
	Hostname          string    `yaml:"hostname,omitempty"`
	SSHAuthorizedKeys []string  `yaml:"ssh_authorized_keys,omitempty"`
	Users             []User    `yaml:"users,omitempty"`
	GrowTest          *GrowTest `yaml:"grow_test,omitempty"`
}

// User is a cloud-config user entry; the plain string form ("default") is accepted.
type User struct {
	Name              string   `yaml:"name,omitempty"`
	SSHAuthorizedKeys []string `yaml:"ssh_authorized_keys,omitempty"`
}

// UnmarshalYAML accepts both a user mapping and the bare string form.
func (u *User) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind == yaml.ScalarNode {
		u.Name = n.Value
		return nil
	}
	type plain User
	return n.Decode((*plain)(u))
}

// GrowTest selects the guest's test workloads (the "grow_test" key of user-data).
type GrowTest struct {
	Run             []string `yaml:"run,omitempty"`              // counter, diskwriter, responder
	Disk            string   `yaml:"disk,omitempty"`             // data disk: "vdb", "/dev/vdb" or "serial:NAME"
	Slots           uint64   `yaml:"slots,omitempty"`            // blocks in the writer's ring (default 4096)
	Port            int      `yaml:"port,omitempty"`             // responder TCP port (default 7777)
	HTTPPort        int      `yaml:"http_port,omitempty"`        // responder HTTP port (default 80)
	CounterInterval string   `yaml:"counter_interval,omitempty"` // Go duration (default 500ms)
	WriteInterval   string   `yaml:"write_interval,omitempty"`   // pause between writes (default 100ms)
}

// Marshal renders meta-data as YAML.
func (m MetaData) Marshal() ([]byte, error) { return marshal("", m) }

// Marshal renders network-config as YAML.
func (n NetworkConfig) Marshal() ([]byte, error) {
	if n.Version == 0 {
		n.Version = 2
	}
	return marshal("", n)
}

// Marshal renders user-data as a #cloud-config document.
func (u UserData) Marshal() ([]byte, error) { return marshal("#cloud-config\n", u) }

func marshal(header string, v any) ([]byte, error) {
	var buf bytes.Buffer
	buf.WriteString(header)
	enc := yaml.NewEncoder(&buf)
	enc.SetIndent(2)
	if err := enc.Encode(v); err != nil {
		return nil, fmt.Errorf("Failed to render %T: %w", v, err)
	}
	if err := enc.Close(); err != nil {
		return nil, fmt.Errorf("Failed to render %T: %w", v, err)
	}
	return buf.Bytes(), nil
}

// ParseMetaData parses a meta-data file.
func ParseMetaData(b []byte) (MetaData, error) {
	var m MetaData
	if err := yaml.Unmarshal(b, &m); err != nil {
		return MetaData{}, fmt.Errorf("Failed to parse meta-data: %w", err)
	}
	return m, nil
}

// ParseNetworkConfig parses network-config version 2, bare or under a "network" key.
func ParseNetworkConfig(b []byte) (NetworkConfig, error) {
	var wrapped struct {
		Network *NetworkConfig `yaml:"network"`
	}
	if err := yaml.Unmarshal(b, &wrapped); err != nil {
		return NetworkConfig{}, fmt.Errorf("Failed to parse network-config: %w", err)
	}
	var n NetworkConfig
	if wrapped.Network != nil {
		n = *wrapped.Network
	} else if err := yaml.Unmarshal(b, &n); err != nil {
		return NetworkConfig{}, fmt.Errorf("Failed to parse network-config: %w", err)
	}
	if n.Version != 2 && !(n.Version == 0 && len(n.Ethernets) == 0) {
		return NetworkConfig{}, fmt.Errorf("Unsupported network-config version %d (only version 2)", n.Version)
	}
	return n, nil
}

// ParseUserData parses #cloud-config user-data. Other user-data (scripts, MIME) gives
// ok=false and no error: the caller decides what to do with it.
func ParseUserData(b []byte) (u UserData, ok bool, err error) {
	if !strings.HasPrefix(string(b), "#cloud-config") {
		return UserData{}, false, nil
	}
	if err := yaml.Unmarshal(b, &u); err != nil {
		return UserData{}, false, fmt.Errorf("Failed to parse user-data: %w", err)
	}
	return u, true, nil
}

// AuthorizedKeys returns the SSH keys for root: the top-level ones and those of
// every user entry (the test guest has only root).
func (u UserData) AuthorizedKeys() []string {
	keys := append([]string(nil), u.SSHAuthorizedKeys...)
	for _, usr := range u.Users {
		keys = append(keys, usr.SSHAuthorizedKeys...)
	}
	return keys
}
