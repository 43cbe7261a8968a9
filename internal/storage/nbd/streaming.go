package nbd

import (
	"runtime"
	"time"
)

// Large READs whose data is copied to the socket (loopback TCP, TLS, exports that cannot
// splice) are served one after another by the connection's streamer, a goroutine that
// keeps its OS thread: that one thread reads the data and sends the reply, like
// nbdkit's per-connection threads. The scheduler then keeps that thread and the
// client's next to each other, so the client copies the reply out of a warm cache;
// with the replies sent by whichever thread ran a worker, a 1 MiB READ costs the client
// about 250 µs of CPU instead of 170 (bench/storage.sh, fio over loopback TCP).
//
// Serving one READ at a time is right for data in memory and wrong for a disk: when the
// streamer's READs take longer than streamSlow to get their data (a moving average, so
// that a thread preempted now and then does not count), it hands the next streamPause
// READs, those already waiting first, to the workers, which serve them in parallel.
const (
	// streamSlow is the longest the streamer's READs may take on average to get their
	// data before READs go to the workers for a while.
	streamSlow = time.Millisecond
	// streamPause is how many READs go to the workers after the streamer was slow.
	streamPause = 64
)

// streamOff turns the streamer off (for tests of the worker path).
var streamOff bool

// stream hands r to the connection's streamer when it is a large READ whose data will
// be copied, and reports whether it did.
func (c *conn) stream(r *request) bool {
	if r.typ != cmdRead || int(r.length) <= copyThreshold || c.splicer != nil || streamOff {
		return false
	}
	if c.streamq == nil {
		c.streamq = make(chan *request, c.maxWorkers)
		c.workers.Add(1)
		go c.streamer()
	}
	c.streamq <- r
	return true
}

// streamer serves the READs handed to it in order, on one OS thread, until the
// connection ends.
func (c *conn) streamer() {
	defer c.workers.Done()
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	var avg time.Duration
	pause := 0
	for r := range c.streamq {
		if pause > 0 {
			pause--
			c.dispatch(r)
			continue
		}
		c.srv.stats.requests.Add(1)
		c.srv.stats.streamed.Add(1)
		start := time.Now()
		r.errno = c.execute(r)
		avg += (time.Since(start) - avg) / 8
		if avg > streamSlow {
			c.srv.stats.streamPauses.Add(1)
			pause = streamPause
			// After the pause, a few slow READs in a row are needed to pause again.
			avg = streamSlow / 2
		}
		c.reply(r)
	}
}
