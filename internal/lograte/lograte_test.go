package lograte

import (
	"testing"
	"time"
)

// TestLimiter: Burst lines per second pass, the rest are counted and reported by the
// first line of the next second.
func TestLimiter(t *testing.T) {
	l := Limiter{Burst: 3}
	t0 := time.Unix(1000, 0)
	for i := range 3 {
		if n, ok := l.Allow(t0.Add(time.Duration(i) * time.Millisecond)); !ok || n != 0 {
			t.Fatalf("line %d: allowed %v with %d suppressed, want allowed with 0", i, ok, n)
		}
	}
	for i := range 5 {
		if _, ok := l.Allow(t0.Add(500 * time.Millisecond)); ok {
			t.Fatalf("line %d past the burst was allowed", 3+i)
		}
	}
	if n, ok := l.Allow(t0.Add(time.Second)); !ok || n != 5 {
		t.Fatalf("first line of the next second: allowed %v with %d suppressed, want allowed with 5", ok, n)
	}
}

// TestLimiterDefault: the zero value lets DefaultBurst lines through per second.
func TestLimiterDefault(t *testing.T) {
	var l Limiter
	now := time.Unix(1000, 0)
	for i := range DefaultBurst {
		if _, ok := l.Allow(now); !ok {
			t.Fatalf("line %d of the default burst was suppressed", i)
		}
	}
	if _, ok := l.Allow(now); ok {
		t.Fatal("a line past the default burst was allowed")
	}
}
