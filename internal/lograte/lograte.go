// Package lograte limits how often a repeated log line is written: a burst per second,
// with a count of the lines suppressed meanwhile carried by the next one logged.
package lograte

import (
	"sync"
	"time"
)

// DefaultBurst is the lines per second a Limiter without Burst lets through.
const DefaultBurst = 10

// Limiter lets Burst log lines through per second and counts the rest. The zero value
// is ready to use; it is safe for concurrent use.
type Limiter struct {
	// Burst is how many lines pass per second; zero means DefaultBurst.
	Burst int

	mu         sync.Mutex
	window     time.Time
	count      int
	suppressed int
}

// Allow reports whether to log now, and how many lines were suppressed since the last one logged.
func (l *Limiter) Allow(now time.Time) (int, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if now.Sub(l.window) >= time.Second {
		l.window, l.count = now, 0
	}
	burst := l.Burst
	if burst <= 0 {
		burst = DefaultBurst
	}
	if l.count >= burst {
		l.suppressed++
		return 0, false
	}
	l.count++
	n := l.suppressed
	l.suppressed = 0
	return n, true
}
