// Package v1alpha1 is the policy.sluice.io/v1alpha1 API: EgressPolicy, a
// namespace's declaration of what its pods may reach, and
// ClusterEgressPolicy, the cluster's guardrails and baselines.
//
// The deepcopy functions and the CRD manifests are generated from these
// types by controller-gen, the typed clients, listers and informers in
// policy/client by code-generator (`make generate`).
//
// +kubebuilder:object:generate=true
// +groupName=policy.sluice.io
package v1alpha1
