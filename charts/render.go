// Package charts renders sluice's Helm chart (charts/sluice) the way `helm
// template` does, with the Helm SDK: values checked against
// values.schema.json, CRDs included. The chart is the source of the
// manifests; daemonset/generate writes the kustomize base from it.
package charts

import (
	"fmt"
	"path/filepath"
	"regexp"
	goruntime "runtime"
	"strings"

	"helm.sh/helm/v4/pkg/action"
	"helm.sh/helm/v4/pkg/chart/common"
	"helm.sh/helm/v4/pkg/chart/v2/loader"
	release "helm.sh/helm/v4/pkg/release/v1"
	"sigs.k8s.io/yaml"
)

// Dir is the chart's directory, charts/sluice.
func Dir() string {
	_, file, _, _ := goruntime.Caller(0)
	return filepath.Join(filepath.Dir(file), "sluice")
}

// KubeVersion is the Kubernetes version the chart is rendered for (its
// Capabilities.KubeVersion): the one the tests' API server runs.
const KubeVersion = "v1.37.1"

// Object is one rendered manifest: the chart file it came from, its kind,
// namespace and name, and its YAML (comments included).
type Object struct {
	Source, Kind, Namespace, Name string
	YAML                          []byte
}

var docSep = regexp.MustCompile(`(?m)^---[ \t]*$`)

// Render renders the chart as release "sluice" in namespace with values
// (merged over values.yaml) and returns its objects in Helm's order, CRDs
// first. Values the schema refuses are an error.
func Render(namespace string, values map[string]any) ([]Object, error) {
	ch, err := loader.Load(Dir())
	if err != nil {
		return nil, fmt.Errorf("load chart %s: %w", Dir(), err)
	}
	kv, err := common.ParseKubeVersion(KubeVersion)
	if err != nil {
		return nil, err
	}
	inst := action.NewInstall(action.NewConfiguration())
	inst.DryRunStrategy = action.DryRunClient
	inst.ReleaseName, inst.Namespace, inst.Replace, inst.IncludeCRDs = "sluice", namespace, true, true
	inst.KubeVersion = kv
	if values == nil {
		values = map[string]any{}
	}
	r, err := inst.Run(ch, values)
	if err != nil {
		return nil, fmt.Errorf("render chart: %w", err)
	}
	rel, ok := r.(*release.Release)
	if !ok {
		return nil, fmt.Errorf("render chart: release of type %T", r)
	}
	var objs []Object
	for _, doc := range docSep.Split(rel.Manifest, -1) {
		if strings.TrimSpace(doc) == "" {
			continue
		}
		var o Object
		var body []string
		for _, l := range strings.Split(strings.Trim(doc, "\n"), "\n") {
			if s, ok := strings.CutPrefix(l, "# Source: "); ok && o.Source == "" {
				o.Source = strings.TrimPrefix(s, "sluice/")
				continue
			}
			body = append(body, l)
		}
		o.YAML = []byte(strings.Join(body, "\n") + "\n")
		var meta struct {
			Kind     string `json:"kind"`
			Metadata struct {
				Name      string `json:"name"`
				Namespace string `json:"namespace"`
			} `json:"metadata"`
		}
		if err := yaml.Unmarshal(o.YAML, &meta); err != nil {
			return nil, fmt.Errorf("%s: %w\n%s", o.Source, err, o.YAML)
		}
		if meta.Kind == "" {
			continue // a template that rendered only comments
		}
		o.Kind, o.Name, o.Namespace = meta.Kind, meta.Metadata.Name, meta.Metadata.Namespace
		objs = append(objs, o)
	}
	return objs, nil
}
