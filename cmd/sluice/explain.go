package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/sluice-io/sluice/agent"
	"github.com/sluice-io/sluice/policy"
	policyclient "github.com/sluice-io/sluice/policy/client/clientset/versioned/typed/policy/v1alpha1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/tools/clientcmd"
)

// explanation is what `sluice explain` shows; --format json prints it.
type explanation struct {
	Pod               string            `json:"pod"`
	Node              string            `json:"node,omitempty"`
	Selected          bool              `json:"selected"`
	SelectedBy        []string          `json:"selected_by,omitempty"`
	Settings          map[string]string `json:"settings"`
	AnnotationIgnored bool              `json:"annotation_ignored,omitempty"`
	Exempt            bool              `json:"exempt,omitempty"`
	Sources           []explainSource   `json:"sources,omitempty"`
	Mode              string            `json:"mode,omitempty"`
	FailClosed        bool              `json:"fail_closed,omitempty"`
	Allow             []string          `json:"allow,omitempty"`
	Removed           []explainRemoval  `json:"removed,omitempty"`
	Errors            []string          `json:"errors,omitempty"`
}

type explainSource struct {
	Name  string   `json:"name"`
	Tier  string   `json:"tier"`
	Mode  string   `json:"mode,omitempty"`
	Fail  string   `json:"fail_mode,omitempty"`
	Allow []string `json:"allow,omitempty"`
	Error string   `json:"error,omitempty"`
}

type explainRemoval struct {
	Guardrail string   `json:"guardrail"`
	Entry     string   `json:"entry"`
	Kept      []string `json:"kept,omitempty"`
}

