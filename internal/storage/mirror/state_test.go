package mirror

import (
	"fmt"
	"maps"
	"math/rand/v2"
	"testing"
)

func TestStepScenarios(t *testing.T) {
	type step struct {
		ev   Event
		want State
		act  ActionKind
	}
	for _, tc := range []struct {
		name  string
		start State
		steps []step
	}{
		{"primary loses peer, wins witness, resyncs", State{RolePrimarySynced, 4}, []step{
			{Event{Kind: EvPeerLost}, State{RoleElecting, 4}, ActAskWitness},
			{Event{Kind: EvWitness, Unreachable: true}, State{RoleElecting, 4}, ActAskWitness},
			{Event{Kind: EvWitness, Granted: true, Epoch: 5}, State{RolePrimaryDegraded, 5}, ActNone},
			{Event{Kind: EvPeerLost}, State{RolePrimaryDegraded, 5}, ActNone},
			{Event{Kind: EvPeerSeen, PeerRole: RoleStale, PeerEpoch: 4}, State{RolePrimaryDegraded, 5}, ActStartResync},
			{Event{Kind: EvResyncDone, Epoch: 5}, State{RolePrimarySynced, 5}, ActNone},
		}},
		{"secondary takes over then is deposed", State{RoleSecondary, 4}, []step{
			{Event{Kind: EvPeerLost}, State{RoleElecting, 4}, ActAskWitness},
			{Event{Kind: EvWitness, Granted: true, Epoch: 5}, State{RolePrimaryDegraded, 5}, ActNone},
			{Event{Kind: EvPeerSeen, PeerRole: RolePrimaryDegraded, PeerEpoch: 6}, State{RoleStale, 5}, ActNone},
			{Event{Kind: EvResyncDone, Epoch: 6}, State{RoleSecondary, 6}, ActNone},
		}},
		{"loser of the race is stale", State{RolePrimarySynced, 4}, []step{
			{Event{Kind: EvPeerLost}, State{RoleElecting, 4}, ActAskWitness},
			{Event{Kind: EvWitness, Granted: false}, State{RoleStale, 4}, ActNone},
			{Event{Kind: EvPeerLost}, State{RoleStale, 4}, ActNone},
			{Event{Kind: EvResyncDone, Epoch: 4}, State{RoleStale, 4}, ActNone},
		}},
		{"a grant for a wrong epoch is a refusal", State{RoleElecting, 4}, []step{
			{Event{Kind: EvWitness, Granted: true, Epoch: 9}, State{RoleStale, 4}, ActNone},
		}},
		{"two writers at one epoch freeze, operator resolves", State{RolePrimaryDegraded, 5}, []step{
			{Event{Kind: EvPeerSeen, PeerRole: RolePrimaryDegraded, PeerEpoch: 5}, State{RoleFrozenSplit, 5}, ActReportSplit},
			{Event{Kind: EvResolve, Keep: true, Epoch: 5}, State{RoleFrozenSplit, 5}, ActNone},
			{Event{Kind: EvResolve, Keep: true, Epoch: 7}, State{RolePrimaryDegraded, 7}, ActNone},
		}},
		{"degraded primary facing an older degraded primary freezes", State{RolePrimaryDegraded, 5}, []step{
			{Event{Kind: EvPeerSeen, PeerRole: RolePrimaryDegraded, PeerEpoch: 3}, State{RoleFrozenSplit, 5}, ActReportSplit},
			{Event{Kind: EvResolve, Keep: false, Epoch: 6}, State{RoleStale, 5}, ActNone},
		}},
		{"stale facing a stale waits", State{RoleStale, 4}, []step{
			{Event{Kind: EvPeerSeen, PeerRole: RoleStale, PeerEpoch: 4}, State{RoleStale, 4}, ActNone},
			{Event{Kind: EvPeerSeen, PeerRole: RoleSecondary, PeerEpoch: 4}, State{RoleFrozenSplit, 4}, ActReportSplit},
		}},
	} {
		s := tc.start
		for i, st := range tc.steps {
			var a Action
			s, a = Step(s, st.ev)
			if s != st.want || a.Kind != st.act {
				t.Fatalf("%s: step %d: got %v/%d %v, want %v/%d %v", tc.name, i, s.Role, s.Epoch, a.Kind, st.want.Role, st.want.Epoch, st.act)
			}
		}
	}
}

