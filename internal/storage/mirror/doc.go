// Package mirror is the core of synchronous mirroring of volumes between two storage
// controllers: the replicating export that sends every write to both sides, the mirror
// link between the controllers, the persistent dirty-region bitmap used while a pair
// is degraded, resync of only the dirty regions, and the pure epoch/role state machine
// that keeps at most one side accepting writes.
//
// It must never acknowledge a write to a client that is not on both controllers while
// the pair is synced, never let a side whose epoch is older than its peer's accept a
// write or act as a resync source, and never lose track of a region that differs
// between the two sides: a region is either known equal on both or marked in the
// durable bitmap. It knows nothing about pools, caches, volumes' layout, HTTP or QEMU;
// the controller wires it in.
//
// # Roles and acknowledgement
//
// Each mirrored volume has a primary on one controller and a secondary on the other.
// Hosts talk NBD to the primary only. The primary's Volume (the replicating export)
// issues every WRITE, TRIM and WRITE_ZEROES to its local export and, in parallel, over
// the mirror link to the secondary, and acknowledges the client once both have
// acknowledged. FLUSH is sent to both and completes when both have made every
// completed write durable; a FUA write carries FUA to both sides. Reads are served
// from the primary's local export (and so from its cache). Two overlapping writes in
// flight at once are serialised by a range lock on the primary, so both sides apply
// them in the same order and cannot diverge.
//
// # The mirror link
//
// The link is a small framed protocol of this package over one TCP (later TLS)
// connection per volume, not NBD with a special export name. Reasons: every request
// must carry the sender's epoch so the secondary can refuse a deposed primary at the
// message level, which NBD has no field for; the nbd package is a server only, and an
// NBD client would have to be written anyway; and resync and epoch hand-over need
// operations NBD does not have. A connection opens with a hello (magic, volume name,
// size, epoch); the secondary refuses a wrong size or an older epoch and adopts a newer
// one. Requests are a fixed 36-byte header (magic, op, flags, cookie, offset, length,
// epoch) plus payload for writes; replies are 16 bytes (magic, error, cookie) and may
// come out of order. A stale-epoch reply is distinct from an I/O error: the primary
// that receives it has been deposed and must stop accepting writes.
//
// # Degraded mode and the dirty-region bitmap
//
// When the peer fails (connection lost, I/O error, timeout) the primary switches to
// degraded and keeps serving alone. Every write from then on first marks its regions
// (1 MiB by default) in the dirty-region bitmap; a region that was not yet marked is
// made durable in the bitmap file before the local write is issued, so a crash can
// never leave local data the bitmap does not cover. Re-writes of a marked region cost
// nothing extra. Writes the peer acknowledged but had not yet flushed are also tracked
// in memory since the peer's last successful FLUSH; on peer loss they are merged into
// the bitmap, because a crashed peer may have lost them. The bitmap file holds two
// CRC-protected slots written alternately, each with a sequence number, so a torn
// write of one slot leaves the other valid.
//
// # Resync
//
// When the peer is back and its epoch is older (it is stale), the primary copies only
// the marked regions to it, together with the regions the stale side marked itself
// (writes a deposed primary applied locally while learning it was fenced): region by region under the range lock, so client writes
// (which now go to both sides again) cannot be overwritten by older data, with an
// operator-set rate limit and a progress counter. Bits are cleared only after a FLUSH
// on the peer succeeded for the copied regions, and the cleared bitmap is persisted,
// so an interrupted resync resumes where it stopped. When the last region is copied,
// the pair is synced again.
//
// # Epochs, witness and splits
//
// Each volume has an epoch, persisted by both sides. Any change of who may write
// alone (primary goes degraded, secondary takes over) first obtains epoch+1 from a
// tie-breaker (the control plane or a small witness) with a compare-and-set: the
// witness grants an epoch only once. The loser of that race learns it is stale and
// refuses writes; a side that cannot reach the witness freezes (stalls writes) rather
// than guess. A synced primary cannot complete a write without the secondary, and the
// secondary refuses requests from an older epoch, so at most one side ever completes
// writes for an epoch. The resync source is always the side with the higher epoch. A
// state the rules cannot settle (both sides claim to have written alone, only possible
// after an operator override) is frozen-split and reported for `grow storage volume
// resolve`, which names the side to keep; the other side's differing regions are kept
// as a snapshot, never silently discarded. See State and Step for the pure rules.
//
// # What is here and what is not yet
//
// Here: Bitmap, State/Step/Witness, Link/LinkServer/Target (plain TCP or any net.Conn,
// e.g. TLS, via NewLink) and Volume (the replicating export with Resync). Not yet: the
// controller wiring (persisting State per volume, dialling the peer, re-dialling and
// resyncing when it returns, passing the stale side's bitmap as ResyncOptions.PeerDirty,
// the witness in the control plane) and the host path manager.
//
// # Write intent while synced
//
// While synced, a region is also made durable in the bitmap before the first write to
// it is issued, and cleared after a FLUSH on both sides that began after its last
// write completed. So a primary that crashes while synced restarts with every region
// it may have changed alone marked, and the partner's resync (given those bits as
// PeerDirty) makes them converge. Writes during a resync are not intent-marked yet.
//
// # Hosts follow the primary
//
// Planned (not here): each host runs a per-host path manager, a local NBD proxy on a
// unix socket that QEMU connects to with reconnect-delay, which knows both controllers'
// addresses and forwards to whichever currently reports itself primary for the volume.
// On failover the proxy's upstream fails, it asks the other controller, and replays
// unacknowledged requests there within QEMU's reconnect window, so the guest sees a
// stall and never an error.
package mirror
