package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/growserver/grow/client"
	"github.com/growserver/grow/internal/units"
)

// debianPackages is what a Debian 12 gold master needs beyond minbase: a kernel with its
// initrd, systemd, cloud-init (and the virtual package debootstrap cannot resolve), SSH.
var debianPackages = []string{"systemd-sysv", "udev", "dbus", "linux-image-cloud-amd64", "initramfs-tools", "cloud-init",
	"cloud-guest-utils", "openssh-server", "iproute2", "isc-dhcp-client", "sudo", "netbase", "python3-cffi-backend", "e2fsprogs"}

// debianCloudCfg makes cloud-init fast and NoCloud-only on GrowServer.
const debianCloudCfg = `# Written by grow image build.
datasource_list: [NoCloud, None]
ssh_genkeytypes: [ed25519, ecdsa]
manage_etc_hosts: true
locale: false
resize_rootfs: true
growpart:
  mode: "off"
`

func newImageBuildCmd(o *cpOpts) *cobra.Command {
	var mirror, size, bootDir, cacheDir, workDir string
	var keep bool
	cmd := &cobra.Command{
		Use:   "build debian-12 NAME",
		Short: "Build a Debian 12 gold master with debootstrap (kernel, cloud-init, openssh-server) and import it",
		Long: `Build a Debian 12 (bookworm) gold master on this machine and import it as NAME.
debootstrap (as root) installs a minimal system with the cloud kernel, cloud-init and
openssh-server; the root filesystem is written straight onto the image (ext4 over the
whole disk, so a grown disk is grown online by cloud-init's resize2fs). The kernel and
initrd are copied to --boot-dir, which must be the same path on every host (for the
all-in-one installation, this machine). Takes a few minutes and about 90 MiB of downloads.`,
		Args: cobra.ExactArgs(2),
		ValidArgsFunction: func(cmd *cobra.Command, args []string, _ string) ([]string, cobra.ShellCompDirective) {
			if len(args) == 0 {
				return []string{"debian-12"}, cobra.ShellCompDirectiveNoFileComp
			}
			return nil, cobra.ShellCompDirectiveNoFileComp
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			if args[0] != "debian-12" {
				return &ExitError{Code: exitUsage, Err: fmt.Errorf("Unknown distribution %q: only debian-12 can be built", args[0])}
			}
			name := args[1]
			n, err := units.ParseSize(size)
			if err != nil || n < 1<<30 {
				return &ExitError{Code: exitUsage, Err: fmt.Errorf("Invalid --size %q: want at least 1GiB", size)}
			}
			if os.Geteuid() != 0 {
				return &ExitError{Code: exitAuth, Err: fmt.Errorf("debootstrap needs root")}
			}
			if bootDir == "" {
				bootDir = filepath.Join(firstNonEmpty(o.data, os.Getenv("GROW_DATA"), defaultServeDataDir), "images", name)
			}
			return o.do(func(ctx context.Context, c *client.Client) error {
				if _, err := c.GetImage(ctx, name); err == nil {
					return &ExitError{Code: exitConflict, Err: fmt.Errorf("Image %q exists already", name)}
				}
				work, err := os.MkdirTemp(workDir, "grow-build-")
				if err != nil {
					return fmt.Errorf("Failed to create a build directory: %w", err)
				}
				if !keep {
					defer os.RemoveAll(work)
				}
				img, kernel, initrd, err := buildDebian(ctx, cmd, work, mirror, cacheDir, bootDir, n)
				if err != nil {
					return err
				}
				f, err := os.Open(img)
				if err != nil {
					return fmt.Errorf("Failed to open the built image: %w", err)
				}
				defer f.Close()
				fmt.Fprintf(cmd.ErrOrStderr(), "build: importing %s\n", name)
				im, err := c.ImportImage(ctx, name, f, n, client.ImportOptions{Format: "raw", Kernel: kernel, Initrd: initrd,
					Cmdline: "root=/dev/vda rw console=ttyS0 net.ifnames=0"})
				if err != nil {
					return cpErr(err)
				}
				return o.emit(cmd.OutOrStdout(), im, func(tw *tabwriter.Writer) {
					fmt.Fprintf(tw, "Image %s built and imported (%s; kernel %s)\n", im.Name, size, kernel)
				})
			})
		},
	}
	f := cmd.Flags()
	f.StringVar(&mirror, "mirror", "http://deb.debian.org/debian", "Debian mirror")
	f.StringVar(&size, "size", "2GiB", "image (disk) size")
	f.StringVar(&bootDir, "boot-dir", "", "where the kernel and initrd go, the same path on every host (default DATA/images/NAME)")
	f.StringVar(&cacheDir, "cache-dir", "/var/cache/grow/debootstrap", "where downloaded packages are kept between builds")
	f.StringVar(&workDir, "work-dir", "", "parent of the temporary build directory (default $TMPDIR)")
	f.BoolVar(&keep, "keep", false, "keep the build directory")
	return cmd
}