func TestWitnessGrantsEachEpochOnce(t *testing.T) {
	var w Witness
	if !w.Grant("a", 1) || w.Grant("b", 1) || w.Grant("b", 0) || !w.Grant("b", 3) || w.Grant("a", 2) {
		t.Fatal("witness granted out of order")
	}
	if w.Epoch != 3 || w.Holder != "b" {
		t.Fatalf("witness at %d held by %q, want 3 by b", w.Epoch, w.Holder)
	}
}

func TestAcceptsPeerWrite(t *testing.T) {
	for _, tc := range []struct {
		s     State
		epoch uint64
		want  bool
	}{
		{State{RoleSecondary, 3}, 3, true},
		{State{RoleSecondary, 3}, 2, false},
		{State{RoleSecondary, 3}, 4, false},
		{State{RoleStale, 3}, 4, true},
		{State{RoleStale, 3}, 3, false},
		{State{RolePrimaryDegraded, 3}, 3, false},
		{State{RolePrimarySynced, 3}, 4, false},
		{State{RoleElecting, 3}, 3, false},
		{State{RoleFrozenSplit, 3}, 4, false},
	} {
		if got := tc.s.AcceptsPeerWrite(tc.epoch); got != tc.want {
			t.Errorf("%v@%d accepts epoch %d: %v, want %v", tc.s.Role, tc.s.Epoch, tc.epoch, got, tc.want)
		}
	}
}

// simNode is one controller's view of one volume in the simulation.
type simNode struct {
	name       string
	s          State
	data       map[int]bool // ids of the writes this side holds
	ask        uint64       // pending witness request, 0 if none
	resync     bool         // ActStartResync was issued and not yet completed
	witnessOff bool
}

