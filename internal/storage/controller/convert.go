package controller

import (
	"github.com/growserver/grow/internal/storage/adminclient"
	"github.com/growserver/grow/internal/storage/volume"
)

// apiVolumes lists every volume with its clone/snapshot children counted.
func (c *Controller) apiVolumes() []adminclient.Volume {
	vols := c.mgr.List()
	children := make(map[string]int, len(vols))
	for _, v := range vols {
		if v.Parent != "" {
			children[v.Parent]++
		}
	}
	out := make([]adminclient.Volume, 0, len(vols))
	for _, v := range vols {
		a := toAPIVolume(v)
		a.Children = children[v.Name]
		c.decorate(&a)
		out = append(out, a)
	}
	return out
}

// apiVolume converts one volume, counting the volumes that depend on it.
func (c *Controller) apiVolume(v volume.Info) adminclient.Volume {
	a := toAPIVolume(v)
	for _, o := range c.mgr.List() {
		if o.Parent == v.Name {
			a.Children++
		}
	}
	c.decorate(&a)
	return a
}

func toAPIVolume(v volume.Info) adminclient.Volume {
	return adminclient.Volume{
		Name: v.Name, Kind: v.Kind, Size: v.Size, Allocated: v.Allocated,
		Parent: v.Parent, ReadOnly: v.ReadOnly, Created: v.Created,
	}
}

func toAPICheck(r volume.Report) adminclient.CheckReport {
	p := r.Problems
	if p == nil {
		p = []string{}
	}
	return adminclient.CheckReport{OK: r.Clean(), Volumes: r.Objects, Clusters: r.ClustersUsed, Problems: p}
}

// describe is the NBD_OPT_LIST description of a volume.
func describe(v volume.Info) string {
	if v.Parent != "" {
		return v.Kind + " cloned from " + v.Parent
	}
	return v.Kind
}
