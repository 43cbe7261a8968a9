package main

import (
	"bufio"
	"fmt"
	"net"
	"strings"
	"time"
)

func (st *state) line() string {
	return fmt.Sprintf("GROW-RESP hostname=%s counter=%d seq=%d\n", st.hostname, st.counter.Load(), st.acked.Load())
}

// startResponder answers every TCP connection on port with one status line, and
// every HTTP GET on httpPort with the same line.
func startResponder(st *state, port, httpPort int) error {
	ln, err := net.Listen("tcp", fmt.Sprintf(":%d", port))
	if err != nil {
		return fmt.Errorf("Failed to listen on TCP port %d: %w", port, err)
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				time.Sleep(100 * time.Millisecond)
				continue
			}
			go func() {
				defer c.Close()
				_ = c.SetWriteDeadline(time.Now().Add(5 * time.Second))
				_, _ = c.Write([]byte(st.line()))
			}()
		}
	}()
	hl, err := net.Listen("tcp", fmt.Sprintf(":%d", httpPort))
	if err != nil {
		return fmt.Errorf("Failed to listen on HTTP port %d: %w", httpPort, err)
	}
	go func() {
		for {
			c, err := hl.Accept()
			if err != nil {
				time.Sleep(100 * time.Millisecond)
				continue
			}
			go serveHTTP(st, c)
		}
	}()
	out.printf("GROW-RESPONDER port=%d http_port=%d", port, httpPort)
	return nil
}

// serveHTTP answers one HTTP/1.x request with the status line (a full HTTP server
// would triple the guest's size).
func serveHTTP(st *state, c net.Conn) {
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	r := bufio.NewReader(c)
	for {
		l, err := r.ReadString('\n')
		if err != nil {
			return
		}
		if strings.TrimSpace(l) == "" {
			break
		}
	}
	body := st.line()
	_, _ = fmt.Fprintf(c, "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s", len(body), body)
}
