package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Mode says what the proxy does with a selected pod's connections.
// +kubebuilder:validation:Enum=Audit;Enforce
type Mode string

const (
	// Audit allows and logs every connection with the pod's identity.
	ModeAudit Mode = "Audit"
	// Enforce allows only what the pod's effective policy allows.
	ModeEnforce Mode = "Enforce"
)

// FailMode says what happens to a selected pod's connections while the
// node's proxy is not ready.
// +kubebuilder:validation:Enum=Open;Closed
type FailMode string

const (
	// FailOpen: connections go direct.
	FailOpen FailMode = "Open"
	// FailClosed: connections are refused.
	FailClosed FailMode = "Closed"
)

// Tier is where a ClusterEgressPolicy sits.
// +kubebuilder:validation:Enum=Guardrail;Baseline
type Tier string

const (
	// TierGuardrail: the selected pods may reach at most these
	// destinations; nothing below can widen them.
	TierGuardrail Tier = "Guardrail"
	// TierBaseline: these destinations are granted to every selected pod.
	TierBaseline Tier = "Baseline"
)

// Port is a TCP port.
// +kubebuilder:validation:Minimum=1
// +kubebuilder:validation:Maximum=65535
type Port int32

// EgressRule allows one destination: a hostname the client names, an
// address range, or a TCP hostname the agent resolves; at the listed
// ports, or at any port when none is listed.
//
// +kubebuilder:validation:XValidation:rule="[has(self.hostname), has(self.cidr), has(self.tcpHostname)].filter(x, x).size() == 1",message="set exactly one of hostname, cidr and tcpHostname"
// +kubebuilder:validation:XValidation:rule="!has(self.tcpHostname) || (has(self.ports) && size(self.ports) > 0)",message="a tcpHostname needs ports: the addresses it resolves to may serve other things at other ports"
type EgressRule struct {
	// Hostname is matched against the name the client sends (TLS SNI,
	// HTTP Host): exact ("api.example.com") or a wildcard for every
	// subdomain ("*.example.com", which does not match example.com). The
	// proxy connects to what DNS says for the name, never to the address
	// the client dialled. Lowercase, no trailing dot; punycode for
	// non-ASCII names.
	// +optional
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=253
	// +kubebuilder:validation:XValidation:rule="self.matches('^([*][.])?([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?[.])*[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$')",message="not a lowercase hostname or *.wildcard (letters, digits, '-' and '.'; labels of 1-63 characters not starting or ending with '-'; '*' only as the whole first label)"
	// +kubebuilder:validation:XValidation:rule="!self.startsWith('*.') || self.substring(2).contains('.')",message="a wildcard must cover at least two labels (*.example.com, not *.com)"
	// +kubebuilder:validation:XValidation:rule="!self.matches('(^|[.])[0-9]+$')",message="the last label is numeric: write an address as a cidr"
	Hostname string `json:"hostname,omitempty"`

	// CIDR is an IPv4 or IPv6 address or prefix ("203.0.113.0/24",
	// "2001:db8::1"), matched against the destination the client dialled.
	// +optional
	// +kubebuilder:validation:MaxLength=64
	// +kubebuilder:validation:XValidation:rule="isIP(self) || isCIDR(self)",message="not an IP address or CIDR (no zones; IPv4-mapped IPv6 written as IPv4)"
	// +kubebuilder:validation:XValidation:rule="!isCIDR(self) || cidr(self).masked() == cidr(self)",message="host bits set: write the prefix's first address"
	CIDR string `json:"cidr,omitempty"`

	// TCPHostname is a name the agent resolves (A and AAAA, by TTL): its
	// addresses are allowed at Ports for any protocol, for clients that
	// send no name (databases, SSH). Exact, no wildcard; Ports required.
	// +optional
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=253
	// +kubebuilder:validation:XValidation:rule="self.matches('^([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?[.])*[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$')",message="not a lowercase hostname (a TCP hostname cannot be a wildcard: the agent resolves it)"
	// +kubebuilder:validation:XValidation:rule="!self.matches('(^|[.])[0-9]+$')",message="the last label is numeric: write an address as a cidr"
	TCPHostname string `json:"tcpHostname,omitempty"`

	// Ports are the destination ports; none: any port.
	// +optional
	// +listType=set
	// +kubebuilder:validation:MaxItems=32
	Ports []Port `json:"ports,omitempty"`
}

// PolicyStatus is written by one agent of the cluster (the holder of the
// status Lease), never by every node.
type PolicyStatus struct {
	// ObservedGeneration is the generation the conditions describe.
	// +optional
	ObservedGeneration int64 `json:"observedGeneration,omitempty"`
	// Conditions: Accepted (True: every entry and selector validated;
	// False: the reason says what did not, and the selected pods are
	// under the safest reading of the policy).
	// +optional
	// +listType=map
	// +listMapKey=type
	// +kubebuilder:validation:MaxItems=8
	Conditions []metav1.Condition `json:"conditions,omitempty"`
}

