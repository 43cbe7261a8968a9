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
	received  map[int]bool
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
	p := &PingProbe{Target: target, received: map[int]bool{}, maxSeq: -1, done: make(chan struct{})}
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
			p.mu.Lock()
			p.received[seq] = true
			p.maxSeq = max(p.maxSeq, seq)
			p.lastReply = time.Now()
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
