package nbd

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// BenchmarkFioVsNbdkit runs fio's nbd engine against this server (in-memory export,
// in this process) and against `nbdkit memory`, alternating job by job in one run,
// and prints a table with the ratios. It is a measurement, not a unit benchmark:
//
//	go test -run '^$' -bench FioVsNbdkit -benchtime 1x ./internal/storage/nbd
//
// NBD_BENCH_RUNTIME (seconds per job, default 8), NBD_BENCH_ROUNDS (alternating
// rounds, best of which is reported, default 3) and NBD_BENCH_TRANSPORT (tcp or
// unix, default tcp) tune it; NBD_BENCH_JOBS=randread,seqwrite picks jobs;
// NBD_BENCH_NBDKIT_THREADS sets nbdkit's --threads (a diagnostic: on a loaded
// machine a server with more threads gets a larger share of the CPUs).
func BenchmarkFioVsNbdkit(b *testing.B) {
	for _, tool := range []string{"fio", "nbdkit"} {
		if _, err := exec.LookPath(tool); err != nil {
			b.Fatalf("%s is required: %v", tool, err)
		}
	}
	runtime := 8
	if v, err := strconv.Atoi(os.Getenv("NBD_BENCH_RUNTIME")); err == nil && v > 0 {
		runtime = v
	}
	rounds := 3
	if v, err := strconv.Atoi(os.Getenv("NBD_BENCH_ROUNDS")); err == nil && v > 0 {
		rounds = v
	}
	transport := os.Getenv("NBD_BENCH_TRANSPORT")
	if transport == "" {
		transport = "tcp"
	}
	const size = 512 << 20
	ex := newMemExports()
	ex.add("disk", "", newMemExport(size))
	s := startServer(b, ex, nil)
	s.srv.Logger = slog.New(slog.DiscardHandler) // no logging cost in measurements
	ours := s.tcpURI("disk")
	if transport == "unix" {
		ours = s.unixURI("disk")
	}
	theirs, nbdkitPid := startNbdkit(b, transport, size)
	cpu := []func() time.Duration{selfCPU, func() time.Duration { return procCPU(b, nbdkitPid) }}

	type job struct {
		name string
		args []string
		read bool
		iops bool
	}
	jobs := []job{
		{"4k randread", []string{"--rw=randread", "--bs=4k"}, true, true},
		{"4k randwrite", []string{"--rw=randwrite", "--bs=4k"}, false, true},
		{"1M seqread", []string{"--rw=read", "--bs=1M"}, true, false},
		{"1M seqwrite", []string{"--rw=write", "--bs=1M"}, false, false},
	}
	dir := b.TempDir()
	// Fill both exports with data first so reads move real bytes (cache warm).
	for _, uri := range []string{ours, theirs} {
		fio(b, dir, uri, 1, []string{"--rw=write", "--bs=1M", "--iodepth=8", "--numjobs=1", "--size=" + strconv.Itoa(size)})
	}
	b.ResetTimer()
	var table strings.Builder
	fmt.Fprintf(&table, "\n%-14s %16s %16s %8s %14s %14s\n", "job (2x32)", "grow nbd", "nbdkit memory", "ratio", "grow CPU/GB", "nbdkit CPU/GB")
	only := os.Getenv("NBD_BENCH_JOBS")
	for _, j := range jobs {
		if only != "" && !strings.Contains(only, strings.Fields(j.name)[1]) {
			continue
		}
		args := append([]string{"--iodepth=32", "--numjobs=2", "--time_based", "--runtime=" + strconv.Itoa(runtime), "--size=" + strconv.Itoa(size)}, j.args...)
		if strings.Contains(j.name, "seq") {
			args = append(args, "--offset_increment="+strconv.Itoa(size/2), "--size="+strconv.Itoa(size/2))
		}
		var res, cpuPerGB [2]float64
		for round := 0; round < rounds; round++ {
			for i, uri := range []string{ours, theirs} {
				before := cpu[i]()
				st := s.srv.Stats()
				r := fio(b, dir, uri, runtime, args)
				used := cpu[i]() - before
				if i == 0 {
					st2 := s.srv.Stats()
					b.Logf("%s: %.2f requests per reply write", j.name, float64(st2.Requests-st.Requests)/float64(st2.ReplyWrites-st.ReplyWrites))
				}
				side := r.Write
				if j.read {
					side = r.Read
				}
				v := side.BWBytes / 1e9
				if j.iops {
					v = side.IOPS
				}
				// Best of the rounds: on a shared machine the best run is the one
				// least disturbed by others.
				if v > res[i] {
					res[i] = v
					cpuPerGB[i] = used.Seconds() / (side.BWBytes * float64(runtime) / 1e9)
				}
			}
		}
		unit := "IOPS"
		format := "%14.0f"
		if !j.iops {
			unit = "GB/s"
			format = "%14.2f"
		}
		fmt.Fprintf(&table, "%-14s "+format+" %s "+format+" %s %7.2fx %12.2f s %12.2f s\n", j.name, res[0], unit[:2], res[1], unit[:2], res[0]/res[1], cpuPerGB[0], cpuPerGB[1])
	}
	fmt.Fprintf(&table, "transport %s, best of %d alternating rounds of %d s per job, 4k in IOPS, 1M in GB/s; ratio = grow / nbdkit;\nCPU/GB = server CPU seconds (user+system) per GB moved in that best run, lower is better\n", transport, rounds, runtime)
	b.Log(table.String())
	fmt.Println(table.String())
}

