// Command control measures the control plane for bench/control.sh: placement throughput
// and packing on a simulated cluster (pure, in process), and, given a running grow serve,
// the time from the create API call to QEMU running and to the guest's ready report for
// each named image. It prints Markdown. It only creates and deletes its own servers.
package main

import (
	"context"
	"flag"
	"fmt"
	"math/rand"
	"os"
	"sort"
	"strings"
	"time"

	"github.com/growserver/grow/client"
	"github.com/growserver/grow/internal/billing"
	"github.com/growserver/grow/internal/scheduler"
)

func main() {
	var (
		url, token, images, customer, plan string
		runs, servers, hosts               int
	)
	flag.StringVar(&url, "url", "", "grow serve API URL (empty: placement only)")
	flag.StringVar(&token, "token", "", "admin token")
	flag.StringVar(&images, "images", "", "comma-separated images to provision from")
	flag.StringVar(&customer, "customer", "bench", "customer the servers are created for")
	flag.StringVar(&plan, "plan", "E", "plan of the servers")
	flag.IntVar(&runs, "runs", 3, "creates per image")
	flag.IntVar(&servers, "servers", 20000, "simulated servers")
	flag.IntVar(&hosts, "hosts", 1000, "simulated hosts")
	flag.Parse()
	placement(servers, hosts)
	if url != "" {
		if err := provisioning(url, token, strings.Split(images, ","), customer, plan, runs); err != nil {
			fmt.Fprintln(os.Stderr, "bench:", err)
			os.Exit(1)
		}
	}
}

// placement places servers of the S–E mix (10 % with an anti-affinity group) one by one
// on identical 64 GiB / 32-thread hosts with N+1 kept.
func placement(nServers, nHosts int) {
	plans := billing.DefaultPlans()
	weights := map[string]int{"S": 5, "A": 10, "B": 20, "C": 25, "D": 20, "E": 20}
	r := rand.New(rand.NewSource(1))
	reqs := make([]scheduler.Request, nServers)
	for i := range reqs {
		w := r.Intn(100)
		for _, p := range plans {
			if w < weights[p.Name] {
				reqs[i] = scheduler.Request{VCPUs: p.VCPUs, MemoryBytes: p.MemoryBytes}
				break
			}
			w -= weights[p.Name]
		}
		if r.Intn(10) == 0 {
			reqs[i].Group = fmt.Sprintf("cust%d/db", r.Intn(nServers/40+1))
		}
	}
	const hostMem = 64 << 30
	var best time.Duration
	var used, lower int
	var short int64
	for rep := 0; rep < 5; rep++ {
		snap := &scheduler.Snapshot{Hosts: make([]scheduler.Host, nHosts)}
		for i := range snap.Hosts {
			snap.Hosts[i] = scheduler.Host{ID: fmt.Sprintf("h%04d", i), CPUs: 32, MemoryBytes: hostMem}
		}
		var total int64
		start := time.Now()
		for _, req := range reqs {
			i, err := scheduler.Place(snap, req, scheduler.DefaultPolicy)
			if err != nil {
				fmt.Fprintln(os.Stderr, "bench: placement failed:", err)
				os.Exit(1)
			}
			snap.Assign(i, req)
			total += req.MemoryBytes
		}
		el := time.Since(start)
		if best == 0 || el < best {
			best = el
		}
		used = 0
		for _, h := range snap.Hosts {
			if h.UsedMemory > 0 {
				used++
			}
		}
		lower = int((total + hostMem - 1) / hostMem)
		short = scheduler.EvacuationShortfall(snap)
	}
	fmt.Printf("## Placement\n\n%d servers (S–E mix, 10 %% in anti-affinity groups) placed one at a time on %d simulated hosts "+
		"(32 threads, 64 GiB, CPU overcommit 4, N+1 kept); best of 5 runs.\n\n", nServers, nHosts)
	fmt.Println("| metric | result | target |")
	fmt.Println("|---|---|---|")
	fmt.Printf("| placements per second | %.0f | >= 10,000 |\n", float64(nServers)/best.Seconds())
	fmt.Printf("| time per placement | %.1f µs | |\n", float64(best.Microseconds())/float64(nServers))
	fmt.Printf("| hosts used / memory lower bound | %d / %d (+%.2f %%) | within 2 %% |\n", used, lower, 100*float64(used-lower)/float64(lower))
	fmt.Printf("| N+1 shortfall (bytes a failed host could not re-home) | %d | 0 |\n\n", short)
}

