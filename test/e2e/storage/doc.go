// Package storage holds the end-to-end tests of the storage controller: they start the
// real `grow storaged` binary in a temporary directory and drive it with real clients
// (nbdinfo, nbdcopy, qemu-img, qemu-io, QEMU, the grow CLI and a small NBD client).
// It has no code of its own besides the tests, and the tests must never touch anything
// outside their temporary directories or use anything but loopback.
package storage
