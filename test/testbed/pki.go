package testbed

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
	"time"
)

// TLSServerName is the name in every test server certificate: hosts verify a mirrored
// pair's controllers against it, whichever of the two answers on a service address.
const TLSServerName = "grow-storage.test"

// PKI is a throw-away certificate authority with one server certificate (for both
// controllers of a pair: server and client use, since each dials its partner) and the
// directories QEMU's tls-creds-x509 and libnbd's tls-certificates read.
type PKI struct {
	CA         string // ca-cert.pem
	ServerCert string // server-cert.pem
	ServerKey  string // server-key.pem
	ClientDir  string // ca-cert.pem, client-cert.pem, client-key.pem: a trusted host
	AnonDir    string // ca-cert.pem only: a client without a certificate
	OtherDir   string // a client certificate of another CA: an untrusted machine
}

// NewPKI writes a CA, a server certificate valid for TLSServerName and the given IP
// addresses, and client directories under dir.
func NewPKI(dir string, ips ...string) (*PKI, error) {
	p := &PKI{ClientDir: filepath.Join(dir, "client"), AnonDir: filepath.Join(dir, "anon"), OtherDir: filepath.Join(dir, "other")}
	for _, d := range []string{dir, p.ClientDir, p.AnonDir, p.OtherDir} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, err
		}
	}
	ca, caKey, caDER, err := newCA("grow test CA")
	if err != nil {
		return nil, err
	}
	var addrs []net.IP
	for _, s := range ips {
		ip := net.ParseIP(s)
		if ip == nil {
			return nil, fmt.Errorf("bad IP address %q for a test certificate", s)
		}
		addrs = append(addrs, ip)
	}
	p.CA = filepath.Join(dir, "ca-cert.pem")
	p.ServerCert, p.ServerKey = filepath.Join(dir, "server-cert.pem"), filepath.Join(dir, "server-key.pem")
	if err := issue(ca, caKey, TLSServerName, addrs, []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		p.ServerCert, p.ServerKey); err != nil {
		return nil, err
	}
	if err := issue(ca, caKey, "grow test host", nil, []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		filepath.Join(p.ClientDir, "client-cert.pem"), filepath.Join(p.ClientDir, "client-key.pem")); err != nil {
		return nil, err
	}
	other, otherKey, _, err := newCA("some other CA")
	if err != nil {
		return nil, err
	}
	if err := issue(other, otherKey, "intruder", nil, []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		filepath.Join(p.OtherDir, "client-cert.pem"), filepath.Join(p.OtherDir, "client-key.pem")); err != nil {
		return nil, err
	}
	// Every client trusts the real CA: only the client certificate differs.
	for _, d := range []string{dir, p.ClientDir, p.AnonDir, p.OtherDir} {
		if err := writePEMFile(filepath.Join(d, "ca-cert.pem"), "CERTIFICATE", caDER); err != nil {
			return nil, err
		}
	}
	return p, nil
}

func newCA(cn string) (*x509.Certificate, *ecdsa.PrivateKey, []byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, nil, nil, err
	}
	cert, err := x509.ParseCertificate(der)
	return cert, key, der, err
}

func issue(ca *x509.Certificate, caKey *ecdsa.PrivateKey, cn string, ips []net.IP, usage []x509.ExtKeyUsage, certPath, keyPath string) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	sn, err := rand.Int(rand.Reader, big.NewInt(1<<62))
	if err != nil {
		return err
	}
	tmpl := &x509.Certificate{
		SerialNumber: sn, Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: usage,
		DNSNames: []string{cn}, IPAddresses: ips,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		return err
	}
	kb, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return err
	}
	if err := writePEMFile(certPath, "CERTIFICATE", der); err != nil {
		return err
	}
	return writePEMFile(keyPath, "EC PRIVATE KEY", kb)
}

func writePEMFile(path, typ string, der []byte) error {
	return os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600)
}
