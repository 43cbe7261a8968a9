package storage

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// testPKI is a throw-away CA with a server and a client certificate, laid out the way
// libnbd's tls-certificates directory wants (ca-cert.pem, client-cert.pem, client-key.pem).
type testPKI struct {
	dir                   string // CA, server cert and key
	clientDir             string // what a trusted client has
	anonDir               string // only the CA: a client without a certificate
	serverCert, serverKey string
	ca                    string
}

func newTestPKI(t *testing.T) *testPKI {
	t.Helper()
	p := &testPKI{dir: t.TempDir(), clientDir: t.TempDir(), anonDir: t.TempDir()}
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "grow test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	caCert, _ := x509.ParseCertificate(caDER)
	issue := func(serial int64, cn string, usage x509.ExtKeyUsage, dir, certName, keyName string) {
		key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: cn},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
			KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{usage},
			DNSNames: []string{"localhost"}, IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &key.PublicKey, caKey)
		if err != nil {
			t.Fatal(err)
		}
		kb, _ := x509.MarshalECPrivateKey(key)
		writePEM(t, filepath.Join(dir, certName), "CERTIFICATE", der)
		writePEM(t, filepath.Join(dir, keyName), "EC PRIVATE KEY", kb)
	}
	for _, d := range []string{p.dir, p.clientDir, p.anonDir} {
		writePEM(t, filepath.Join(d, "ca-cert.pem"), "CERTIFICATE", caDER)
	}
	p.ca = filepath.Join(p.dir, "ca-cert.pem")
	issue(2, "localhost", x509.ExtKeyUsageServerAuth, p.dir, "server-cert.pem", "server-key.pem")
	issue(3, "grow test client", x509.ExtKeyUsageClientAuth, p.clientDir, "client-cert.pem", "client-key.pem")
	p.serverCert, p.serverKey = filepath.Join(p.dir, "server-cert.pem"), filepath.Join(p.dir, "server-key.pem")
	return p
}

func writePEM(t *testing.T, path, typ string, der []byte) {
	t.Helper()
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestTLS serves NBD with STARTTLS required and client certificates verified, and the
// admin API over HTTPS: a client with a certificate gets in, one without does not, and
// a plain-text client is refused.
func TestTLS(t *testing.T) {
	needTools(t, "nbdinfo", "qemu-io")
	pki := newTestPKI(t)
	c := startCtl(t, "--tls-cert", pki.serverCert, "--tls-key", pki.serverKey, "--tls-client-ca", pki.ca, "--tls-required")
	c.CACert = pki.ca
	if c.API[:8] != "https://" {
		t.Fatalf("the admin API is not HTTPS with a certificate: %s", c.API)
	}
	c.mustCLI("volume", "create", "secret", "--size", "16MiB")
	// The control plane learns from the stats that hosts must use TLS, and the name to verify.
	st, err := c.client().Stats(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if st.NBDTLS != "required" || st.NBDTLSName != "localhost" {
		t.Errorf("stats report nbd_tls %q, nbd_tls_name %q; want required, localhost (the certificate's DNS name)", st.NBDTLS, st.NBDTLSName)
	}

	_, port, _ := net.SplitHostPort(c.NBDAddr)
	tlsURI := func(dir string) string {
		return fmt.Sprintf("nbds://127.0.0.1:%s/secret?tls-certificates=%s", port, dir)
	}
	if r := run(t, "nbdinfo", "--is", "tls", tlsURI(pki.clientDir)); r.Code != 0 {
		t.Fatalf("nbdinfo over TLS with a client certificate: exit %d\n%s%s\n%s", r.Code, r.Stdout, r.Stderr, c.log())
	}
	mustRun(t, "nbdinfo", "--can", "flush", tlsURI(pki.clientDir))
	if r := run(t, "nbdinfo", "--can", "connect", tlsURI(pki.anonDir)); r.Code == 0 {
		t.Errorf("a client without a certificate got in")
	}
	if r := run(t, "nbdinfo", "--can", "connect", c.tcpURI("secret")); r.Code == 0 {
		t.Errorf("a plain-text client got in although TLS is required")
	}
	// Data goes through TLS intact.
	qemuTLS := fmt.Sprintf(`json:{"driver":"raw","file":{"driver":"nbd","server":{"type":"inet","host":"127.0.0.1","port":%q},"export":"secret","tls-creds":"tls0"}}`, port)
	obj := fmt.Sprintf("tls-creds-x509,id=tls0,endpoint=client,dir=%s", pki.clientDir)
	mustRun(t, "qemu-io", "--object", obj, "-c", "write -P 0x3c 1M 2M", "-c", "flush", "-c", "read -P 0x3c 1M 2M", qemuTLS)

	// The CLI without the CA does not trust the API's certificate.
	r := run(t, c.bin, "storage", "--controller", c.API, "--token", c.Token, "volume", "list")
	if r.Code == 0 {
		t.Errorf("the CLI trusted an unknown certificate")
	}
}