type sample struct{ running, ready time.Duration }

// provisioning creates runs servers per image through the API and times each phase from
// the moment the create call is sent: the operation reaching "wait for guest" (QEMU is
// running) and succeeding (the guest reported ready).
func provisioning(url, token string, images []string, customer, plan string, runs int) error {
	c, err := client.New(url, token)
	if err != nil {
		return err
	}
	ctx := context.Background()
	if _, err := c.GetCustomer(ctx, customer); err != nil {
		max := 0
		if _, err := c.CreateCustomer(ctx, client.CustomerReq{Name: customer, MaxServers: &max}); err != nil {
			return err
		}
	}
	res := map[string][]sample{}
	sizes := map[string]int64{}
	for _, img := range images {
		im, err := c.GetImage(ctx, img)
		if err != nil {
			return err
		}
		sizes[img] = im.SizeBytes
	}
	// Interleave the images so machine load drifts affect both alike.
	for i := 0; i < runs; i++ {
		for _, img := range images {
			name := fmt.Sprintf("bench-%d-%d", i, rand.Intn(1e6))
			t0 := time.Now()
			op, err := c.CreateServer(ctx, client.CreateServer{Name: name, Customer: customer, Plan: plan, Image: img}, "")
			if err != nil {
				return err
			}
			var s sample
			for {
				op, err = c.GetOperation(ctx, op.ID)
				if err != nil {
					return err
				}
				if s.running == 0 && (op.Step == "wait for guest" || op.State == "succeeded") {
					s.running = time.Since(t0)
				}
				if op.Done() {
					break
				}
				time.Sleep(10 * time.Millisecond)
			}
			s.ready = time.Since(t0)
			if op.State != "succeeded" {
				return fmt.Errorf("create from %s %s: %s", img, op.State, op.Error)
			}
			res[img] = append(res[img], s)
			dop, err := c.DeleteServer(ctx, name)
			if err != nil {
				return err
			}
			if dop, err = c.WaitOperation(ctx, dop.ID, 50*time.Millisecond, nil); err != nil || dop.State != "succeeded" {
				return fmt.Errorf("delete %s: %v %s", name, err, dop.Error)
			}
		}
	}
	fmt.Printf("## Provisioning\n\n`grow serve` all-in-one (local storage controller and host agent, TCG), plan %s, %d creates per image, "+
		"interleaved. Times from the create API call; \"QEMU running\" is the operation reaching the guest wait (clone, seed, "+
		"define and start done), \"guest ready\" is the guest's cloud-init ready report.\n\n", plan, runs)
	fmt.Println("| image | image size | QEMU running (median, min-max) | guest ready (median, min-max) |")
	fmt.Println("|---|---|---|---|")
	for _, img := range images {
		ss := res[img]
		run := make([]time.Duration, len(ss))
		rdy := make([]time.Duration, len(ss))
		for i, s := range ss {
			run[i], rdy[i] = s.running, s.ready
		}
		fmt.Printf("| %s | %d GiB | %s | %s |\n", img, sizes[img]>>30, stats(run), stats(rdy))
	}
	fmt.Println()
	return nil
}

func stats(d []time.Duration) string {
	sort.Slice(d, func(i, j int) bool { return d[i] < d[j] })
	r := func(x time.Duration) string { return x.Round(10 * time.Millisecond).String() }
	return fmt.Sprintf("%s (%s-%s)", r(d[len(d)/2]), r(d[0]), r(d[len(d)-1]))
}
