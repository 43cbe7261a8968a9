package testbed

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"regexp"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"
)

// PingProbe is a stream of ICMP echo requests every 50 ms from the client namespace
// (busybox ping), counting replies and the probes lost between them.
type PingProbe struct {
	Target string

	mu        sync.Mutex
	start     time.Time
	received  map[int]time.Time // when each answered probe's reply was read
	maxSeq    int
	lastReply time.Time
	done      chan struct{}
	stop      func()
}

// PingStats summarises a probe stream.
type PingStats struct {
	Received  int       // replies
	Lost      int       // probes before the newest reply that got no reply
	MaxSeq    int       // newest sequence number answered (-1: none)
	LastReply time.Time // when the newest reply arrived
}

var pingRe = regexp.MustCompile(`seq=(\d+) `)

// StartPing starts pinging target (an IPv4 address) from the client namespace every
// 50 ms until the test ends or Stop is called.
func (b *Bed) StartPing(t testing.TB, target string) *PingProbe {
	t.Helper()
	cmd := NetnsCommand(b.Client, "busybox", "ping", "-i", "0.05", "-W", "1", target)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatalf("Failed to start ping: %v", err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("Failed to start ping: %v", err)
	}
	p := &PingProbe{Target: target, start: time.Now(), received: map[int]time.Time{}, maxSeq: -1, done: make(chan struct{})}
	var once sync.Once
	p.stop = func() {
		once.Do(func() {
			_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-p.done
			_ = cmd.Wait()
		})
	}
	go func() {
		defer close(p.done)
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			m := pingRe.FindStringSubmatch(sc.Text())
			if m == nil {
				continue
			}
			seq, _ := strconv.Atoi(m[1])
			now := time.Now()
			p.mu.Lock()
			p.received[seq] = now
			p.maxSeq = max(p.maxSeq, seq)
			p.lastReply = now
			p.mu.Unlock()
		}
		_, _ = io.Copy(io.Discard, out)
	}()
	t.Cleanup(p.stop)
	return p
}

// Stats returns the counts so far.
func (p *PingProbe) Stats() PingStats {
	p.mu.Lock()
	defer p.mu.Unlock()
	s := PingStats{Received: len(p.received), MaxSeq: p.maxSeq, LastReply: p.lastReply}
	s.Lost = p.maxSeq + 1 - len(p.received)
	return s
}

// Missing returns the sequence numbers that got no reply between the first and the
// newest answered probe, in order.
func (p *PingProbe) Missing() []int {
	p.mu.Lock()
	defer p.mu.Unlock()
	var missing []int
	first := -1
	for s := 0; s <= p.maxSeq; s++ {
		if _, ok := p.received[s]; ok {
			if first < 0 {
				first = s
			}
		} else if first >= 0 {
			missing = append(missing, s)
		}
	}
	return missing
}

// LostBetween counts the probes after sequence number from and before to that got no reply.
func (p *PingProbe) LostBetween(from, to int) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for s := from + 1; s < to; s++ {
		if _, ok := p.received[s]; !ok {
			n++
		}
	}
	return n
}

// SentAround estimates when probe seq was sent: 50 ms after each probe since the
// newest answered one before it (to line a loss up with a log).
func (p *PingProbe) SentAround(seq int) time.Time {
	p.mu.Lock()
	defer p.mu.Unlock()
	for s := seq - 1; s >= 0; s-- {
		if at, ok := p.received[s]; ok {
			return at.Add(time.Duration(seq-s) * 50 * time.Millisecond)
		}
	}
	return p.start.Add(time.Duration(seq) * 50 * time.Millisecond)
}

// WaitReplies waits until n more replies than in since have arrived.
func (p *PingProbe) WaitReplies(since PingStats, n int, timeout time.Duration) (PingStats, error) {
	deadline := time.Now().Add(timeout)
	for {
		s := p.Stats()
		if s.Received >= since.Received+n {
			return s, nil
		}
		if time.Now().After(deadline) {
			return s, fmt.Errorf("only %d of %d ping replies from %s within %s", s.Received-since.Received, n, p.Target, timeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Stop ends the probe stream.
func (p *PingProbe) Stop() PingStats {
	p.stop()
	return p.Stats()
}

// Query connects to the guest responder at addr (e.g. 10.77.0.10:7777) from the
// client namespace and returns its status line.
func (b *Bed) Query(addr string, timeout time.Duration) (Response, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	c, err := DialContext(ctx, b.Client, "tcp", addr)
	if err != nil {
		return Response{}, fmt.Errorf("Failed to reach the responder at %s: %w", addr, err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(timeout))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return Response{}, fmt.Errorf("Failed to read from the responder at %s: %w", addr, err)
	}
	return ParseResponse(line)
}

// Response is the guest responder's status line.
type Response struct {
	Hostname string
	Counter  uint64
	Seq      uint64 // the disk writer's last acknowledged sequence number
}

var respRe = regexp.MustCompile(`GROW-RESP hostname=(\S+) counter=(\d+) seq=(\d+)`)

// ParseResponse parses a GROW-RESP line.
func ParseResponse(line string) (Response, error) {
	m := respRe.FindStringSubmatch(line)
	if m == nil {
		return Response{}, fmt.Errorf("not a responder line: %q", line)
	}
	c, _ := strconv.ParseUint(m[2], 10, 64)
	s, _ := strconv.ParseUint(m[3], 10, 64)
	return Response{Hostname: m[1], Counter: c, Seq: s}, nil
}

// DialFrom dials addr from inside namespace ns with a timeout (a convenience over DialContext).
func DialFrom(ns, network, addr string, timeout time.Duration) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	return DialContext(ctx, ns, network, addr)
}

// WaitQuery queries the guest responder at addr until it answers (every 200 ms, 3 s
// each), and fails the test after timeout.
func (b *Bed) WaitQuery(t testing.TB, addr string, timeout time.Duration) Response {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		r, err := b.Query(addr, 3*time.Second)
		if err == nil {
			return r
		}
		if time.Now().After(deadline) {
			t.Fatalf("the responder at %s did not answer within %s: %v", addr, timeout, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}
