package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"sigs.k8s.io/yaml"
)

// MaxWorkloadFileBytes bounds the workloads file.
const MaxWorkloadFileBytes = 4 << 20

// WorkloadFile is the YAML the file source reads:
//
//	workloads:
//	  - name: web                     # required; lowercase, digits, '-', '.'
//	    namespace: shop               # optional
//	    cgroup: system.slice/web.service   # relative to the cgroup v2 mount, or absolute under it
//	    ips: [10.0.0.5, "fd00::5"]    # source addresses its connections have
//	    labels:
//	      sluice.io/mode: enforce
//	    annotations:
//	      sluice.io/allow: "api.github.com:443, 203.0.113.0/24"
type WorkloadFile struct {
	Workloads []FileWorkload `json:"workloads"`
}

// FileWorkload is one workload of the file.
type FileWorkload struct {
	Name        string            `json:"name"`
	Namespace   string            `json:"namespace,omitempty"`
	Cgroup      string            `json:"cgroup"`
	IPs         []string          `json:"ips,omitempty"`
	Labels      map[string]string `json:"labels,omitempty"`
	Annotations map[string]string `json:"annotations,omitempty"`
}

// ParseWorkloadFile reads the workloads file's content. cgroupMount is the
// cgroup v2 mount that relative cgroup paths are under, and that absolute
// ones must stay under. Every workload is checked; the error names each
// bad one by position and name. On error no workload is returned: the
// caller keeps what it had.
func ParseWorkloadFile(data []byte, cgroupMount string) ([]Workload, error) {
	if len(data) > MaxWorkloadFileBytes {
		return nil, fmt.Errorf("workloads file is %d bytes, more than %d", len(data), MaxWorkloadFileBytes)
	}
	var f WorkloadFile
	if err := yaml.UnmarshalStrict(data, &f); err != nil {
		return nil, fmt.Errorf("workloads file: %w", err)
	}
	var (
		out  []Workload
		errs []error
		seen = map[string]int{}
	)
	for i, fw := range f.Workloads {
		w, err := fw.workload(cgroupMount)
		if err != nil {
			errs = append(errs, fmt.Errorf("workloads[%d] (%s): %w", i, fw.Name, err))
			continue
		}
		if j, dup := seen[w.Key()]; dup {
			errs = append(errs, fmt.Errorf("workloads[%d]: %s is also workloads[%d]", i, w.Key(), j))
			continue
		}
		seen[w.Key()] = i
		out = append(out, w)
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return out, nil
}

func (fw FileWorkload) workload(mount string) (Workload, error) {
	if err := checkName("name", fw.Name, true); err != nil {
		return Workload{}, err
	}
	if err := checkName("namespace", fw.Namespace, false); err != nil {
		return Workload{}, err
	}
	cg, err := cgroupUnder(mount, fw.Cgroup)
	if err != nil {
		return Workload{}, err
	}
	w := Workload{Namespace: fw.Namespace, Name: fw.Name, CgroupPath: cg, Labels: fw.Labels, Annotations: fw.Annotations}
	for j, s := range fw.IPs {
		a, err := netip.ParseAddr(s)
		if err != nil || a.Zone() != "" {
			return Workload{}, fmt.Errorf("ips[%d] %q: not an IP address", j, s)
		}
		w.IPs = append(w.IPs, a.Unmap())
	}
	return w, nil
}

// cgroupUnder resolves a workload's cgroup path against the cgroup v2
// mount and refuses anything outside it, and the mount itself: selecting
// the root cgroup would redirect the whole machine.
func cgroupUnder(mount, p string) (string, error) {
	if p == "" {
		return "", errors.New("cgroup is required")
	}
	if mount == "" {
		return "", errors.New("no cgroup v2 mount to resolve the cgroup against")
	}
	mount = filepath.Clean(mount)
	abs := p
	if !filepath.IsAbs(p) {
		abs = filepath.Join(mount, p)
	}
	abs = filepath.Clean(abs)
	rel, err := filepath.Rel(mount, abs)
	if err != nil || rel == "." || rel == ".." || strings.HasPrefix(rel, "../") {
		return "", fmt.Errorf("cgroup %q is not below the cgroup v2 mount %s", p, mount)
	}
	return abs, nil
}

// FileSource watches the workloads file and hands every good version of
// it to apply. A version that does not parse is reported and changes
// nothing: the last good set stays.
type FileSource struct {
	Path        string
	CgroupMount string
	// Interval between checks of the file for changes (it is replaced by
	// editors and config management, so its identity is checked, not an
	// inotify watch on one inode). Zero: one second.
	Interval time.Duration
}

// Run loads the file, then reloads it whenever it changes, until ctx is
// done. The first load must succeed: an agent started on a broken file
// says so instead of running with nothing selected.
func (s FileSource) Run(ctx context.Context, apply func([]Workload), report func(error)) error {
	interval := s.Interval
	if interval <= 0 {
		interval = time.Second
	}
	ws, id, err := s.load()
	if err != nil {
		return err
	}
	apply(ws)
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		cur, err := statID(s.Path)
		if err != nil {
			cur = fileID{} // missing: reported once, like a broken version
		}
		if cur == id {
			continue
		}
		ws, newID, err := s.load()
		if err != nil {
			report(err)
			id = cur // report a broken version once, not every tick
			continue
		}
		id = newID
		apply(ws)
	}
}

type fileID struct {
	dev, ino uint64
	size     int64
	mtime    time.Time
}

func statID(path string) (fileID, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return fileID{}, err
	}
	id := fileID{size: fi.Size(), mtime: fi.ModTime()}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		id.dev, id.ino = uint64(st.Dev), st.Ino
	}
	return id, nil
}

func (s FileSource) load() ([]Workload, fileID, error) {
	id, err := statID(s.Path)
	if err != nil {
		return nil, fileID{}, fmt.Errorf("workloads file: %w", err)
	}
	f, err := os.Open(s.Path)
	if err != nil {
		return nil, id, fmt.Errorf("workloads file: %w", err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, MaxWorkloadFileBytes+1))
	if err != nil {
		return nil, id, fmt.Errorf("workloads file %s: %w", s.Path, err)
	}
	ws, err := ParseWorkloadFile(data, s.CgroupMount)
	if err != nil {
		return nil, id, fmt.Errorf("%s: %w", s.Path, err)
	}
	return ws, id, nil
}