func runExplain(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("explain", `Explain a pod's egress policy: whether sluice selects it and why, which
EgressPolicy and ClusterEgressPolicy objects (and its own labels and
annotation) apply, the effective policy the node's agent programs, and what
each guardrail removed or narrowed. It runs the same selection and merge code
as the agent, on what the API server has now.

Usage: sluice explain [flags] NAMESPACE/POD   (or POD, in the context's namespace)

The agent's settings (the opt-in selector, whether pods' allow annotations are
ignored) are read from its ConfigMap, --config-map; flags given explicitly win.`, stderr)
	kubeconfig := fs.String("kubeconfig", "", "kubeconfig file (default: $KUBECONFIG, then ~/.kube/config, as kubectl)")
	kcontext := fs.String("context", "", "kubeconfig context (default: the current one)")
	configMap := fs.String("config-map", "sluice-system/sluice-config", `NAMESPACE/NAME of the agent's ConfigMap, for SELECTOR and IGNORE_ALLOW_ANNOTATIONS; "" to use the flags only`)
	selector := fs.String("selector", agent.DefaultSelector, "the agent's opt-in label selector (--selector)")
	ignore := fs.Bool("ignore-allow-annotations", false, "the agent ignores pods' allow annotations (--ignore-allow-annotations)")
	format := fs.String("format", "text", "text or json")
	timeout := fs.Duration("timeout", 30*time.Second, "give up on the API server after this long")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		fs.Usage()
		return errUsage
	}
	if *format != "text" && *format != "json" {
		return fmt.Errorf("--format %q: want text or json", *format)
	}
	explicit := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { explicit[f.Name] = true })

	rules := clientcmd.NewDefaultClientConfigLoadingRules()
	rules.ExplicitPath = *kubeconfig
	cc := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, &clientcmd.ConfigOverrides{CurrentContext: *kcontext})
	rc, err := cc.ClientConfig()
	if err != nil {
		return fmt.Errorf("kubeconfig: %w", err)
	}
	rc.UserAgent = "sluice/" + version
	ns, name, ok := strings.Cut(fs.Arg(0), "/")
	if !ok {
		name = ns
		if ns, _, err = cc.Namespace(); err != nil {
			return fmt.Errorf("kubeconfig namespace: %w", err)
		}
	}
	core, err := agent.CoreREST(rc)
	if err != nil {
		return err
	}
	pc, err := policyclient.NewForConfig(rc)
	if err != nil {
		return err
	}
	get := func(ctx context.Context, resource, ns, name string, into runtime.Object) error {
		r := core.Get().Resource(resource).Name(name)
		if ns != "" {
			r = r.Namespace(ns)
		}
		return r.Do(ctx).Into(into)
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()

	settings := map[string]string{"SELECTOR": *selector, "IGNORE_ALLOW_ANNOTATIONS": strconv.FormatBool(*ignore)}
	if cmNS, cmName, ok := strings.Cut(*configMap, "/"); ok {
		cm := &corev1.ConfigMap{}
		err := get(ctx, "configmaps", cmNS, cmName, cm)
		switch {
		case err == nil:
			for _, k := range []string{"SELECTOR", "IGNORE_ALLOW_ANNOTATIONS"} {
				flagName := map[string]string{"SELECTOR": "selector", "IGNORE_ALLOW_ANNOTATIONS": "ignore-allow-annotations"}[k]
				if v, ok := cm.Data[k]; ok && !explicit[flagName] {
					settings[k] = v
				}
			}
			settings["from"] = "ConfigMap " + *configMap
		default:
			settings["from"] = fmt.Sprintf("flags (ConfigMap %s: %v)", *configMap, err)
		}
	} else {
		settings["from"] = "flags"
	}
	optIn, err := labels.Parse(settings["SELECTOR"])
	if err != nil {
		return fmt.Errorf("selector %q: %w", settings["SELECTOR"], err)
	}
	ignoreAnn, err := strconv.ParseBool(settings["IGNORE_ALLOW_ANNOTATIONS"])
	if err != nil {
		return fmt.Errorf("IGNORE_ALLOW_ANNOTATIONS %q: %w", settings["IGNORE_ALLOW_ANNOTATIONS"], err)
	}

	pod := &corev1.Pod{}
	if err := get(ctx, "pods", ns, name, pod); err != nil {
		return fmt.Errorf("pod %s/%s: %w", ns, name, err)
	}
	nsObj := &corev1.Namespace{}
	if err := get(ctx, "namespaces", "", ns, nsObj); err != nil {
		return fmt.Errorf("namespace %s: %w", ns, err)
	}
	var objs policy.Objects
	eps, err := pc.EgressPolicies(ns).List(ctx, metav1.ListOptions{})
	if err != nil {
		if apierrors.IsNotFound(err) {
			return fmt.Errorf("the API server does not serve policy.sluice.io/v1alpha1: are the CRDs installed (kubectl apply -k daemonset/)? %w", err)
		}
		return fmt.Errorf("EgressPolicies in %s: %w", ns, err)
	}
	for i := range eps.Items {
		objs.EgressPolicies = append(objs.EgressPolicies, &eps.Items[i])
	}
	cps, err := pc.ClusterEgressPolicies().List(ctx, metav1.ListOptions{})
	if err != nil {
		return fmt.Errorf("ClusterEgressPolicies: %w", err)
	}
	for i := range cps.Items {
		objs.ClusterPolicies = append(objs.ClusterPolicies, &cps.Items[i])
	}
	var exempt []string
	if cmNS, _, ok := strings.Cut(*configMap, "/"); ok {
		exempt = append(exempt, cmNS) // the agent's own namespace, as its --exempt-namespaces default
	}
	ex := explain(policy.Pod{Namespace: ns, Labels: pod.Labels, Annotations: pod.Annotations, NamespaceLabels: nsObj.Labels}, objs,
		policy.Options{OptIn: optIn, IgnoreAnnotations: ignoreAnn, ExemptNamespaces: exempt})
	ex.Pod, ex.Node, ex.Settings = ns+"/"+name, pod.Spec.NodeName, settings
	if *format == "json" {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(ex)
	}
	printExplanation(stdout, ex)
	return nil
}