// fioSide is the part of fio's JSON output the benchmark reads.
type fioSide struct {
	IOPS    float64 `json:"iops"`
	BWBytes float64 `json:"bw_bytes"`
}

type fioJob struct {
	Read  fioSide `json:"read"`
	Write fioSide `json:"write"`
}

func fio(b *testing.B, dir, uri string, runtime int, args []string) fioJob {
	b.Helper()
	out := filepath.Join(dir, "fio.json")
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(runtime+60)*time.Second)
	defer cancel()
	full := append([]string{"--name=bench", "--ioengine=nbd", "--uri=" + uri, "--group_reporting", "--output-format=json", "--output=" + out}, args...)
	cmd := exec.CommandContext(ctx, "fio", full...)
	if o, err := cmd.CombinedOutput(); err != nil {
		b.Fatalf("fio %s: %v\n%s", strings.Join(full, " "), err, o)
	}
	data, err := os.ReadFile(out)
	if err != nil {
		b.Fatal(err)
	}
	var r struct {
		Jobs []fioJob `json:"jobs"`
	}
	if err := json.Unmarshal(data, &r); err != nil || len(r.Jobs) != 1 {
		b.Fatalf("fio output: %v\n%s", err, data)
	}
	return r.Jobs[0]
}

// selfCPU is the CPU time this process has used.
func selfCPU() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// procCPU is the CPU time process pid has used, from /proc (clock ticks of 10 ms).
func procCPU(b *testing.B, pid int) time.Duration {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		b.Fatal(err)
	}
	f := strings.Fields(string(data[strings.LastIndexByte(string(data), ')')+2:]))
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(ut+st) * 10 * time.Millisecond
}

// startNbdkit runs `nbdkit memory` on a free loopback port or a unix socket and returns its URI and pid.
func startNbdkit(b *testing.B, transport string, size int) (string, int) {
	b.Helper()
	var args []string
	var uri string
	if transport == "unix" {
		sock := filepath.Join(b.TempDir(), "nbdkit.sock")
		args = []string{"-U", sock}
		uri = "nbd+unix:///?socket=" + sock
	} else {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			b.Fatal(err)
		}
		port := strconv.Itoa(l.Addr().(*net.TCPAddr).Port)
		l.Close()
		args = []string{"-i", "127.0.0.1", "-p", port}
		uri = "nbd://127.0.0.1:" + port + "/"
	}
	args = append([]string{"--foreground", "--exit-with-parent"}, args...)
	if t := os.Getenv("NBD_BENCH_NBDKIT_THREADS"); t != "" {
		args = append(args, "--threads="+t)
	}
	args = append(args, "memory", strconv.Itoa(size))
	cmd := exec.Command("nbdkit", args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		b.Fatalf("nbdkit: %v", err)
	}
	b.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	deadline := time.Now().Add(10 * time.Second)
	for {
		if out, err := exec.Command("nbdinfo", "--size", uri).CombinedOutput(); err == nil {
			break
		} else if time.Now().After(deadline) {
			b.Fatalf("nbdkit did not come up: %s", out)
		}
		time.Sleep(50 * time.Millisecond)
	}
	return uri, cmd.Process.Pid
}