// buildDebian runs debootstrap and lays the root filesystem onto a raw image; it returns
// the image path and the installed kernel and initrd paths.
func buildDebian(ctx context.Context, cmd *cobra.Command, work, mirror, cacheDir, bootDir string, size int64) (string, string, string, error) {
	say := func(format string, a ...any) { fmt.Fprintf(cmd.ErrOrStderr(), "build: "+format+"\n", a...) }
	run := func(name string, args ...string) error {
		c := exec.CommandContext(ctx, name, args...)
		c.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive", "LC_ALL=C")
		out, err := c.CombinedOutput()
		if err != nil {
			return fmt.Errorf("%s failed: %w\n%s", name, err, tailLines(string(out), 30))
		}
		return nil
	}
	for _, tool := range []string{"debootstrap", "mkfs.ext4"} {
		if _, err := exec.LookPath(tool); err != nil {
			return "", "", "", fmt.Errorf("%s is missing (run scripts/install-deps.sh): %w", tool, err)
		}
	}
	rootfs := filepath.Join(work, "rootfs")
	args := []string{"--variant=minbase", "--include=" + strings.Join(debianPackages, ","), "--components=main"}
	if cacheDir != "" {
		if err := os.MkdirAll(cacheDir, 0o755); err != nil {
			return "", "", "", fmt.Errorf("Failed to create %q: %w", cacheDir, err)
		}
		args = append(args, "--cache-dir="+cacheDir)
		// Concurrent builds would write the same package files: one debootstrap at a time per cache.
		lock, err := os.OpenFile(filepath.Join(cacheDir, ".lock"), os.O_CREATE|os.O_RDWR, 0o644)
		if err != nil {
			return "", "", "", fmt.Errorf("Failed to open the cache lock: %w", err)
		}
		defer lock.Close()
		if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
			return "", "", "", fmt.Errorf("Failed to lock %q: %w", cacheDir, err)
		}
		defer syscall.Flock(int(lock.Fd()), syscall.LOCK_UN)
	}
	say("debootstrap bookworm from %s (a few minutes)", mirror)
	if err := run("debootstrap", append(args, "bookworm", rootfs, mirror)...); err != nil {
		return "", "", "", err
	}
	say("configuring")
	files := map[string]string{
		"etc/fstab":                         "/dev/vda / ext4 defaults,errors=remount-ro 0 1\n",
		"etc/cloud/cloud.cfg.d/90-grow.cfg": debianCloudCfg,
		"etc/hostname":                      "localhost\n",
		"etc/machine-id":                    "",
		// A static address must not wait for router advertisements that never come.
		"etc/systemd/system/systemd-networkd-wait-online.service.d/grow.conf": "[Service]\nExecStart=\nExecStart=/lib/systemd/systemd-networkd-wait-online --any --timeout=10\n",
	}
	for p, content := range files {
		full := filepath.Join(rootfs, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			return "", "", "", err
		}
		if err := os.WriteFile(full, []byte(content), 0o644); err != nil {
			return "", "", "", fmt.Errorf("Failed to write %s: %w", p, err)
		}
	}
	// cloud-init renders network-config for systemd-networkd, which minbase leaves disabled.
	if err := run("chroot", rootfs, "systemctl", "enable", "systemd-networkd.service"); err != nil {
		return "", "", "", err
	}
	_ = os.Remove(filepath.Join(rootfs, "var/lib/dbus/machine-id"))
	for _, d := range []string{"var/cache/apt/archives", "var/lib/apt/lists"} {
		ents, _ := os.ReadDir(filepath.Join(rootfs, d))
		for _, e := range ents {
			if !e.IsDir() {
				_ = os.Remove(filepath.Join(rootfs, d, e.Name()))
			}
		}
	}
	kernels, _ := filepath.Glob(filepath.Join(rootfs, "boot", "vmlinuz-*"))
	initrds, _ := filepath.Glob(filepath.Join(rootfs, "boot", "initrd.img-*"))
	if len(kernels) == 0 || len(initrds) == 0 {
		return "", "", "", fmt.Errorf("debootstrap installed no kernel or initrd")
	}
	if err := os.MkdirAll(bootDir, 0o755); err != nil {
		return "", "", "", fmt.Errorf("Failed to create %q: %w", bootDir, err)
	}
	kernel, initrd := filepath.Join(bootDir, "vmlinuz"), filepath.Join(bootDir, "initrd.img")
	if err := copyFile(kernels[len(kernels)-1], kernel); err != nil {
		return "", "", "", err
	}
	if err := copyFile(initrds[len(initrds)-1], initrd); err != nil {
		return "", "", "", err
	}
	img := filepath.Join(work, "disk.raw")
	say("writing the root filesystem into a %s image", units.FormatSize(size))
	if err := run("mkfs.ext4", "-q", "-F", "-L", "root", "-d", rootfs, img, fmt.Sprintf("%dk", size/1024)); err != nil {
		return "", "", "", err
	}
	return img, kernel, initrd, nil
}

func tailLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
