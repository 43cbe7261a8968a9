package controller

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"github.com/growserver/grow/internal/storage/adminclient"
	"github.com/growserver/grow/internal/storage/witness"
)

// TestMirrorAPIAnswersDuringElections: while a controller's volumes wait for the
// witness (its partner just died, the witness answers slowly), its admin API (the
// partner's heartbeat GET /v1/mirror and GET /v1/volumes/NAME) keeps answering at
// once, and the volumes' elections run side by side instead of one after the other.
// Issue 5: a volume's reconcile held its lock while it asked the witness, then took
// the controller's lock, which GET /v1/mirror held while it waited for that volume's
// lock: every handler that touched volumes hung until the process was killed.
func TestMirrorAPIAnswersDuringElections(t *testing.T) {
	needQemuIO(t)
	const vols = 8
	const witnessDelay = 300 * time.Millisecond
	a, b, ws := testPair(t)
	slow := httptest.NewServer(slowGrants(witness.Handler(ws, "witness-token"), witnessDelay))
	t.Cleanup(slow.Close)
	a.cfg.Mirror.Witness, b.cfg.Mirror.Witness = slow.URL, slow.URL
	a.start()
	b.start()
	pairUp(t, a, b)
	for i := 0; i < vols; i++ {
		syncedVolume(t, a, a, b, fmt.Sprintf("v%d", i), 16<<20)
	}

	// Clients of a's API for the whole failover: the partner's heartbeat and volume reads.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var mu sync.Mutex
	var slowest time.Duration
	var failures []string
	probe := func(what string, call func(ctx context.Context) error) {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			t0 := time.Now()
			err := call(ctx)
			took := time.Since(t0)
			cancel()
			mu.Lock()
			slowest = max(slowest, took)
			if err != nil {
				failures = append(failures, fmt.Sprintf("%s after %v: %v", what, took.Round(time.Millisecond), err))
			}
			mu.Unlock()
			time.Sleep(10 * time.Millisecond)
		}
	}
	for i := 0; i < 3; i++ {
		wg.Add(2)
		go probe("GET /v1/mirror", func(ctx context.Context) error { _, err := a.cl.MirrorStatus(ctx); return err })
		name := fmt.Sprintf("v%d", i)
		go probe("GET /v1/volumes/"+name, func(ctx context.Context) error { _, err := a.cl.GetVolume(ctx, name); return err })
	}

	killed := time.Now()
	b.kill()
	deadline := killed.Add(20 * time.Second)
	var took time.Duration
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		s, err := a.cl.MirrorStatus(ctx)
		cancel()
		if err == nil && s.States[adminclient.MirrorDegraded] == vols {
			took = time.Since(killed)
			break
		}
		if time.Now().After(deadline) {
			close(stop)
			wg.Wait()
			t.Fatalf("%s did not take all %d volumes over within 20 s of its partner's death (last status: %+v, %v); failed API calls: %q", a.name, vols, s, err, failures)
		}
		time.Sleep(20 * time.Millisecond)
	}
	close(stop)
	wg.Wait()
	t.Logf("all %d volumes degraded on %s %v after the kill (witness answers in %v); slowest API call %v",
		vols, a.name, took.Round(time.Millisecond), witnessDelay, slowest.Round(time.Millisecond))
	if len(failures) > 0 {
		t.Fatalf("API calls failed during the failover: %q", failures)
	}
	// One after the other, the elections alone would take vols x witnessDelay.
	if limit := vols * witnessDelay; took > limit {
		t.Errorf("the takeover of %d volumes took %v, as long as %d elections in a row (%v)", vols, took, vols, limit)
	}
	if slowest > 2*time.Second {
		t.Errorf("an API call took %v during the failover", slowest)
	}
}

// slowGrants delays the witness's answers to grants (not to health checks).
func slowGrants(h http.Handler, d time.Duration) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPost {
			time.Sleep(d)
		}
		h.ServeHTTP(w, r)
	})
}
