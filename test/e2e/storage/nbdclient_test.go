package storage

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"time"
)

// nbdConn is a minimal, independent NBD client for the tests (fixed newstyle,
// NBD_OPT_GO, simple replies, one request at a time): written from the protocol
// document so that the server is checked against the spec, not against itself.
type nbdConn struct {
	c      net.Conn
	size   int64
	flags  uint16
	cookie uint64
	hdr    [28]byte
}

const (
	nbdMagic         = 0x4e42444d41474943 // "NBDMAGIC"
	nbdOptMagic      = 0x49484156454f5054 // "IHAVEOPT"
	nbdRepMagic      = 0x3e889045565a9
	nbdReqMagic      = 0x25609513
	nbdSimpleMagic   = 0x67446698
	nbdOptGo         = 7
	nbdRepAck        = 1
	nbdRepInfo       = 3
	nbdInfoExport    = 0
	nbdCmdRead       = 0
	nbdCmdWrite      = 1
	nbdCmdDisc       = 2
	nbdCmdFlush      = 3
	nbdCmdTrim       = 4
	nbdCmdZeroes     = 6
	nbdCmdFlagFUA    = 1
	nbdFlagSendFlush = 1 << 2
	nbdFlagSendFUA   = 1 << 3
)

// dialNBD connects over network ("unix" or "tcp") and opens export name with NBD_OPT_GO.
func dialNBD(network, addr, name string) (*nbdConn, error) {
	c, err := net.DialTimeout(network, addr, 5*time.Second)
	if err != nil {
		return nil, err
	}
	n := &nbdConn{c: c}
	if err := n.handshake(name); err != nil {
		c.Close()
		return nil, fmt.Errorf("NBD handshake for %q: %w", name, err)
	}
	return n, nil
}

func (n *nbdConn) handshake(name string) error {
	_ = n.c.SetDeadline(time.Now().Add(10 * time.Second))
	defer n.c.SetDeadline(time.Time{})
	var greet [18]byte
	if _, err := io.ReadFull(n.c, greet[:]); err != nil {
		return err
	}
	if binary.BigEndian.Uint64(greet[0:]) != nbdMagic || binary.BigEndian.Uint64(greet[8:]) != nbdOptMagic {
		return errors.New("bad server greeting")
	}
	if binary.BigEndian.Uint16(greet[16:])&1 == 0 {
		return errors.New("server is not fixed newstyle")
	}
	// Client flags: FIXED_NEWSTYLE | NO_ZEROES.
	if err := binary.Write(n.c, binary.BigEndian, uint32(3)); err != nil {
		return err
	}
	data := make([]byte, 4+len(name)+2)
	binary.BigEndian.PutUint32(data, uint32(len(name)))
	copy(data[4:], name)
	opt := make([]byte, 16, 16+len(data))
	binary.BigEndian.PutUint64(opt, nbdOptMagic)
	binary.BigEndian.PutUint32(opt[8:], nbdOptGo)
	binary.BigEndian.PutUint32(opt[12:], uint32(len(data)))
	if _, err := n.c.Write(append(opt, data...)); err != nil {
		return err
	}
	for {
		var rep [20]byte
		if _, err := io.ReadFull(n.c, rep[:]); err != nil {
			return err
		}
		if binary.BigEndian.Uint64(rep[0:]) != nbdRepMagic {
			return errors.New("bad option reply magic")
		}
		typ := binary.BigEndian.Uint32(rep[12:])
		ln := binary.BigEndian.Uint32(rep[16:])
		if ln > 1<<20 {
			return fmt.Errorf("option reply of %d bytes", ln)
		}
		body := make([]byte, ln)
		if _, err := io.ReadFull(n.c, body); err != nil {
			return err
		}
		switch {
		case typ == nbdRepAck:
			if n.size == 0 && n.flags == 0 {
				return errors.New("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT")
			}
			return nil
		case typ == nbdRepInfo && len(body) >= 12 && binary.BigEndian.Uint16(body) == nbdInfoExport:
			n.size = int64(binary.BigEndian.Uint64(body[2:]))
			n.flags = binary.BigEndian.Uint16(body[10:])
		case typ&(1<<31) != 0:
			return fmt.Errorf("server refused the export: error reply %#x: %s", typ, body)
		}
	}
}

// request sends one command and waits for its simple reply, reading into rd for reads.
func (n *nbdConn) request(cmd uint16, flags uint16, off int64, length uint32, wr []byte, rd []byte) error {
	n.cookie++
	h := n.hdr[:]
	binary.BigEndian.PutUint32(h[0:], nbdReqMagic)
	binary.BigEndian.PutUint16(h[4:], flags)
	binary.BigEndian.PutUint16(h[6:], cmd)
	binary.BigEndian.PutUint64(h[8:], n.cookie)
	binary.BigEndian.PutUint64(h[16:], uint64(off))
	binary.BigEndian.PutUint32(h[24:], length)
	if _, err := n.c.Write(h); err != nil {
		return err
	}
	if wr != nil {
		if _, err := n.c.Write(wr); err != nil {
			return err
		}
	}
	var rep [16]byte
	if _, err := io.ReadFull(n.c, rep[:]); err != nil {
		return err
	}
	if binary.BigEndian.Uint32(rep[0:]) != nbdSimpleMagic {
		return fmt.Errorf("bad reply magic %#x", binary.BigEndian.Uint32(rep[0:]))
	}
	if got := binary.BigEndian.Uint64(rep[8:]); got != n.cookie {
		return fmt.Errorf("reply for cookie %d, want %d", got, n.cookie)
	}
	if e := binary.BigEndian.Uint32(rep[4:]); e != 0 {
		return fmt.Errorf("NBD error %d", e)
	}
	if rd != nil {
		if _, err := io.ReadFull(n.c, rd); err != nil {
			return err
		}
	}
	return nil
}

// ReadAt reads len(p) bytes at off.
func (n *nbdConn) ReadAt(p []byte, off int64) error {
	return n.request(nbdCmdRead, 0, off, uint32(len(p)), nil, p)
}

// WriteAt writes p at off, with FUA if asked.
func (n *nbdConn) WriteAt(p []byte, off int64, fua bool) error {
	var f uint16
	if fua {
		f = nbdCmdFlagFUA
	}
	return n.request(nbdCmdWrite, f, off, uint32(len(p)), p, nil)
}

// Flush asks for every completed write to be made durable.
func (n *nbdConn) Flush() error { return n.request(nbdCmdFlush, 0, 0, 0, nil, nil) }

// Trim discards a range.
func (n *nbdConn) Trim(off int64, length uint32) error {
	return n.request(nbdCmdTrim, 0, off, length, nil, nil)
}

// WriteZeroes makes a range read as zeroes.
func (n *nbdConn) WriteZeroes(off int64, length uint32, fua bool) error {
	var f uint16
	if fua {
		f = nbdCmdFlagFUA
	}
	return n.request(nbdCmdZeroes, f, off, length, nil, nil)
}

// Close ends the session politely.
func (n *nbdConn) Close() error {
	n.cookie++
	h := n.hdr[:]
	binary.BigEndian.PutUint32(h[0:], nbdReqMagic)
	binary.BigEndian.PutUint16(h[4:], 0)
	binary.BigEndian.PutUint16(h[6:], nbdCmdDisc)
	binary.BigEndian.PutUint64(h[8:], n.cookie)
	binary.BigEndian.PutUint64(h[16:], 0)
	binary.BigEndian.PutUint32(h[24:], 0)
	_, _ = n.c.Write(h)
	return n.c.Close()
}
