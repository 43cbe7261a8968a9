// Package scheduler decides which host a server runs on. Placement is a pure function
// of a snapshot of the cluster:
//
//	snapshot + request
//	   -> feasibility  (not in maintenance, memory fits, vCPUs fit the overcommit ratio,
//	                    no server of the same anti-affinity group on the host)
//	   -> admission    (N+1: after placing, any one host can still be evacuated)
//	   -> score        (best fit: least memory left over, then least CPU left over)
//	   -> pick         (lowest score; ties go to the earlier host in the snapshot)
//
// It must never do I/O, read the clock or randomness, or mutate the snapshot it is
// given (Snapshot.Assign is the explicit way to record a placement).
package scheduler

import (
	"errors"
	"fmt"
)

// ErrNoCapacity means no host can take the server under the policy.
var ErrNoCapacity = errors.New("no host has capacity")

// Host is one hypervisor as placement sees it.
type Host struct {
	ID          string
	CPUs        int   // physical CPU threads
	MemoryBytes int64 // memory that servers may use
	UsedVCPUs   int
	UsedMemory  int64
	Maintenance bool
	// Groups counts the servers of each anti-affinity group on this host.
	Groups map[string]int
}

// FreeMemory is the memory not yet given to servers.
func (h *Host) FreeMemory() int64 { return h.MemoryBytes - h.UsedMemory }

// Request is what a server needs.
type Request struct {
	VCPUs       int
	MemoryBytes int64
	// Group is the anti-affinity group (already scoped to its customer); "" for none.
	Group string
	// Exclude names a host that must not be chosen (the source of a migration).
	Exclude string
}

// Policy holds the operator's placement settings.
type Policy struct {
	// CPUOvercommit is how many vCPUs a host may carry per physical CPU (>= 1).
	CPUOvercommit float64
	// NPlusOne keeps enough free memory on the other active hosts to evacuate any one
	// host. It is not applied to a cluster of a single host with nothing in
	// maintenance, which has nowhere to evacuate to anyway.
	NPlusOne bool
}

// DefaultPolicy is 4 vCPUs per CPU with N+1 kept.
var DefaultPolicy = Policy{CPUOvercommit: 4, NPlusOne: true}

// Snapshot is the cluster state placement decides on.
type Snapshot struct {
	Hosts []Host
}

// Reason explains why a request could not be placed.
type Reason struct {
	Maintenance, Memory, CPU, Group, Excluded int
	NPlusOne                                  bool
}

func (r Reason) String() string {
	if r.NPlusOne {
		return "placing it would leave too little free memory to evacuate a host (N+1)"
	}
	return fmt.Sprintf("hosts refused: %d in maintenance, %d short of memory, %d short of CPU, %d with the same group, %d excluded",
		r.Maintenance, r.Memory, r.CPU, r.Group, r.Excluded)
}

// Place returns the index in s.Hosts of the host req should go to.
func Place(s *Snapshot, req Request, pol Policy) (int, error) {
	if req.VCPUs <= 0 || req.MemoryBytes <= 0 {
		return -1, fmt.Errorf("Invalid request: %d vCPUs and %d bytes of memory", req.VCPUs, req.MemoryBytes)
	}
	ratio := pol.CPUOvercommit
	if ratio < 1 {
		ratio = 1
	}
	var (
		why        Reason
		best       = -1
		bestMem    int64
		bestCPU    float64
		activeFree int64
		active     int
		worst      int64 // the most memory any single host's failure would need re-homed
		inMaint    int
	)
	for i := range s.Hosts {
		h := &s.Hosts[i]
		if h.Maintenance {
			inMaint++
			if h.UsedMemory > worst {
				worst = h.UsedMemory
			}
			why.Maintenance++
			continue
		}
		active++
		activeFree += h.FreeMemory()
		// An active host's servers need used(h) free elsewhere: activeFree - free(h) >= used(h),
		// i.e. activeFree >= capacity(h).
		if h.MemoryBytes > worst {
			worst = h.MemoryBytes
		}
		if h.ID == req.Exclude && req.Exclude != "" {
			why.Excluded++
			continue
		}
		memLeft := h.FreeMemory() - req.MemoryBytes
		if memLeft < 0 {
			why.Memory++
			continue
		}
		cpuCap := float64(h.CPUs) * ratio
		cpuLeft := cpuCap - float64(h.UsedVCPUs+req.VCPUs)
		if cpuLeft < 0 {
			why.CPU++
			continue
		}
		if req.Group != "" && h.Groups[req.Group] > 0 {
			why.Group++
			continue
		}
		cpuFrac := cpuLeft / cpuCap
		if best < 0 || memLeft < bestMem || (memLeft == bestMem && cpuFrac < bestCPU) {
			best, bestMem, bestCPU = i, memLeft, cpuFrac
		}
	}
	if best < 0 {
		return -1, fmt.Errorf("%w: %s", ErrNoCapacity, why)
	}
	if pol.NPlusOne && (active > 1 || inMaint > 0) {
		// The placed memory leaves the active free pool wherever it lands, so the check
		// does not depend on which feasible host is chosen.
		if activeFree-req.MemoryBytes < worst {
			why.NPlusOne = true
			return -1, fmt.Errorf("%w: %s", ErrNoCapacity, why)
		}
	}
	return best, nil
}

// Assign records that req now runs on host i.
func (s *Snapshot) Assign(i int, req Request) {
	h := &s.Hosts[i]
	h.UsedVCPUs += req.VCPUs
	h.UsedMemory += req.MemoryBytes
	if req.Group != "" {
		if h.Groups == nil {
			h.Groups = map[string]int{}
		}
		h.Groups[req.Group]++
	}
}

// Release records that req no longer runs on host i.
func (s *Snapshot) Release(i int, req Request) {
	h := &s.Hosts[i]
	h.UsedVCPUs -= req.VCPUs
	h.UsedMemory -= req.MemoryBytes
	if req.Group != "" && h.Groups[req.Group] > 0 {
		h.Groups[req.Group]--
	}
}

// Index returns the position of the host with the given ID, or -1.
func (s *Snapshot) Index(id string) int {
	for i := range s.Hosts {
		if s.Hosts[i].ID == id {
			return i
		}
	}
	return -1
}

// EvacuationShortfall returns, for the worst single host, how many bytes of its servers
// would not fit in the free memory of the other active hosts (0 means N+1 holds).
func EvacuationShortfall(s *Snapshot) int64 {
	var activeFree int64
	for i := range s.Hosts {
		if !s.Hosts[i].Maintenance {
			activeFree += s.Hosts[i].FreeMemory()
		}
	}
	var worst int64
	for i := range s.Hosts {
		h := &s.Hosts[i]
		others := activeFree
		if !h.Maintenance {
			others -= h.FreeMemory()
		}
		if short := h.UsedMemory - others; short > worst {
			worst = short
		}
	}
	return worst
}
