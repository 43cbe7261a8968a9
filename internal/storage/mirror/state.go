package mirror

import "fmt"

// Role is what one side of a mirrored volume is doing.
type Role int

// The roles of one side of a mirrored volume.
const (
	// RoleSecondary receives the primary's writes at the same epoch and serves no clients.
	RoleSecondary Role = iota
	// RolePrimarySynced serves clients; every write is on both sides before it is acknowledged.
	RolePrimarySynced
	// RolePrimaryDegraded serves clients alone at an epoch the witness granted, marking the bitmap.
	RolePrimaryDegraded
	// RoleElecting lost its peer and waits for the witness; it accepts no writes meanwhile.
	RoleElecting
	// RoleStale knows the other side holds a newer epoch; it refuses writes and waits for resync.
	RoleStale
	// RoleFrozenSplit cannot be settled by the rules; it refuses writes until an operator resolves it.
	RoleFrozenSplit
)

var roleNames = [...]string{"secondary", "primary-synced", "primary-degraded", "electing", "stale", "frozen-split"}

// String is the role's name as shown to operators.
func (r Role) String() string {
	if r < 0 || int(r) >= len(roleNames) {
		return fmt.Sprintf("role(%d)", int(r))
	}
	return roleNames[r]
}

// State is one side's role and epoch for one volume; it is persisted by the controller.
type State struct {
	Role  Role
	Epoch uint64
}

// Writable reports whether this side may accept client writes (a synced primary still needs its peer's acknowledgement).
func (s State) Writable() bool {
	return s.Role == RolePrimarySynced || s.Role == RolePrimaryDegraded
}

// AcceptsPeerWrite reports whether this side applies a mirror-link write sent at epoch:
// a secondary at the same epoch, or a stale side from a newer epoch (resync target).
func (s State) AcceptsPeerWrite(epoch uint64) bool {
	switch s.Role {
	case RoleSecondary:
		return epoch == s.Epoch
	case RoleStale:
		return epoch > s.Epoch
	}
	return false
}

// EventKind names an input of the state machine.
type EventKind int

// The inputs of the state machine.
const (
	// EvPeerLost: the mirror link failed or the peer stopped answering.
	EvPeerLost EventKind = iota
	// EvPeerSeen: the peer answered and told its state (PeerRole, PeerEpoch).
	EvPeerSeen
	// EvWitness: the witness answered an AskWitness (Granted), or could not be reached (Unreachable).
	EvWitness
	// EvResyncDone: a resync from the primary at Epoch to the stale side finished.
	EvResyncDone
	// EvResolve: an operator resolved a frozen split; Keep says whether this side's data wins, Epoch is newly granted.
	EvResolve
)

// Event is one input of Step.
type Event struct {
	Kind        EventKind
	PeerRole    Role
	PeerEpoch   uint64
	Epoch       uint64
	Granted     bool
	Unreachable bool
	Keep        bool
}

// ActionKind names what the caller must do after a Step.
type ActionKind int

// The outputs of the state machine.
const (
	// ActNone: nothing to do.
	ActNone ActionKind = iota
	// ActAskWitness: ask the witness to grant Epoch to this side (compare-and-set) and feed the answer back as EvWitness.
	ActAskWitness
	// ActStartResync: this side is the source; copy its dirty regions to the peer, then feed EvResyncDone to both.
	ActStartResync
	// ActReportSplit: the split cannot be settled; report the volume to operators.
	ActReportSplit
)

// Action is the output of Step.
type Action struct {
	Kind  ActionKind
	Epoch uint64
}

// Step is the whole epoch/role rule set: the next state of one side and what to do.
// It is a pure function; invalid or irrelevant events leave the state unchanged.
func Step(s State, ev Event) (State, Action) {
	none := Action{}
	switch ev.Kind {
	case EvPeerLost:
		switch s.Role {
		case RolePrimarySynced, RoleSecondary:
			// Going on alone (or taking over) needs a new epoch from the witness.
			return State{RoleElecting, s.Epoch}, Action{ActAskWitness, s.Epoch + 1}
		}
		return s, none

	case EvWitness:
		if s.Role != RoleElecting {
			return s, none
		}
		switch {
		case ev.Unreachable:
			return s, Action{ActAskWitness, s.Epoch + 1} // stall and retry; never guess
		case ev.Granted && ev.Epoch == s.Epoch+1:
			return State{RolePrimaryDegraded, ev.Epoch}, none
		default:
			// Someone else holds the next epoch: our data may be older than theirs.
			return State{RoleStale, s.Epoch}, none
		}

	case EvPeerSeen:
		p, pe := ev.PeerRole, ev.PeerEpoch
		switch s.Role {
		case RolePrimarySynced, RoleSecondary, RoleElecting:
			if pe > s.Epoch {
				return State{RoleStale, s.Epoch}, none
			}
			return s, none
		case RolePrimaryDegraded:
			switch {
			case pe > s.Epoch:
				return State{RoleStale, s.Epoch}, none
			case pe == s.Epoch && p == RolePrimaryDegraded, p == RoleFrozenSplit:
				return State{RoleFrozenSplit, s.Epoch}, Action{ActReportSplit, s.Epoch}
			case pe < s.Epoch && p != RolePrimaryDegraded:
				return s, Action{ActStartResync, s.Epoch}
			case pe < s.Epoch:
				// The peer wrote alone at an older epoch that we never saw: both sides hold writes the other lacks.
				return State{RoleFrozenSplit, s.Epoch}, Action{ActReportSplit, s.Epoch}
			}
			return s, none
		case RoleStale:
			if pe <= s.Epoch && p != RoleStale {
				// A stale side facing a peer that is not newer: nobody is a safe source.
				return State{RoleFrozenSplit, s.Epoch}, Action{ActReportSplit, s.Epoch}
			}
			return s, none
		}
		return s, none

	case EvResyncDone:
		switch {
		case s.Role == RolePrimaryDegraded && ev.Epoch == s.Epoch:
			return State{RolePrimarySynced, s.Epoch}, none
		case s.Role == RoleStale && ev.Epoch > s.Epoch:
			return State{RoleSecondary, ev.Epoch}, none
		}
		return s, none

	case EvResolve:
		if s.Role != RoleFrozenSplit || ev.Epoch <= s.Epoch {
			return s, none
		}
		if ev.Keep {
			return State{RolePrimaryDegraded, ev.Epoch}, none
		}
		return State{RoleStale, s.Epoch}, none
	}
	return s, none
}

// Witness is the tie-breaker's rule: it grants each epoch once, to the first side that asks.
// The control plane (or a small witness daemon) keeps it durably; this is the pure rule.
type Witness struct {
	// Epoch is the highest epoch granted so far.
	Epoch uint64
	// Holder is who was granted Epoch.
	Holder string
}

// Grant gives epoch to who if it is higher than every epoch granted before.
func (w *Witness) Grant(who string, epoch uint64) bool {
	if epoch <= w.Epoch {
		return false
	}
	w.Epoch, w.Holder = epoch, who
	return true
}
