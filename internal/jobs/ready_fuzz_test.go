package jobs

import (
	"strings"
	"testing"
)

// FuzzReadyLine feeds arbitrary console output (the guest controls it) to the ready-line
// parser: it must never panic, and a line it returns must be a ready report naming
// exactly the hostname asked for.
func FuzzReadyLine(f *testing.F) {
	f.Add([]byte("booting\r\nGROW-READY hostname=web1 ip=10.0.0.2/24 keys=1\r\n"), "web1")
	f.Add([]byte("GROW-READY hostname=web10 ip=x\nGROW-READY hostname=web1\n"), "web1")
	f.Add([]byte("\x1b[6nGROW-READY hostname=a"), "a")
	f.Add([]byte(strings.Repeat("x", 70000)+"\nGROW-READY hostname=b ip=1\n"), "b")
	f.Fuzz(func(t *testing.T, log []byte, host string) {
		if strings.ContainsAny(host, " \r\n") || host == "" {
			return
		}
		got := readyLine(log, host)
		if got == "" {
			return
		}
		if !strings.HasPrefix(got, ReadyPrefix) || !strings.Contains(got+" ", " hostname="+host+" ") {
			t.Fatalf("readyLine(%q) = %q", host, got)
		}
	})
}
