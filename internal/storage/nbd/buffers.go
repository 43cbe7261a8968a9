package nbd

import (
	"math/bits"
	"sync"
)

// Payload buffers are pooled by power-of-two size class from 4 KiB to MaxPayload, so
// the hot path reuses memory instead of allocating per request.
const minBufShift = 12

var bufPools [maxPayloadShift - minBufShift + 1]sync.Pool

// bufClass returns the pool index for a buffer of n bytes (1 <= n <= MaxPayload).
func bufClass(n int) int {
	if n <= 1<<minBufShift {
		return 0
	}
	return bits.Len(uint(n-1)) - minBufShift
}

// getBuf returns a pooled buffer of length n (n <= MaxPayload).
func getBuf(n int) *[]byte {
	c := bufClass(n)
	if v := bufPools[c].Get(); v != nil {
		b := v.(*[]byte)
		*b = (*b)[:n]
		return b
	}
	b := make([]byte, n, 1<<(c+minBufShift))
	return &b
}

// putBuf gives a buffer from getBuf back to its pool.
func putBuf(b *[]byte) {
	if b == nil || cap(*b) < 1<<minBufShift {
		return
	}
	bufPools[bufClass(cap(*b))].Put(b)
}

// budget bounds the requests in flight on one connection and the payload memory they hold.
type budget struct {
	mu       sync.Mutex
	cond     sync.Cond
	count    int
	bytes    int64
	maxCount int
	maxBytes int64
}

func newBudget(maxCount int, maxBytes int64) *budget {
	b := &budget{maxCount: maxCount, maxBytes: maxBytes}
	b.cond.L = &b.mu
	return b
}

// acquire waits until one more request holding n bytes fits (a lone request always fits).
func (b *budget) acquire(n int64) {
	b.mu.Lock()
	for b.count > 0 && (b.count >= b.maxCount || b.bytes+n > b.maxBytes) {
		b.cond.Wait()
	}
	b.count++
	b.bytes += n
	b.mu.Unlock()
}

// release returns what acquire(n) took.
func (b *budget) release(n int64) {
	b.mu.Lock()
	b.count--
	b.bytes -= n
	b.mu.Unlock()
	b.cond.Signal()
}
