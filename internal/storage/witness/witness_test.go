package witness

import (
	"context"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
)

func TestGrantIsCompareAndSetAndDurable(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(Handler(s, "tok"))
	t.Cleanup(srv.Close)
	c, err := NewClient(srv.URL, "tok")
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	// Two controllers race for the same epoch many times: exactly one wins each round.
	for e := uint64(1); e <= 20; e++ {
		var wins atomic.Int32
		var wg sync.WaitGroup
		for _, who := range []string{"a", "b"} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				ans, err := c.Grant(ctx, "vol1", who, e)
				if err != nil {
					t.Error(err)
					return
				}
				if ans.Granted {
					wins.Add(1)
				}
			}()
		}
		wg.Wait()
		if wins.Load() != 1 {
			t.Fatalf("epoch %d granted %d times", e, wins.Load())
		}
	}
	winner := s.Get("vol1")
	// A retry by the holder is granted again; a lower or equal epoch for anyone else is not.
	if ans, _ := c.Grant(ctx, "vol1", winner.Holder, 20); !ans.Granted {
		t.Fatal("retry of the held epoch refused")
	}
	other := map[string]string{"a": "b", "b": "a"}[winner.Holder]
	if ans, _ := c.Grant(ctx, "vol1", other, 20); ans.Granted || ans.Record != winner {
		t.Fatalf("equal epoch granted to the other side: %+v", ans)
	}
	if ans, _ := c.Grant(ctx, "vol1", other, 3); ans.Granted {
		t.Fatal("older epoch granted")
	}
	if _, err := c.Grant(ctx, "", "a", 1); err == nil {
		t.Fatal("empty key accepted")
	}
	// Reopening (a restart) keeps every grant.
	s2, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	if got := s2.Get("vol1"); got != winner {
		t.Fatalf("after reopen %+v, want %+v", got, winner)
	}
	// A wrong token is refused.
	bad, _ := NewClient(srv.URL, "nope")
	if err := bad.Health(ctx); err == nil {
		t.Fatal("wrong token accepted")
	}
	if err := c.Health(ctx); err != nil {
		t.Fatal(err)
	}
}

func TestDamagedStateIsRefused(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, stateFile), []byte("{not json"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(dir); err == nil {
		t.Fatal("damaged state accepted")
	}
}
