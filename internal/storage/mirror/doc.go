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
// that receives it has been deposed and must stop accepting writes. On each side the
// sender (of a request or a reply) that finds no write in progress writes its own and
// every one queued meanwhile in one syscall, while the others only queue (requests as
// one writev, headers and small payloads copied together, large payloads from the
// caller's buffer). The secondary's reader applies plain writes itself, in arrival
// order, from one reused buffer (they only copy into the page cache), and answers them
// in one write once it has no further request buffered; FLUSH, FUA writes, trims and
// zeroes, which may wait for the disks, run on workers kept for the connection's life.
// A replicated write thus costs the primary no goroutine, the secondary no hand-off,
// and, under load, a fraction of a syscall on each side.
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
// # Held writes
//
// A primary that shares its epoch with its peer (synced, or restarting in the synced
// role) must not write alone before the witness grants it a new epoch: the peer could
// take over at that epoch+1 and the write would be lost. With SetHoldOnPeerLoss such a
// volume that loses its peer goes to ModeHeld: writes and flushes wait (QEMU just sees
// a slow disk) until Release (granted: degraded and exclusive; refused: fenced), or
// until Resync attaches the peer again, in which case a held write is sent to the
// re-attached peer before it is acknowledged. A side that holds its epoch alone
// (SetExclusive, granted by the witness) goes degraded on peer loss at once.
//
// # Write intent while synced
//
// While synced, a region is also made durable in the bitmap before the first write to
// it is issued, and cleared after a FLUSH on both sides that began after its last
// write completed. So a primary that crashes while synced restarts with every region
// it may have changed alone marked, and the partner's resync (given those bits as
// PeerDirty) makes them converge. Writes during a resync are not intent-marked yet.
//
// # The pair in the daemon (internal/storage/controller)
//
// `grow storaged --peer URL --peer-token-file F --name N --mirror-listen IP:PORT
// [--witness URL --witness-token-file F] [--service-address IP/PREFIX --service-dev DEV]`.
// Without --peer nothing of this runs.
//
//   - Discovery and heartbeat: each controller polls GET /v1/mirror on its partner every
//     250 ms with the partner's admin token; the answer carries the partner's name, link
//     address, service address, and every volume's role and epoch. The partner is lost
//     after --peer-timeout (1 s) without an answer.
//   - Metadata: create, delete, resize, clone, snapshot and image import received by
//     either controller are applied on both: forwarded with the X-Grow-Mirror-Forwarded
//     header (never forwarded back), the local step undone if the partner refuses.
//     While the partner is unreachable they answer 503 "unavailable"; data I/O goes on.
//     Snapshot and resize run on the primary with the volume's writes quiesced and both
//     sides flushed (Volume.Quiesce), so both snapshots hold the same writes. An image is
//     imported locally, then streamed to the partner before either answers.
//   - Roles: a volume's home is one of the two names, by a stable hash of its name, and
//     is its primary in the normal state (a new volume goes to whoever serves its home
//     now). Each side persists {home, role, epoch} in DATA/mirror/NAME.json (write,
//     fsync, rename, directory fsync) before acting on it, and the bitmap in
//     DATA/mirror/NAME.bitmap. The secondary serves the mirror link (Target); NBD opens
//     of the volume on it are refused, so only the primary serves clients. A primary
//     that learns it is deposed closes its NBD connections (found from their handshake)
//     instead of answering errors, so QEMU reconnects (reconnect-delay) to the new one.
//   - The link is one TCP connection per volume, authenticated by an HMAC challenge
//     with the serving side's admin token, and TLS when the controller has TLS material.
//   - Failure: a synced primary that loses its peer (link error or heartbeat) holds
//     writes and asks the witness for epoch+1 at once; granted, it goes on degraded;
//     refused, it is stale. A secondary waits until the primary has been silent for
//     peer-timeout + 1.5 s (longer than the primary's fence timeout, peer-timeout +
//     0.5 s), and only if no write arrived over the link and a last probe fails, then
//     asks for epoch+1 and takes the volume over. When the partner's machine refuses
//     connections to its API port twice over 0.2 s (its process is dead, not cut off),
//     the secondary takes over at once: a dead process writes nothing, and the witness
//     still settles a race with a restarting one (or with a live partner behind a
//     firewall that rejects rather than drops: then one of the two wins the epoch). A planned restart should therefore be
//     preceded by a drain. Without a witness nobody is granted anything: volumes freeze
//     rather than guess.
//   - Fencing: a controller that has lost both partner and witness for longer than the
//     fence timeout gives its service addresses up and closes its held connections.
//   - Return: the side with the higher epoch resyncs the other, copying its own dirty
//     regions and the stale side's (fetched from GET /v1/mirror/volumes/NAME/dirty) at
//     the rate of `grow storage mirror rate` (changeable while it runs); the stale side
//     becomes secondary when told the resync is done, and clears its bitmap.
//   - Service addresses: each controller has one (--service-address); a volume's
//     nbd_address is its home's. A controller holds the address of every home whose
//     volumes it serves as primary, added to --service-dev with a 3 s lifetime renewed
//     four times a second (so a killed process's address lapses by itself) and
//     announced by gratuitous ARP (every 250 ms for 6 s, stopping as soon as the
//     address is given up); the NBD listener must be on the wildcard address. A
//     controller giving an address up first refuses and resets the connections made
//     to it for 200 ms, then removes it: a connection accepted after the address is
//     gone could never be answered, and QEMU does not time out a hung reconnect.
//     Both controllers must share the hosts' L2 segment, as with keepalived VIPs. A
//     controller that comes back after a takeover is secondary for everything and gets
//     its volumes and address back only by `grow storage controller resume`.
//   - Drain and resume: a hand-over quiesces the volume, has the witness grant epoch+1
//     to the partner, makes the partner primary and this side secondary at that epoch,
//     then fences the old export (closing its connections). Drain moves every synced
//     primary off a controller (and marks it drained: new volumes go to the partner);
//     resume moves the home volumes back once resynced. Both are steps the CLI repeats
//     until done.
//   - Split: both sides written alone (only after an operator override) freezes the
//     volume on both (state split); `grow storage volume resolve NAME --keep C` keeps
//     C's data at a new epoch, takes a snapshot NAME@split-TIME of the other side's
//     data, and resyncs the other side from C.
//
// # Hosts follow the primary
//
// Hosts reach a volume at its home's service address, which moves with the primary,
// so QEMU's NBD reconnect lands on the new primary within seconds; no path manager runs
// on the hosts.
package mirror
