package revert

import (
	"reflect"
	"testing"
)

func TestFailRunsUndoInReverse(t *testing.T) {
	var got []int
	r := New()
	for i := 1; i <= 3; i++ {
		r.Add(func() { got = append(got, i) })
	}
	r.Fail()
	r.Fail()
	if !reflect.DeepEqual(got, []int{3, 2, 1}) {
		t.Fatalf("undo order %v, want [3 2 1]", got)
	}
}

func TestSuccessSkipsUndo(t *testing.T) {
	ran := false
	r := New()
	r.Add(func() { ran = true })
	r.Success()
	r.Fail()
	if ran {
		t.Fatal("undo ran after Success")
	}
}
