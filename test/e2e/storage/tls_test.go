package storage

import (
	"fmt"
	"net"
	"testing"

	"github.com/growserver/grow/test/testbed"
)

// TestTLS serves NBD with STARTTLS required and client certificates verified, and the
// admin API over HTTPS: a client with a certificate gets in, one without does not, and
// a plain-text client is refused.
func TestTLS(t *testing.T) {
	needTools(t, "nbdinfo", "qemu-io")
	pki, err := testbed.NewPKI(t.TempDir(), "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	c := startCtl(t, "--tls-cert", pki.ServerCert, "--tls-key", pki.ServerKey, "--tls-client-ca", pki.CA, "--tls-required")
	c.CACert = pki.CA
	if c.API[:8] != "https://" {
		t.Fatalf("the admin API is not HTTPS with a certificate: %s", c.API)
	}
	c.mustCLI("volume", "create", "secret", "--size", "16MiB")
	// The control plane learns from the stats that hosts must use TLS, and the name to verify.
	st, err := c.client().Stats(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if st.NBDTLS != "required" || st.NBDTLSName != testbed.TLSServerName {
		t.Errorf("stats report nbd_tls %q, nbd_tls_name %q; want required, %s (the certificate's DNS name)", st.NBDTLS, st.NBDTLSName, testbed.TLSServerName)
	}

	_, port, _ := net.SplitHostPort(c.NBDAddr)
	tlsURI := func(dir string) string {
		return fmt.Sprintf("nbds://127.0.0.1:%s/secret?tls-certificates=%s", port, dir)
	}
	if r := run(t, "nbdinfo", "--is", "tls", tlsURI(pki.ClientDir)); r.Code != 0 {
		t.Fatalf("nbdinfo over TLS with a client certificate: exit %d\n%s%s\n%s", r.Code, r.Stdout, r.Stderr, c.log())
	}
	mustRun(t, "nbdinfo", "--can", "flush", tlsURI(pki.ClientDir))
	if r := run(t, "nbdinfo", "--can", "connect", tlsURI(pki.AnonDir)); r.Code == 0 {
		t.Errorf("a client without a certificate got in")
	}
	if r := run(t, "nbdinfo", "--can", "connect", c.tcpURI("secret")); r.Code == 0 {
		t.Errorf("a plain-text client got in although TLS is required")
	}
	// Data goes through TLS intact.
	qemuTLS := fmt.Sprintf(`json:{"driver":"raw","file":{"driver":"nbd","server":{"type":"inet","host":"127.0.0.1","port":%q},"export":"secret","tls-creds":"tls0"}}`, port)
	obj := fmt.Sprintf("tls-creds-x509,id=tls0,endpoint=client,dir=%s", pki.ClientDir)
	mustRun(t, "qemu-io", "--object", obj, "-c", "write -P 0x3c 1M 2M", "-c", "flush", "-c", "read -P 0x3c 1M 2M", qemuTLS)

	// The CLI without the CA does not trust the API's certificate.
	r := run(t, c.bin, "storage", "--controller", c.API, "--token", c.Token, "volume", "list")
	if r.Code == 0 {
		t.Errorf("the CLI trusted an unknown certificate")
	}
}
