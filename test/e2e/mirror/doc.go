// Package mirror holds the end-to-end tests of synchronous mirroring between two
// `grow storaged` controllers (issue 5): a pair of real controllers, a witness and real
// guests on the namespace test bed (test/testbed.StartStoragePair), with controllers
// killed, partitioned, drained and resynced under the guests' sequence-numbered disk
// writer. It has no code of its own besides the tests; the tests must never use
// anything but loopback and the namespaces the bed creates, and must leave no process
// behind.
package mirror
