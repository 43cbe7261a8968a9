// Package units parses and formats byte sizes such as "10GiB" or "512MiB".
package units

import (
	"fmt"
	"strconv"
	"strings"
)

// Binary and decimal size multipliers.
const (
	KiB int64 = 1 << 10
	MiB int64 = 1 << 20
	GiB int64 = 1 << 30
	TiB int64 = 1 << 40
)

var suffixes = []struct {
	s string
	m int64
}{
	{"KiB", KiB}, {"MiB", MiB}, {"GiB", GiB}, {"TiB", TiB},
	{"KB", 1000}, {"MB", 1000 * 1000}, {"GB", 1000 * 1000 * 1000}, {"TB", 1000 * 1000 * 1000 * 1000},
	{"K", KiB}, {"M", MiB}, {"G", GiB}, {"T", TiB},
	{"B", 1},
}

// ParseSize parses a size with an optional suffix (KiB, MiB, GiB, TiB, KB, MB, GB, TB, K, M, G, T, B).
// A bare number is bytes. Negative, fractional-byte or overflowing sizes are errors.
func ParseSize(s string) (int64, error) {
	in := strings.TrimSpace(s)
	if in == "" {
		return 0, fmt.Errorf("invalid size %q: empty", s)
	}
	mult := int64(1)
	num := in
	for _, suf := range suffixes {
		if strings.HasSuffix(strings.ToUpper(in), strings.ToUpper(suf.s)) && len(in) > len(suf.s) {
			// Require exact case for the "i" forms to stay unambiguous, but accept any case otherwise.
			num = strings.TrimSpace(in[:len(in)-len(suf.s)])
			mult = suf.m
			break
		}
	}
	if strings.ContainsAny(num, "eE") {
		return 0, fmt.Errorf("invalid size %q", s)
	}
	f, err := strconv.ParseFloat(num, 64)
	if err != nil || f < 0 {
		return 0, fmt.Errorf("invalid size %q: want a number with an optional suffix such as 10GiB or 512MiB", s)
	}
	v := f * float64(mult)
	if v > float64(1<<62) {
		return 0, fmt.Errorf("invalid size %q: too large", s)
	}
	if v != float64(int64(v)) {
		return 0, fmt.Errorf("invalid size %q: not a whole number of bytes", s)
	}
	return int64(v), nil
}

// FormatSize renders a byte count with the largest binary suffix that keeps it readable.
func FormatSize(n int64) string {
	switch {
	case n >= TiB && n%TiB == 0:
		return fmt.Sprintf("%dTiB", n/TiB)
	case n >= GiB && n%GiB == 0:
		return fmt.Sprintf("%dGiB", n/GiB)
	case n >= MiB && n%MiB == 0:
		return fmt.Sprintf("%dMiB", n/MiB)
	case n >= GiB:
		return fmt.Sprintf("%.1fGiB", float64(n)/float64(GiB))
	case n >= MiB:
		return fmt.Sprintf("%.1fMiB", float64(n)/float64(MiB))
	case n >= KiB:
		return fmt.Sprintf("%.1fKiB", float64(n)/float64(KiB))
	}
	return fmt.Sprintf("%dB", n)
}

// ParseRate parses a network rate in bits per second: a number with an optional
// decimal suffix k, M or G, optionally followed by "bit" or "bps" ("10Mbit", "1G",
// "500kbps"); "0" is no limit.
func ParseRate(s string) (uint64, error) {
	t := strings.TrimSpace(s)
	for _, unit := range []string{"bit/s", "bit", "bps"} {
		if strings.HasSuffix(t, unit) {
			t = strings.TrimSuffix(t, unit)
			break
		}
	}
	mult := uint64(1)
	if n := len(t); n > 0 {
		switch t[n-1] {
		case 'k', 'K':
			mult, t = 1000, t[:n-1]
		case 'M':
			mult, t = 1000*1000, t[:n-1]
		case 'G':
			mult, t = 1000*1000*1000, t[:n-1]
		}
	}
	v, err := strconv.ParseUint(t, 10, 64)
	if err != nil || v > (1<<63)/mult {
		return 0, fmt.Errorf("Invalid rate %q: want bits per second such as 10Mbit, 1G or 500k", s)
	}
	return v * mult, nil
}
