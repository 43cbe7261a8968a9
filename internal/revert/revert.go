// Package revert undoes the finished steps of a multi-step operation that failed.
//
//	r := revert.New()
//	defer r.Fail()
//	... r.Add(undo) after each step ...
//	r.Success()
package revert

// Reverter collects undo functions and runs them in reverse order unless Success was called.
type Reverter struct {
	undo []func()
	done bool
}

// New returns an empty Reverter.
func New() *Reverter { return &Reverter{} }

// Add registers an undo step for something that has just been done.
func (r *Reverter) Add(f func()) { r.undo = append(r.undo, f) }

// Success marks the operation complete: Fail becomes a no-op.
func (r *Reverter) Success() { r.done = true }

// Fail runs the undo steps in reverse order, once, unless Success was called.
func (r *Reverter) Fail() {
	if r.done {
		return
	}
	r.done = true
	for i := len(r.undo) - 1; i >= 0; i-- {
		r.undo[i]()
	}
}
