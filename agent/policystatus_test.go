package agent

import (
	"errors"
	"strings"
	"testing"

	"github.com/sluice-io/sluice/policy/apis/policy/v1alpha1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// The status is written only when it would change: a leader that rereads
// every object each minute writes nothing when nothing changed.
func TestAcceptedStatus(t *testing.T) {
	st, changed := acceptedStatus(v1alpha1.PolicyStatus{}, 1, nil)
	c := meta.FindStatusCondition(st.Conditions, ConditionAccepted)
	if !changed || st.ObservedGeneration != 1 || c == nil || c.Status != metav1.ConditionTrue || c.Reason != ReasonValid || c.ObservedGeneration != 1 {
		t.Fatalf("first status %+v (changed %v)", st, changed)
	}
	if _, changed := acceptedStatus(st, 1, nil); changed {
		t.Error("the same generation and result rewrote the status")
	}
	st2, changed := acceptedStatus(st, 2, nil)
	if !changed || st2.ObservedGeneration != 2 || meta.FindStatusCondition(st2.Conditions, ConditionAccepted).ObservedGeneration != 2 {
		t.Errorf("a new generation: %+v (changed %v)", st2, changed)
	}
	bad, changed := acceptedStatus(st2, 3, errors.New("spec.egress[0]: hostname: empty label"))
	c = meta.FindStatusCondition(bad.Conditions, ConditionAccepted)
	if !changed || c.Status != metav1.ConditionFalse || c.Reason != ReasonInvalid || !strings.Contains(c.Message, "spec.egress[0]") || len(bad.Conditions) != 1 {
		t.Errorf("invalid: %+v (changed %v)", bad, changed)
	}
	long, _ := acceptedStatus(st, 1, errors.New(strings.Repeat("x", 40000)))
	if n := len(meta.FindStatusCondition(long.Conditions, ConditionAccepted).Message); n > maxConditionMessage {
		t.Errorf("message of %d bytes, more than the API allows", n)
	}
}
