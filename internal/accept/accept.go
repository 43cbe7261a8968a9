// Package accept keeps a server's accept loop alive through errors that pass, such as
// running out of file descriptors (EMFILE) or a connection aborted before it was
// accepted: the loop pauses and accepts again instead of stopping for good.
package accept

import (
	"errors"
	"net"
	"time"
)

const (
	// minDelay is the first pause after an accept error.
	minDelay = 5 * time.Millisecond
	// maxDelay caps the pause while errors repeat.
	maxDelay = time.Second
)

// Backoff paces the retries of one accept loop. The zero value is ready to use.
type Backoff struct {
	delay time.Duration
}

// Retry reports whether the loop should accept again after err: false for a closed
// listener, else true after a pause that doubles from 5 ms to 1 s while errors repeat.
func (b *Backoff) Retry(err error) bool {
	if errors.Is(err, net.ErrClosed) {
		return false
	}
	b.delay = min(max(2*b.delay, minDelay), maxDelay)
	time.Sleep(b.delay)
	return true
}

// Delay returns the pause of the last Retry.
func (b *Backoff) Delay() time.Duration { return b.delay }

// Reset starts the pauses over after a connection was accepted.
func (b *Backoff) Reset() { b.delay = 0 }
