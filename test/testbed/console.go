package testbed

import (
	"errors"
	"fmt"
	"io"
	"os"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Console accumulates a guest's serial output and lets tests wait for lines in it.
// Feed it from any source: a QEMU console log file (TailFile), a socket or a
// websocket stream (Copy). Write, when set, types into the guest.
type Console struct {
	mu     sync.Mutex
	buf    []byte
	closed error
	notify chan struct{}
	cursor int // where Expect continues searching

	// In, when not nil, receives what Type sends.
	In io.Writer
}

// NewConsole returns an empty console.
func NewConsole() *Console { return &Console{notify: make(chan struct{})} }

// Write appends guest output (Console is an io.Writer, so a stream can be copied into it).
func (c *Console) Write(p []byte) (int, error) {
	c.mu.Lock()
	c.buf = append(c.buf, p...)
	ch := c.notify
	c.notify = make(chan struct{})
	c.mu.Unlock()
	close(ch)
	return len(p), nil
}

// CloseWithError marks the end of the output (the guest or the stream is gone).
func (c *Console) CloseWithError(err error) {
	if err == nil {
		err = io.EOF
	}
	c.mu.Lock()
	if c.closed == nil {
		c.closed = err
	}
	ch := c.notify
	c.notify = make(chan struct{})
	c.mu.Unlock()
	close(ch)
}

// Copy feeds the console from r until r ends, then closes the console with the reason.
func (c *Console) Copy(r io.Reader) {
	_, err := io.Copy(c, r)
	c.CloseWithError(err)
}

// TailFile feeds the console from a growing file (QEMU's chardev logfile) until stop is closed.
func (c *Console) TailFile(path string, stop <-chan struct{}) {
	var off int64
	buf := make([]byte, 64<<10)
	for {
		f, err := os.Open(path)
		if err == nil {
			for {
				n, rerr := f.ReadAt(buf, off)
				if n > 0 {
					off += int64(n)
					_, _ = c.Write(buf[:n])
				}
				if rerr != nil {
					break
				}
			}
			f.Close()
		}
		select {
		case <-stop:
			c.CloseWithError(errors.New("console closed"))
			return
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// Output returns everything the guest printed so far.
func (c *Console) Output() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return string(c.buf)
}

// Len returns how many bytes the guest printed so far: a mark for WaitFrom.
func (c *Console) Len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.buf)
}

// Tail returns the last n bytes of output, for error messages.
func (c *Console) Tail(n int) string {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.buf) > n {
		return string(c.buf[len(c.buf)-n:])
	}
	return string(c.buf)
}

// WaitFrom waits until re matches the output after byte offset from and returns the
// submatches and the offset just after the match.
func (c *Console) WaitFrom(from int, re *regexp.Regexp, timeout time.Duration) ([]string, int, error) {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		c.mu.Lock()
		if from > len(c.buf) {
			from = len(c.buf)
		}
		loc := re.FindSubmatchIndex(c.buf[from:])
		var m []string
		end := 0
		if loc != nil {
			for i := 0; i+1 < len(loc); i += 2 {
				if loc[i] < 0 {
					m = append(m, "")
					continue
				}
				m = append(m, string(c.buf[from+loc[i]:from+loc[i+1]]))
			}
			end = from + loc[1]
		}
		closed, ch := c.closed, c.notify
		c.mu.Unlock()
		if m != nil {
			return m, end, nil
		}
		if closed != nil {
			return nil, 0, fmt.Errorf("console ended (%v) before %q appeared; last output:\n%s", closed, re, c.Tail(2000))
		}
		select {
		case <-ch:
		case <-deadline.C:
			return nil, 0, fmt.Errorf("timed out after %s waiting for %q on the console; last output:\n%s", timeout, re, c.Tail(2000))
		}
	}
}

// WaitFor waits until re matches anywhere in the output and returns its submatches.
func (c *Console) WaitFor(re *regexp.Regexp, timeout time.Duration) ([]string, error) {
	m, _, err := c.WaitFrom(0, re, timeout)
	return m, err
}

