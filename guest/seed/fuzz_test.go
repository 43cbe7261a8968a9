package seed

import "testing"

// FuzzParse: no document makes a parser panic, and what parses renders and parses back.
func FuzzParse(f *testing.F) {
	f.Add([]byte("version: 2\nethernets:\n  eth0:\n    addresses: [10.0.0.1/24]\n"))
	f.Add([]byte("network: {version: 2, ethernets: {e: {match: {macaddress: 'aa'}}}}"))
	f.Add([]byte("#cloud-config\ngrow_test: {run: [counter]}\nusers: [default, {name: x}]\n"))
	f.Add([]byte("instance-id: a\nlocal-hostname: b\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		if n, err := ParseNetworkConfig(b); err == nil {
			out, err := n.Marshal()
			if err != nil {
				t.Fatalf("parsed network-config does not render: %v", err)
			}
			if _, err := ParseNetworkConfig(out); err != nil {
				t.Fatalf("rendered network-config does not parse: %v\n%s", err, out)
			}
		}
		_, _ = ParseMetaData(b)
		_, _, _ = ParseUserData(b)
		_, _, _ = ParseUserData(append([]byte("#cloud-config\n"), b...))
	})
}
