package host

import (
	"bytes"
	"io"
	"net"
	"os"
	"sync"
	"time"
)

// scrollbackSize is how much recent console output a VM keeps for new viewers.
const scrollbackSize = 64 << 10

func sleepMS(n int) { time.Sleep(time.Duration(n) * time.Millisecond) }

// console connects to a VM's serial socket, keeps scrollback and fans output out to viewers.
type console struct {
	sock    string
	mu      sync.Mutex
	buf     []byte
	conn    net.Conn
	subs    map[chan []byte]struct{}
	closed  bool
	stopped chan struct{}
}

func newConsole(sock, logPath string) *console {
	c := &console{sock: sock, subs: map[chan []byte]struct{}{}, stopped: make(chan struct{})}
	// Seed the scrollback from QEMU's console log (covers output while no agent ran).
	if f, err := os.Open(logPath); err == nil {
		if st, err := f.Stat(); err == nil {
			off := st.Size() - scrollbackSize
			if off < 0 {
				off = 0
			}
			b := make([]byte, st.Size()-off)
			if n, _ := f.ReadAt(b, off); n > 0 {
				c.buf = b[:n]
			}
		}
		f.Close()
	}
	return c
}

// attach keeps a connection to the console socket until exited is closed.
func (c *console) attach(exited <-chan struct{}) {
	go func() {
		for {
			select {
			case <-exited:
				return
			case <-c.stopped:
				return
			default:
			}
			conn, err := net.DialTimeout("unix", c.sock, time.Second)
			if err != nil {
				sleepMS(100)
				continue
			}
			c.mu.Lock()
			if c.closed {
				c.mu.Unlock()
				conn.Close()
				return
			}
			c.conn = conn
			c.mu.Unlock()
			b := make([]byte, 4096)
			for {
				n, err := conn.Read(b)
				if n > 0 {
					c.publish(b[:n])
				}
				if err != nil {
					break
				}
			}
			c.mu.Lock()
			c.conn = nil
			c.mu.Unlock()
			conn.Close()
		}
	}()
}

func (c *console) publish(p []byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.buf = append(c.buf, p...)
	if len(c.buf) > scrollbackSize {
		c.buf = append([]byte(nil), c.buf[len(c.buf)-scrollbackSize:]...)
	}
	cp := append([]byte(nil), p...)
	for ch := range c.subs {
		select {
		case ch <- cp:
		default: // a viewer that cannot keep up loses output, never the VM
		}
	}
}

// note adds an agent message to the scrollback and to viewers.
func (c *console) note(s string) {
	if c != nil {
		c.publish([]byte(s))
	}
}

func (c *console) scrollback() []byte {
	if c == nil {
		return nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return bytes.Clone(c.buf)
}

// subscribe returns the scrollback and a channel of further output.
func (c *console) subscribe() ([]byte, chan []byte) {
	ch := make(chan []byte, 256)
	c.mu.Lock()
	defer c.mu.Unlock()
	c.subs[ch] = struct{}{}
	return bytes.Clone(c.buf), ch
}

func (c *console) unsubscribe(ch chan []byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.subs, ch)
}

// Write sends keyboard input to the guest's serial port.
func (c *console) Write(p []byte) (int, error) {
	c.mu.Lock()
	conn := c.conn
	c.mu.Unlock()
	if conn == nil {
		return 0, io.ErrClosedPipe
	}
	return conn.Write(p)
}

func (c *console) close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return
	}
	c.closed = true
	close(c.stopped)
	if c.conn != nil {
		c.conn.Close()
	}
}
