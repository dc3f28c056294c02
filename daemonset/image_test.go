package daemonset

import (
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
)

func readRepoFile(t *testing.T, name string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(Dir(), "..", name))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// No container engine runs on the CI machines, so the image is never built
// there. This keeps the Dockerfile honest instead: it builds with the Go
// version go.mod names, runs only make targets CI also runs, and puts the
// binary where the manifests' commands expect it.
func TestDockerfileMatchesCIAndManifests(t *testing.T) {
	df := readRepoFile(t, "Dockerfile")
	mk := readRepoFile(t, "Makefile")
	ci := readRepoFile(t, ".ci/run")
	gomod := readRepoFile(t, "go.mod")

	goVer := regexp.MustCompile(`(?m)^go (\d+\.\d+)`).FindStringSubmatch(gomod)
	base := regexp.MustCompile(`(?m)^FROM golang:(\d+\.\d+)-`).FindStringSubmatch(df)
	if goVer == nil || base == nil || goVer[1] != base[1] {
		t.Errorf("build stage Go %v, go.mod says %v", base, goVer)
	}

	// Targets CI runs, with their prerequisites.
	deps := map[string][]string{}
	for _, m := range regexp.MustCompile(`(?m)^([a-z][a-z0-9-]*):(.*)$`).FindAllStringSubmatch(mk, -1) {
		deps[m[1]] = strings.Fields(m[2])
	}
	ran := map[string]bool{}
	var visit func(string)
	visit = func(target string) {
		if ran[target] {
			return
		}
		ran[target] = true
		for _, d := range deps[target] {
			visit(d)
		}
	}
	for _, m := range regexp.MustCompile(`(?m)^make ([a-z -]+)$`).FindAllStringSubmatch(ci, -1) {
		for _, target := range strings.Fields(m[1]) {
			visit(target)
		}
	}
	runs := regexp.MustCompile(`(?m)^RUN make ([^\n]+)$`).FindAllStringSubmatch(df, -1)
	if len(runs) == 0 {
		t.Fatal("the Dockerfile runs no make target")
	}
	for _, r := range runs {
		for _, f := range strings.Fields(r[1]) {
			if strings.Contains(f, "=") {
				continue
			}
			if _, ok := deps[f]; !ok {
				t.Errorf("Dockerfile runs make %s, which the Makefile lacks", f)
			} else if !ran[f] {
				t.Errorf("Dockerfile runs make %s, which CI (.ci/run) never runs", f)
			}
		}
	}

	// The final stage puts the binary at the path every sluice container runs.
	if !strings.Contains(df, "COPY --from=build /src/bin/sluice /sluice") || !strings.Contains(df, `ENTRYPOINT ["/sluice"]`) {
		t.Error("the image does not ship /sluice")
	}
	in := loadInstall(t)
	spec := in.DaemonSet.Spec.Template.Spec
	for _, c := range append(slices.Clone(spec.InitContainers), spec.Containers...) {
		if c.Image == in.Agent.Image && (len(c.Command) == 0 || c.Command[0] != "/sluice") {
			t.Errorf("container %s runs %v from the sluice image", c.Name, c.Command)
		}
	}
	// `make image` tags what the kustomization deploys by default.
	img := regexp.MustCompile(`(?m)^IMAGE \?= (\S+)$`).FindStringSubmatch(mk)
	if img == nil || img[1] != in.Agent.Image {
		t.Errorf("make image builds %v; the manifests deploy %s", img, in.Agent.Image)
	}
}
