package mirror

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net"
	"testing"
	"time"
)

// selfSigned makes a certificate for 127.0.0.1 and a pool that trusts it.
func selfSigned(t *testing.T) (tls.Certificate, *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "storaged-b"},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, pool
}

// The link runs over mutually authenticated TLS; a client without a certificate is refused.
func TestLinkOverTLS(t *testing.T) {
	cert, pool := selfSigned(t)
	disk := newFileExport(t, "s.img", 8<<20)
	target := NewTarget(disk, State{RoleSecondary, 1})
	srv := &LinkServer{Lookup: func(name string) (*Target, bool) { return target, name == "vol" }}
	l, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{cert}, ClientCAs: pool, ClientAuth: tls.RequireAndVerifyClientCert, MinVersion: tls.VersionTLS13})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(l) }()
	t.Cleanup(func() { srv.Close(); <-done })

	dial := func(withCert bool) (*Link, error) {
		cfg := &tls.Config{RootCAs: pool, ServerName: "127.0.0.1", MinVersion: tls.VersionTLS13}
		if withCert {
			cfg.Certificates = []tls.Certificate{cert}
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		c, err := (&tls.Dialer{Config: cfg}).DialContext(ctx, "tcp", l.Addr().String())
		if err != nil {
			return nil, err
		}
		return NewLink(ctx, c, "vol", 8<<20, 1, 5*time.Second)
	}
	if lk, err := dial(false); err == nil {
		lk.Close()
		t.Fatal("a client without a certificate opened the link")
	}
	lk, err := dial(true)
	if err != nil {
		t.Fatal(err)
	}
	defer lk.Close()
	want := pattern(3, 8192)
	if err := lk.WriteAt(want, 4096, true); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(want))
	disk.ReadAt(got, 4096)
	if string(got) != string(want) {
		t.Fatal("write over TLS did not land on the secondary")
	}
	if disk.fuaWrites.Load() != 1 {
		t.Fatalf("%d FUA writes on the secondary, want 1", disk.fuaWrites.Load())
	}
}
