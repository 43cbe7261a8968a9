package nbd

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// testCA is a certificate authority generated for one test.
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pem  []byte
}

var serial int64 = 1

func newTestCA(t *testing.T, name string) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial++
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(serial),
		Subject:               pkix.Name{CommonName: name},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return &testCA{cert: cert, key: key, pem: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}
}

// issue makes a leaf certificate for a server (with loopback names) or a client.
func (ca *testCA) issue(t *testing.T, cn string, server bool) (certPEM, keyPEM []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial++
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(serial),
		Subject:               pkix.Name{CommonName: cn},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	if server {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		tmpl.DNSNames = []string{"localhost"}
		tmpl.IPAddresses = []net.IP{net.IPv4(127, 0, 0, 1)}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	kd, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kd})
}

// clientDir writes a certificate directory as libnbd and QEMU expect it.
func clientDir(t *testing.T, trust *testCA, cert, key []byte) string {
	t.Helper()
	dir := t.TempDir()
	files := map[string][]byte{"ca-cert.pem": trust.pem, "client-cert.pem": cert, "client-key.pem": key}
	for n, b := range files {
		if b == nil {
			continue
		}
		if err := os.WriteFile(filepath.Join(dir, n), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// tlsSetup returns a server TLS config verifying clients against ca, and a good client directory.
func tlsSetup(t *testing.T, ca *testCA, verifyClients bool) (*tls.Config, string) {
	t.Helper()
	sc, sk := ca.issue(t, "storage controller", true)
	pair, err := tls.X509KeyPair(sc, sk)
	if err != nil {
		t.Fatal(err)
	}
	cfg := &tls.Config{Certificates: []tls.Certificate{pair}, MinVersion: tls.VersionTLS12}
	if verifyClients {
		pool := x509.NewCertPool()
		pool.AddCert(ca.cert)
		cfg.ClientCAs = pool
		cfg.ClientAuth = tls.RequireAndVerifyClientCert
	}
	cc, ck := ca.issue(t, "hypervisor-1", false)
	return cfg, clientDir(t, ca, cc, ck)
}

// TestTLS runs nbdinfo, nbdcopy and qemu-io over STARTTLS with verified client certificates.
func TestTLS(t *testing.T) {
	needTool(t, "nbdinfo", "nbdcopy", "qemu-io")
	ca := newTestCA(t, "GrowServer test CA")
	cfg, good := tlsSetup(t, ca, true)
	ex := newMemExports()
	m := ex.add("disk", "encrypted", newMemExport(8<<20))
	s := startServer(t, ex, &Server{TLSConfig: cfg, RequireTLS: true})
	tlsURI := fmt.Sprintf("nbds://%s/disk?tls-certificates=%s", s.tcp, good)

	out := run(t, "nbdinfo", "--json", tlsURI)
	if !strings.Contains(out, `"TLS": true`) || !strings.Contains(out, `"export-size": 8388608`) {
		t.Errorf("nbdinfo over TLS: %s", out)
	}
	if out := run(t, "nbdinfo", "--list", fmt.Sprintf("nbds://%s/?tls-certificates=%s", s.tcp, good)); !strings.Contains(out, "encrypted") {
		t.Errorf("nbdinfo --list over TLS: %s", out)
	}
	for _, c := range []string{"structured-reply", "multi-conn", "fast-zero"} {
		if out, err := runErr("nbdinfo", "--can", c, tlsURI); err != nil {
			t.Errorf("nbdinfo --can %s over TLS: %v %s", c, err, out)
		}
	}
	unixTLS := fmt.Sprintf("nbds+unix:///disk?socket=%s&tls-certificates=%s", s.sock, good)
	if out := strings.TrimSpace(run(t, "nbdinfo", "--size", unixTLS)); out != "8388608" {
		t.Errorf("nbdinfo over TLS on the unix socket: %q", out)
	}
	if !strings.Contains(s.logs.String(), "hypervisor-1") {
		t.Error("the verified client certificate is not in the connection log")
	}

	// Random data in with nbdcopy, back out, compared.
	dir := t.TempDir()
	in, want := randomImage(t, dir, 8<<20)
	run(t, "nbdcopy", in, tlsURI)
	if !bytes.Equal(m.content(0, m.Size()), want) {
		t.Fatal("data copied in over TLS differs")
	}
	run(t, "nbdcopy", tlsURI, filepath.Join(dir, "out.raw"))
	compareFile(t, filepath.Join(dir, "out.raw"), want)

	// QEMU's own client with tls-creds-x509.
	obj := "tls-creds-x509,id=tls0,endpoint=client,verify-peer=on,dir=" + good
	host, port, _ := net.SplitHostPort(s.tcp)
	img := fmt.Sprintf("driver=raw,file.driver=nbd,file.server.type=inet,file.server.host=%s,file.server.port=%s,file.export=disk,file.tls-creds=tls0", host, port)
	out = run(t, "qemu-io", "--object", obj, "--image-opts", img,
		"-c", "write -P 0xab 0 64k", "-c", "read -P 0xab 0 64k",
		"-c", "write -f -P 0xcd 1m 1m", "-c", "read -P 0xcd 1m 1m")
	if strings.Contains(out, "failed") {
		t.Fatalf("qemu-io over TLS: %s", out)
	}

	// Without TLS the server refuses to serve anything.
	if out, err := runErr("nbdinfo", "--size", s.tcpURI("disk")); err == nil {
		t.Errorf("plain-text client served by a server that requires TLS: %s", out)
	}
	if out, err := runErr("nbdinfo", "--list", s.unixURI("")); err == nil {
		t.Errorf("plain-text listing by a server that requires TLS: %s", out)
	}

	// A client certificate from another CA, and no client certificate, are refused.
	evil := newTestCA(t, "someone else")
	ec, ek := evil.issue(t, "intruder", false)
	for name, dir := range map[string]string{
		"foreign client certificate": clientDir(t, ca, ec, ek),
		"no client certificate":      clientDir(t, ca, nil, nil),
	} {
		uri := fmt.Sprintf("nbds://%s/disk?tls-certificates=%s", s.tcp, dir)
		if out, err := runErr("nbdinfo", "--size", uri); err == nil {
			t.Errorf("%s accepted: %s", name, out)
		}
	}
	if !strings.Contains(s.logs.String(), "TLS handshake failed") {
		t.Error("refused TLS handshakes were not logged")
	}
	// The server still serves well-behaved clients.
	if out := strings.TrimSpace(run(t, "nbdinfo", "--size", tlsURI)); out != "8388608" {
		t.Errorf("size after refused clients: %q", out)
	}
}

// TestTLSRaw checks the TLS rules byte by byte with Go's TLS client.
func TestTLSRaw(t *testing.T) {
	ca := newTestCA(t, "GrowServer test CA")
	cfg, _ := tlsSetup(t, ca, false)
	ex := newMemExports()
	ex.add("disk", "", newMemExport(1<<20))
	s := startServer(t, ex, &Server{TLSConfig: cfg, RequireTLS: true})
	roots := x509.NewCertPool()
	roots.AddCert(ca.cert)

	// Before TLS: options are refused with ERR_TLS_REQD, EXPORT_NAME drops the connection.
	c := dialRaw(t, "unix", s.sock)
	c.greet(flagFixedNewstyle | flagNoZeroes)
	for _, opt := range []uint32{optGo, optInfo, optList, optStructuredReply, 77} {
		c.option(opt, goData("disk"))
		if typ, _ := c.optReply(opt); typ != repErrTLSReqd {
			t.Errorf("option %d before TLS: %#x, want ERR_TLS_REQD", opt, typ)
		}
	}
	c.option(optExportName, []byte("disk"))
	c.expectClosed()

	// Data sent after STARTTLS but before the TLS handshake closes the connection.
	c = dialRaw(t, "unix", s.sock)
	c.greet(flagFixedNewstyle | flagNoZeroes)
	c.write(uint64(optMagic), uint32(optStartTLS), uint32(0), uint64(optMagic), uint32(optGo), uint32(0))
	if typ, _ := c.optReply(optStartTLS); typ != repAck {
		t.Fatalf("STARTTLS: %#x", typ)
	}
	c.expectClosed()

	// A proper upgrade; a second STARTTLS inside TLS is invalid; then GO works.
	c = dialRaw(t, "tcp", s.tcp)
	c.greet(flagFixedNewstyle | flagNoZeroes)
	c.option(optStartTLS, nil)
	if typ, _ := c.optReply(optStartTLS); typ != repAck {
		t.Fatalf("STARTTLS: %#x", typ)
	}
	tc := tls.Client(c.nc, &tls.Config{RootCAs: roots, ServerName: "localhost"})
	if err := tc.Handshake(); err != nil {
		t.Fatalf("TLS handshake: %v", err)
	}
	c.nc = tc
	c.option(optStartTLS, nil)
	if typ, _ := c.optReply(optStartTLS); typ != repErrInvalid {
		t.Errorf("STARTTLS inside TLS: %#x", typ)
	}
	if size, _ := c.goExport("disk"); size != 1<<20 {
		t.Errorf("size over TLS %d", size)
	}
	c.request(0, cmdWrite, 1, 0, 3, []byte("abc"))
	if e, _ := c.simpleReply(); e != 0 {
		t.Fatalf("write over TLS: %d", e)
	}
	c.request(0, cmdRead, 2, 0, 3, nil)
	if e, _ := c.simpleReply(); e != 0 || string(c.read(3)) != "abc" {
		t.Fatal("read over TLS")
	}

	// Garbage instead of a TLS ClientHello is a logged handshake failure.
	c = dialRaw(t, "unix", s.sock)
	c.greet(flagFixedNewstyle | flagNoZeroes)
	c.option(optStartTLS, nil)
	c.optReply(optStartTLS)
	c.nc.Write(bytes.Repeat([]byte{0x16, 3, 1, 0xff}, 64))
	c.expectClosed()
}

// TestRequireTLSConfig checks that RequireTLS without a certificate is refused at Serve.
func TestRequireTLSConfig(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	s := &Server{Exports: newMemExports(), RequireTLS: true}
	if err := s.Serve(l); err == nil || !strings.Contains(err.Error(), "TLSConfig") {
		t.Fatalf("Serve with RequireTLS and no TLSConfig: %v", err)
	}
}