// EgressPolicySpec is what a namespace's owner declares for the pods
// PodSelector selects.
//
// +kubebuilder:validation:XValidation:rule="!has(self.egress) || self.egress.map(r, has(r.ports) ? size(r.ports) : 1).sum() <= 1024",message="egress expands to more than 1024 entries (each rule counts once per port)"
type EgressPolicySpec struct {
	// PodSelector selects pods of this namespace; {} selects them all. A
	// selected pod is redirected through its node's proxy.
	// +kubebuilder:validation:XValidation:rule="!has(self.matchExpressions) || self.matchExpressions.all(e, e.operator in ['In', 'NotIn', 'Exists', 'DoesNotExist'] && ((e.operator in ['In', 'NotIn']) == (has(e.values) && size(e.values) > 0)))",message="matchExpressions: operator is In, NotIn (with values), Exists or DoesNotExist (without)"
	PodSelector metav1.LabelSelector `json:"podSelector"`

	// Mode: Audit (allow and log) or Enforce (allow only the effective
	// policy). The strictest mode of every policy that applies wins.
	// +optional
	Mode Mode `json:"mode,omitempty"`

	// FailMode: while the proxy is not ready, Closed refuses connections
	// and Open lets them go direct. Default: Closed under Enforce, Open
	// under Audit; Closed anywhere wins.
	// +optional
	FailMode FailMode `json:"failMode,omitempty"`

	// Egress are the destinations the selected pods may reach, bounded by
	// the cluster's guardrails.
	// +optional
	// +listType=atomic
	// +kubebuilder:validation:MaxItems=256
	Egress []EgressRule `json:"egress,omitempty"`
}

// EgressPolicy declares what a namespace's pods may reach.
//
// +genclient
// +k8s:deepcopy-gen:interfaces=k8s.io/apimachinery/pkg/runtime.Object
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:shortName=egp,categories=sluice
// +kubebuilder:printcolumn:name="Mode",type=string,JSONPath=`.spec.mode`
// +kubebuilder:printcolumn:name="Accepted",type=string,JSONPath=`.status.conditions[?(@.type=="Accepted")].status`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type EgressPolicy struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec EgressPolicySpec `json:"spec"`
	// +optional
	Status PolicyStatus `json:"status,omitempty"`
}

// EgressPolicyList is a list of EgressPolicy.
//
// +kubebuilder:object:root=true
type EgressPolicyList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []EgressPolicy `json:"items"`
}

// ClusterEgressPolicySpec is a cluster admin's guardrail or baseline.
//
// +kubebuilder:validation:XValidation:rule="self.tier == 'Guardrail' || (!has(self.mode) && !has(self.failMode))",message="a Baseline grants destinations and sets no mode or failMode"
// +kubebuilder:validation:XValidation:rule="!has(self.egress) || self.egress.map(r, has(r.ports) ? size(r.ports) : 1).sum() <= 1024",message="egress expands to more than 1024 entries (each rule counts once per port)"
type ClusterEgressPolicySpec struct {
	// Tier: Guardrail (the selected pods may reach at most Egress; with
	// mode Enforce, they are enforced whatever anything below says) or
	// Baseline (Egress is granted to every selected pod; a baseline
	// selects no pod by itself).
	Tier Tier `json:"tier"`

	// NamespaceSelector selects namespaces by their labels; {} selects
	// every namespace.
	// +kubebuilder:validation:XValidation:rule="!has(self.matchExpressions) || self.matchExpressions.all(e, e.operator in ['In', 'NotIn', 'Exists', 'DoesNotExist'] && ((e.operator in ['In', 'NotIn']) == (has(e.values) && size(e.values) > 0)))",message="matchExpressions: operator is In, NotIn (with values), Exists or DoesNotExist (without)"
	NamespaceSelector metav1.LabelSelector `json:"namespaceSelector"`

	// PodSelector selects pods of those namespaces; {} selects them all.
	// +kubebuilder:validation:XValidation:rule="!has(self.matchExpressions) || self.matchExpressions.all(e, e.operator in ['In', 'NotIn', 'Exists', 'DoesNotExist'] && ((e.operator in ['In', 'NotIn']) == (has(e.values) && size(e.values) > 0)))",message="matchExpressions: operator is In, NotIn (with values), Exists or DoesNotExist (without)"
	PodSelector metav1.LabelSelector `json:"podSelector"`

	// Mode, on a Guardrail: Enforce makes every selected pod enforced, so
	// no policy or label below can downgrade it to Audit.
	// +optional
	Mode Mode `json:"mode,omitempty"`

	// FailMode, on a Guardrail: as EgressPolicy's.
	// +optional
	FailMode FailMode `json:"failMode,omitempty"`

	// Egress: a Guardrail's bound, or a Baseline's grant.
	// +optional
	// +listType=atomic
	// +kubebuilder:validation:MaxItems=256
	Egress []EgressRule `json:"egress,omitempty"`
}

// ClusterEgressPolicy is a cluster-wide guardrail or baseline.
//
// +genclient
// +genclient:nonNamespaced
// +k8s:deepcopy-gen:interfaces=k8s.io/apimachinery/pkg/runtime.Object
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:scope=Cluster,shortName=cegp,categories=sluice
// +kubebuilder:printcolumn:name="Tier",type=string,JSONPath=`.spec.tier`
// +kubebuilder:printcolumn:name="Mode",type=string,JSONPath=`.spec.mode`
// +kubebuilder:printcolumn:name="Accepted",type=string,JSONPath=`.status.conditions[?(@.type=="Accepted")].status`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type ClusterEgressPolicy struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec ClusterEgressPolicySpec `json:"spec"`
	// +optional
	Status PolicyStatus `json:"status,omitempty"`
}

// ClusterEgressPolicyList is a list of ClusterEgressPolicy.
//
// +kubebuilder:object:root=true
type ClusterEgressPolicyList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []ClusterEgressPolicy `json:"items"`
}