// explain is the agent's selection and merge for one pod (policy.Select,
// policy.Merge), laid out for people.
func explain(pod policy.Pod, objs policy.Objects, opt policy.Options) explanation {
	sel := policy.Select(pod, objs, opt)
	ex := explanation{Selected: sel.Selected, SelectedBy: sel.SelectedBy, AnnotationIgnored: sel.AnnotationIgnored, Exempt: sel.Exempt}
	if !sel.Selected {
		return ex
	}
	for _, s := range sel.Sources {
		es := explainSource{Name: s.Name, Tier: s.Tier.String(), Allow: ruleStrings(s.Allow)}
		if s.ModeSet {
			es.Mode = s.Mode.String()
		}
		switch s.Fail {
		case policy.FailOpen:
			es.Fail = "open"
		case policy.FailClosed:
			es.Fail = "closed"
		}
		if s.Err != nil {
			es.Error = strings.ReplaceAll(s.Err.Error(), "\n", "; ")
			es.Allow = nil
		}
		ex.Sources = append(ex.Sources, es)
	}
	e := policy.Merge(sel.Sources)
	ex.Mode, ex.FailClosed, ex.Allow = e.Policy.Mode.String(), e.Policy.FailClosed, ruleStrings(e.Policy.Allow)
	for _, r := range e.Removed {
		ex.Removed = append(ex.Removed, explainRemoval{Guardrail: r.Guardrail, Entry: r.Entry.String(), Kept: ruleStrings(r.Kept)})
	}
	if e.Err != nil {
		ex.Errors = strings.Split(e.Err.Error(), "\n")
	}
	return ex
}

func ruleStrings(rs []policy.Rule) []string {
	var out []string
	for _, r := range rs {
		out = append(out, r.String())
	}
	return out
}

func printExplanation(w io.Writer, ex explanation) {
	fmt.Fprintf(w, "pod %s (node %s)\n", ex.Pod, ex.Node)
	fmt.Fprintf(w, "settings (%s): SELECTOR=%q IGNORE_ALLOW_ANNOTATIONS=%s\n", ex.Settings["from"], ex.Settings["SELECTOR"], ex.Settings["IGNORE_ALLOW_ANNOTATIONS"])
	if ex.Exempt {
		fmt.Fprintln(w, "\nnot selected: its namespace is the agent's own, which is exempt (--exempt-namespaces); its connections go direct")
		return
	}
	if !ex.Selected {
		fmt.Fprintln(w, "\nnot selected: no opt-in label, EgressPolicy or guardrail selects it; its connections go direct")
		return
	}
	fmt.Fprintf(w, "\nselected by: %s\n", strings.Join(ex.SelectedBy, ", "))
	if ex.AnnotationIgnored {
		fmt.Fprintln(w, "its sluice.io/allow annotation is ignored (IGNORE_ALLOW_ANNOTATIONS=true)")
	}
	fmt.Fprintln(w, "\nsources, in merge order:")
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "  SOURCE\tTIER\tMODE\tFAIL MODE\tENTRIES")
	for _, s := range ex.Sources {
		entries := strings.Join(s.Allow, ", ")
		if s.Error != "" {
			entries = "ERROR: " + s.Error
		} else if entries == "" {
			entries = "(none)"
		}
		fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\t%s\n", s.Name, s.Tier, dash(s.Mode), dash(s.Fail), entries)
	}
	tw.Flush()
	fail := "open"
	if ex.FailClosed {
		fail = "closed"
	}
	fmt.Fprintf(w, "\neffective policy: %s, fail %s\n", ex.Mode, fail)
	if ex.Mode == "audit" {
		fmt.Fprintln(w, "  audit mode allows and logs every connection; the entries below are what enforce mode would allow")
	}
	if len(ex.Allow) == 0 {
		fmt.Fprintln(w, "  allow: nothing")
	}
	for _, a := range ex.Allow {
		fmt.Fprintf(w, "  allow %s\n", a)
	}
	if len(ex.Removed) > 0 {
		fmt.Fprintln(w, "\nremoved by guardrails:")
		for _, r := range ex.Removed {
			if len(r.Kept) == 0 {
				fmt.Fprintf(w, "  %s: %s removed\n", r.Guardrail, r.Entry)
			} else {
				fmt.Fprintf(w, "  %s: %s narrowed to %s\n", r.Guardrail, r.Entry, strings.Join(r.Kept, ", "))
			}
		}
	}
	if len(ex.Errors) > 0 {
		fmt.Fprintln(w, "\nerrors (each source in error counts at its safest: a grant grants nothing, a guardrail allows nothing and enforces):")
		for _, e := range ex.Errors {
			fmt.Fprintf(w, "  %s\n", e)
		}
	}
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
