package mirror

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/growserver/grow/test/testbed"
)

// TestTLSPair runs a mirrored pair that requires TLS with verified client
// certificates everywhere: a guest's disk over NBD (QEMU's tls-creds-x509 with the
// host's certificate) follows two kills of its primary with no I/O error, and every
// acknowledged block verifies on both sides; a plain-text client, a TLS client without
// a certificate and one with a certificate of another CA are all refused on the
// volume's service address; the mirror link speaks only TLS and refuses a client
// certificate of another CA.
func TestTLSPair(t *testing.T) {
	t.Parallel()
	b, p := setup(t, testbed.StoragePairOptions{TLS: true})
	const vol = "secret"
	createVolume(t, p, p.Ctl[0], vol, guestVolSize)
	g := startGuest(t, b, p, "tls", vol)

	pc, _ := primaryOf(t, p, vol)
	v := p.View(t.Context(), vol).Vol[indexOf(p, pc)]
	if v == nil {
		t.Fatalf("%s does not report volume %s", pc.Name, vol)
	}
	ns := b.Hosts[0].Netns
	svc := v.NBDAddress
	refused := map[string]string{
		"a plain-text client":                "nbd://" + svc + "/" + vol,
		"a TLS client without a certificate": "nbds://" + svc + "/" + vol + "?tls-certificates=" + p.PKI.AnonDir,
		"a client certificate of another CA": "nbds://" + svc + "/" + vol + "?tls-certificates=" + p.PKI.OtherDir,
	}
	for who, uri := range refused {
		out, err := testbed.NetnsCommand(ns, "nbdinfo", "--can", "connect", uri).CombinedOutput()
		if err == nil {
			t.Errorf("%s was let in at %s:\n%s", who, svc, out)
		}
	}
	if out, err := testbed.NetnsCommand(ns, "nbdinfo", "--is", "tls", pc.NBDURI(vol)).CombinedOutput(); err != nil {
		t.Errorf("the host's certificate was refused: %v\n%s", err, out)
	}
	checkLinkTLS(t, p, pc)

	for i := 0; i < 2; i++ {
		pc, _ := primaryOf(t, p, vol)
		time.Sleep(300 * time.Millisecond)
		pc.Kill()
		stall := g.waitAcks(t, 10, 40*time.Second, "after kill -9 of the primary "+pc.Name)
		g.checkNoIOError(t, "after kill -9 of the primary")
		if err := pc.Start(); err != nil {
			t.Fatalf("restarting %s: %v", pc.Name, err)
		}
		waitSynced(t, p, vol, 90*time.Second)
		t.Logf("kill %d of primary %s over TLS: 10 more writes within %s", i+1, pc.Name, stall.Round(time.Millisecond))
	}
	last := g.stop()
	pc, _ = primaryOf(t, p, vol)
	verifyBlocks(t, b, pc, vol, last)
	compareSides(t, b, p, vol)
}

// checkLinkTLS dials controller c's mirror link (through a forwarder into its
// namespace): a plain-text client is told nothing, a TLS client with a certificate of
// another CA fails the handshake, and the pair's CA vouches for the link's certificate.
func checkLinkTLS(t *testing.T, p *testbed.StoragePair, c *testbed.PairController) {
	t.Helper()
	addr := testbed.Forward(t, c.Netns, c.MirrorAddr)
	plain, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	_ = plain.SetReadDeadline(time.Now().Add(time.Second))
	if n, _ := io.ReadFull(plain, make([]byte, 8)); n > 0 {
		t.Errorf("the mirror link of %s answered a plain-text client with %d bytes", c.Name, n)
	}
	plain.Close()

	caPEM, err := os.ReadFile(p.PKI.CA)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(caPEM)
	dial := func(dir string) error {
		cert, err := tls.LoadX509KeyPair(filepath.Join(dir, "client-cert.pem"), filepath.Join(dir, "client-key.pem"))
		if err != nil {
			return err
		}
		conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, &tls.Config{
			RootCAs: roots, ServerName: testbed.TLSServerName, Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12})
		if err != nil {
			return err
		}
		defer conn.Close()
		// TLS 1.3 reports a refused client certificate on the first read.
		_ = conn.SetReadDeadline(time.Now().Add(time.Second))
		if _, err := conn.Read(make([]byte, 1)); err != nil && !isTimeout(err) {
			return err
		}
		return nil
	}
	if err := dial(p.PKI.OtherDir); err == nil {
		t.Errorf("the mirror link of %s accepted a client certificate of another CA", c.Name)
	}
	if err := dial(p.PKI.ClientDir); err != nil {
		t.Errorf("the mirror link of %s: TLS with the pair's CA: %v", c.Name, err)
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
