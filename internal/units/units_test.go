package units

import "testing"

func TestParseSize(t *testing.T) {
	good := map[string]int64{
		"10GiB": 10 * GiB, "512MiB": 512 * MiB, "1.5GiB": 3 * GiB / 2, "4096": 4096,
		"1G": GiB, "2TB": 2e12, " 7 MiB ": 7 * MiB, "0": 0, "1KiB": 1024,
	}
	for in, want := range good {
		got, err := ParseSize(in)
		if err != nil || got != want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "-1GiB", "abc", "GiB", "1.3B", "1e9", "99999999999TiB", "10 XB"} {
		if got, err := ParseSize(in); err == nil {
			t.Errorf("ParseSize(%q) = %d, want an error", in, got)
		}
	}
}

func TestFormatSize(t *testing.T) {
	for n, want := range map[int64]string{10 * GiB: "10GiB", 512 * MiB: "512MiB", 100: "100B", 3 * GiB / 2: "1536MiB", GiB + 1: "1.0GiB"} {
		if got := FormatSize(n); got != want {
			t.Errorf("FormatSize(%d) = %q, want %q", n, got, want)
		}
	}
}

func TestParseRate(t *testing.T) {
	for in, want := range map[string]uint64{"0": 0, "10Mbit": 10e6, "1G": 1e9, "500k": 500e3, "500kbps": 500e3, "64000": 64000, " 2Mbit/s ": 2e6} {
		if got, err := ParseRate(in); err != nil || got != want {
			t.Errorf("ParseRate(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "fast", "-1M", "1.5M", "10MiB", "99999999999G"} {
		if _, err := ParseRate(bad); err == nil {
			t.Errorf("ParseRate(%q) accepted", bad)
		}
	}
}
