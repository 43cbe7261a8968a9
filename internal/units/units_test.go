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
