package volume

import "slices"

// Origin returns the image at the base of the volume's chain ("" for a volume made
// empty) and the byte ranges, in order and merged, where the volume may differ from
// it: every cluster that one of its own layers (the volume's, and its snapshots')
// maps or zeroes. A mirror partner that rebuilds the volume as a clone of the same
// image needs only these ranges copied.
func (h *Handle) Origin() (image string, changed [][2]int64, err error) {
	if err := h.usable("map"); err != nil {
		return "", nil, err
	}
	o := h.o
	o.io.RLock()
	defer o.io.RUnlock()
	if !o.readOnly() {
		o.tab.RLock()
		defer o.tab.RUnlock()
	}
	var clusters []uint64
	for l := o.layer; l != nil; l = l.parent {
		if l.owner != nil && l.owner.kind == KindImage {
			image = l.owner.name
			break
		}
		for k, lf := range l.tab.leaves {
			for j, e := range lf.e {
				if e != entNone {
					clusters = append(clusters, k<<leafShift|uint64(j))
				}
			}
		}
	}
	slices.Sort(clusters)
	clusters = slices.Compact(clusters)
	size := o.size.Load()
	for _, vc := range clusters {
		off := int64(vc) << clusterShift
		if off >= size {
			break
		}
		n := min(int64(ClusterSize), size-off)
		if k := len(changed); k > 0 && changed[k-1][0]+changed[k-1][1] == off {
			changed[k-1][1] += n
			continue
		}
		changed = append(changed, [2]int64{off, n})
	}
	return image, changed, nil
}