// simulate runs random event sequences against two sides, a witness and a link, and
// checks after every event that at most one side completes writes for an epoch, that
// writes never go back to an older epoch, that a resync source holds every write its
// target holds, and that the newest writable side holds every acknowledged write.
func simulate(t *testing.T, seed uint64, steps int) (writes, resyncs, splits int) {
	rng := rand.New(rand.NewPCG(seed, seed*7+1))
	a := &simNode{name: "a", s: State{RolePrimarySynced, 1}, data: map[int]bool{}}
	b := &simNode{name: "b", s: State{RoleSecondary, 1}, data: map[int]bool{}}
	nodes := [2]*simNode{a, b}
	w := Witness{Epoch: 1, Holder: "a"}
	link := true
	writer := map[uint64]string{}
	maxWriteEpoch := uint64(0)
	acked := map[int]bool{}
	nextID := 0
	var trace []string

	fail := func(format string, args ...any) {
		t.Helper()
		for _, l := range trace {
			t.Log(l)
		}
		t.Fatalf("seed %d: "+format, append([]any{seed}, args...)...)
	}
	apply := func(n *simNode, ev Event) {
		var act Action
		old := n.s
		n.s, act = Step(n.s, ev)
		trace = append(trace, fmt.Sprintf("%s: %+v: %v@%d -> %v@%d act %v", n.name, ev, old.Role, old.Epoch, n.s.Role, n.s.Epoch, act))
		if len(trace) > 60 {
			trace = trace[1:]
		}
		if n.s.Role != old.Role || n.s.Epoch != old.Epoch {
			n.resync = false
		}
		switch act.Kind {
		case ActAskWitness:
			n.ask = act.Epoch
		case ActStartResync:
			n.resync = true
		case ActReportSplit:
			splits++
		}
	}
	peerOf := func(n *simNode) *simNode {
		if n == a {
			return b
		}
		return a
	}
	accept := func(n *simNode, on ...*simNode) {
		if prev, ok := writer[n.s.Epoch]; ok && prev != n.name {
			fail("epoch %d written by %s and %s", n.s.Epoch, prev, n.name)
		}
		if n.s.Epoch < maxWriteEpoch {
			fail("%s wrote at epoch %d after a write at epoch %d", n.name, n.s.Epoch, maxWriteEpoch)
		}
		writer[n.s.Epoch], maxWriteEpoch = n.name, n.s.Epoch
		for _, x := range on {
			x.data[nextID] = true
		}
		acked[nextID] = true
		nextID++
		writes++
	}

	for i := 0; i < steps; i++ {
		n := nodes[rng.IntN(2)]
		p := peerOf(n)
		switch rng.IntN(9) {
		case 0, 1: // a client write at n
			switch {
			case n.s.Role == RolePrimaryDegraded:
				accept(n, n)
			case n.s.Role == RolePrimarySynced && link && p.s.AcceptsPeerWrite(n.s.Epoch):
				accept(n, n, p)
			case n.s.Role == RolePrimarySynced && link && p.s.Epoch > n.s.Epoch:
				apply(n, Event{Kind: EvPeerSeen, PeerRole: p.s.Role, PeerEpoch: p.s.Epoch}) // stale reply
			case n.s.Role == RolePrimarySynced:
				apply(n, Event{Kind: EvPeerLost}) // the peer write failed
			}
		case 2:
			link = !link
		case 3: // failure detection, also spurious (a slow peer)
			if !link || rng.IntN(4) == 0 {
				apply(n, Event{Kind: EvPeerLost})
			}
		case 4:
			if link {
				apply(n, Event{Kind: EvPeerSeen, PeerRole: p.s.Role, PeerEpoch: p.s.Epoch})
			}
		case 5:
			n.witnessOff = !n.witnessOff
		case 6: // the witness answers n's pending request
			if n.ask != 0 {
				e := n.ask
				n.ask = 0
				if n.witnessOff {
					apply(n, Event{Kind: EvWitness, Unreachable: true})
				} else {
					apply(n, Event{Kind: EvWitness, Epoch: e, Granted: w.Grant(n.name, e)})
				}
			}
		case 7: // n's resync to p completes
			if n.resync && link && p.s.Role == RoleStale && p.s.Epoch < n.s.Epoch {
				for id := range p.data {
					if !n.data[id] {
						fail("resync source %s (%v@%d) lacks write %d its target %s (%v@%d) holds", n.name, n.s.Role, n.s.Epoch, id, p.name, p.s.Role, p.s.Epoch)
					}
				}
				p.data = maps.Clone(n.data)
				e := n.s.Epoch
				apply(n, Event{Kind: EvResyncDone, Epoch: e})
				apply(p, Event{Kind: EvResyncDone, Epoch: e})
				resyncs++
			}
		case 8: // operator resolves a split once neither side can write
			if n.s.Role == RoleFrozenSplit && !p.s.Writable() {
				w.Epoch++
				w.Holder = n.name
				keep := rng.IntN(2) == 0
				if keep {
					// The operator keeps n: p's writes are set aside (kept as a snapshot), acked ones included.
					for id := range acked {
						if !n.data[id] {
							delete(acked, id)
						}
					}
				}
				apply(n, Event{Kind: EvResolve, Keep: keep, Epoch: w.Epoch})
			}
		}
		if a.s.Writable() && b.s.Writable() && a.s.Epoch == b.s.Epoch {
			fail("both sides writable at epoch %d", a.s.Epoch)
		}
		for _, x := range nodes {
			if x.s.Writable() && x.s.Epoch == w.Epoch {
				for id := range acked {
					if !x.data[id] {
						fail("%s (%v@%d) is the newest writer but lacks acknowledged write %d", x.name, x.s.Role, x.s.Epoch, id)
					}
				}
			}
		}
	}
	return writes, resyncs, splits
}

func TestStateMachineRandomSequences(t *testing.T) {
	var writes, resyncs, splits int
	for seed := uint64(1); seed <= 3000; seed++ {
		w, r, s := simulate(t, seed, 300)
		writes, resyncs, splits = writes+w, resyncs+r, splits+s
	}
	t.Logf("%d writes, %d resyncs, %d splits reported", writes, resyncs, splits)
	// The simulation must actually exercise failover and resync, or it proves nothing.
	if writes < 10000 || resyncs < 500 {
		t.Fatalf("simulation too shallow: %d writes, %d resyncs", writes, resyncs)
	}
}