// Expect waits for re after the previous Expect's match (a cursor), so that repeated
// prompts and answers are matched in order.
func (c *Console) Expect(re *regexp.Regexp, timeout time.Duration) ([]string, error) {
	c.mu.Lock()
	from := c.cursor
	c.mu.Unlock()
	m, end, err := c.WaitFrom(from, re, timeout)
	if err == nil {
		c.mu.Lock()
		c.cursor = end
		c.mu.Unlock()
	}
	return m, err
}

// Type sends s to the guest's console input.
func (c *Console) Type(s string) error {
	if c.In == nil {
		return errors.New("this console has no input")
	}
	if _, err := io.WriteString(c.In, s); err != nil {
		return fmt.Errorf("Failed to type on the console: %w", err)
	}
	return nil
}

// Ready is the guest's GROW-READY line.
type Ready struct {
	Hostname   string
	IPs        []string // CIDR addresses, IPv4 first
	InstanceID string
	Seed       bool   // a cidata seed was found
	Keys       int    // SSH keys installed
	Run        string // workloads started
	Root       string // "vda" when running from a disk, "initramfs" otherwise
}

// Console patterns include the line end, so a line still arriving is never half-read.
var readyRe = regexp.MustCompile(`GROW-READY ([^\r\n]*)\r?\n`)

// WaitReady waits for the guest's ready line (after offset from) and parses it.
func (c *Console) WaitReady(from int, timeout time.Duration) (Ready, error) {
	m, _, err := c.WaitFrom(from, readyRe, timeout)
	if err != nil {
		return Ready{}, err
	}
	return ParseReady(m[1]), nil
}

// ParseReady parses the fields of a GROW-READY line.
func ParseReady(fields string) Ready {
	var r Ready
	for _, f := range strings.Fields(fields) {
		k, v, _ := strings.Cut(f, "=")
		switch k {
		case "hostname":
			r.Hostname = v
		case "ip":
			if v != "none" {
				r.IPs = strings.Split(v, ",")
			}
		case "instance-id":
			r.InstanceID = v
		case "seed":
			r.Seed = v == "true"
		case "keys":
			r.Keys, _ = strconv.Atoi(v)
		case "run":
			r.Run = v
		case "root":
			r.Root = v
		}
	}
	return r
}

var (
	counterRe = regexp.MustCompile(`GROW-COUNTER n=(\d+)\r?\n`)
	ackRe     = regexp.MustCompile(`GROW-ACK seq=(\d+)\r?\n`)
)

func lastNumber(re *regexp.Regexp, s string) (uint64, bool) {
	all := re.FindAllStringSubmatch(s, -1)
	if len(all) == 0 {
		return 0, false
	}
	n, err := strconv.ParseUint(all[len(all)-1][1], 10, 64)
	return n, err == nil
}

// Counter returns the last value the serial counter printed.
func (c *Console) Counter() (uint64, bool) { return lastNumber(counterRe, c.Output()) }

// LastAck returns the last sequence number the disk writer reported as acknowledged.
func (c *Console) LastAck() (uint64, bool) { return lastNumber(ackRe, c.Output()) }

// WaitCounterAbove waits until the serial counter prints a value greater than n.
func (c *Console) WaitCounterAbove(n uint64, timeout time.Duration) (uint64, error) {
	return c.waitAbove(counterRe, "counter", n, timeout)
}

// WaitAckAbove waits until the disk writer acknowledges a sequence number greater than n.
func (c *Console) WaitAckAbove(n uint64, timeout time.Duration) (uint64, error) {
	return c.waitAbove(ackRe, "disk writer", n, timeout)
}

func (c *Console) waitAbove(re *regexp.Regexp, what string, n uint64, timeout time.Duration) (uint64, error) {
	deadline := time.Now().Add(timeout)
	from := 0
	for {
		rest := time.Until(deadline)
		if rest <= 0 {
			return 0, fmt.Errorf("timed out after %s waiting for the %s to pass %d; last output:\n%s", timeout, what, n, c.Tail(1000))
		}
		m, end, err := c.WaitFrom(from, re, rest)
		if err != nil {
			return 0, fmt.Errorf("waiting for the %s to pass %d: %w", what, n, err)
		}
		v, _ := strconv.ParseUint(m[1], 10, 64)
		if v > n {
			return v, nil
		}
		from = end
	}
}
