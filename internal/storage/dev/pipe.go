package dev

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// ErrPipeShort means a pipe held fewer bytes than a write promised.
var ErrPipeShort = errors.New("pipe holds less than the write")

// ReadPipe fills b from the non-blocking pipe fd, which must hold at least len(b)
// bytes (spliced writes that cannot be spliced further are read out with it).
func ReadPipe(fd int, b []byte) error {
	for len(b) > 0 {
		k, err := unix.Read(fd, b)
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN || (err == nil && k == 0):
			return ErrPipeShort
		case err != nil:
			return fmt.Errorf("Failed to read write data from a pipe: %w", err)
		}
		b = b[k:]
	}
	return nil
}
