package volume_test

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"

	"github.com/growserver/grow/internal/storage/dev"
	"github.com/growserver/grow/internal/storage/volume"
)

// A gold master is imported once, cloned per server in O(1), and written through a
// Handle; the image never changes.
func Example() {
	dir, _ := os.MkdirTemp("", "volume-example")
	defer os.RemoveAll(dir)
	d, _ := dev.OpenFile(filepath.Join(dir, "disk0.img"), 1<<30)
	defer d.Close()
	m, err := volume.Open(filepath.Join(dir, "meta"), d, volume.Options{})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer m.Close()

	gold := bytes.Repeat([]byte("debian12"), 1<<17) // 1 MiB
	if _, err := m.ImportImage("debian-12", int64(len(gold)), bytes.NewReader(gold), nil); err != nil {
		fmt.Println(err)
		return
	}
	vm, _ := m.Clone("debian-12", "vm-1001")
	fmt.Println(vm.Name, vm.Kind, "parent", vm.Parent, "allocated", vm.Allocated)

	h, _ := m.Open("vm-1001")
	h.WriteAt([]byte("hostname=vm-1001"), 0, false)
	h.Flush()
	buf := make([]byte, 16)
	h.ReadAt(buf, 0)
	fmt.Println(string(buf))
	h.Close()

	img, _ := m.Open("debian-12")
	img.ReadAt(buf, 0)
	fmt.Println(string(buf))
	img.Close()

	if err := m.Delete("debian-12"); err != nil {
		fmt.Println("delete image:", err)
	}
	vm, _ = m.Get("vm-1001")
	fmt.Println("clone owns", vm.Allocated, "bytes")
	// Output:
	// vm-1001 volume parent debian-12 allocated 0
	// hostname=vm-1001
	// debian12debian12
	// delete image: Failed to delete image "debian-12": 1 clone(s) depend on it: in use
	// clone owns 65536 bytes
}
