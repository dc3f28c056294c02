package datapath

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
)

// Scope says where the programs are attached.
type Scope uint8

const (
	// ScopeNode attaches every program to Config.CgroupPath (the cgroup2
	// root on a node): every socket below it runs them, selected or not.
	ScopeNode Scope = iota
	// ScopeWorkloads attaches the client programs to each selected
	// workload's own cgroup when SetWorkload selects it, and the proxy's
	// two (sockops for the accepted side of the handshake, getsockopt for
	// SO_ORIGINAL_DST) to Config.ProxyCgroupPath: a socket in any other
	// cgroup runs no sluice program at all.
	ScopeWorkloads
)

func (s Scope) String() string {
	if s == ScopeWorkloads {
		return "workloads"
	}
	return "node"
}

// ParseScope parses "node" or "workloads".
func ParseScope(s string) (Scope, error) {
	switch s {
	case "node":
		return ScopeNode, nil
	case "workloads":
		return ScopeWorkloads, nil
	}
	return 0, fmt.Errorf("attach scope %q: want node or workloads", s)
}

// ErrOtherScope is returned when the pins were made in another Scope: the
// programs of one scope would run beside the other's, so the datapath has
// to be uninstalled before the scope changes.
var ErrOtherScope = errors.New("pinned datapath is attached in another scope")

// workloadsDir (cgroups/) holds, in ScopeWorkloads, one directory per selected
// cgroup (named by its id) with the links attached to it. Its presence is
// what marks pins as ScopeWorkloads.
const workloadsDir = "cgroups"

// retiredDir (proxies/) holds, in ScopeWorkloads, one directory per cgroup
// (named by its id) that was the proxy's before the running agent's, with
// the proxy's links attached to it: on Kubernetes, the previous DaemonSet
// pod's, whose Envoy drains after an update, and is sent every new
// connection until the new agent's proxy is ready (docs/install.md). They
// stay attached, switched to the running agent's programs, until the kernel
// detaches them as the cgroup goes; the next start removes their pins.
const retiredDir = "proxies"

func workloadPinDir(pinPath string, cgroupID uint64) string {
	return cgroupPinDir(pinPath, workloadsDir, cgroupID)
}

func cgroupPinDir(pinPath, sub string, cgroupID uint64) string {
	return filepath.Join(pinPath, sub, strconv.FormatUint(cgroupID, 10))
}

// onProxy reports whether a runs on the proxy's sockets: the accepted
// side's handshake claims the original destination (sockops), and the
// proxy asks for it (getsockopt).
func (a attachment) onProxy() bool {
	return a.attach == ebpf.AttachCGroupSockOps || a.attach == ebpf.AttachCGroupGetsockopt
}

// onWorkload reports whether a runs on a selected workload's sockets:
// every program but getsockopt, which only the proxy calls.
func (a attachment) onWorkload() bool { return a.attach != ebpf.AttachCGroupGetsockopt }

// rootAttachments are the programs attached to the pin directory's own
// cgroup (Config.CgroupPath in ScopeNode, ProxyCgroupPath in
// ScopeWorkloads), pinned as link_<program> in it.
func rootAttachments(s Scope) []attachment {
	if s == ScopeNode {
		return attachments()
	}
	return slices.DeleteFunc(slices.Clone(attachments()), func(a attachment) bool { return !a.onProxy() })
}

func workloadAttachments() []attachment {
	return slices.DeleteFunc(slices.Clone(attachments()), func(a attachment) bool { return !a.onWorkload() })
}

// pinnedScope says which scope the pins at pinPath were made in.
func pinnedScope(pinPath string) Scope {
	if fi, err := os.Stat(filepath.Join(pinPath, workloadsDir)); err == nil && fi.IsDir() {
		return ScopeWorkloads
	}
	return ScopeNode
}

// within reports whether cgroup directory p is dir or below it.
func within(p, dir string) bool {
	p, dir = filepath.Clean(p), filepath.Clean(dir)
	return p == dir || strings.HasPrefix(p, strings.TrimSuffix(dir, "/")+"/")
}

// attachWorkload attaches the client programs to a selected workload's
// cgroup (ScopeWorkloads; nothing in ScopeNode) unless they are attached
// already, and pins them under cgroups/<id>. The connect programs go
// last, as in an upgrade (switchOrder): a connect redirected before
// sockops runs for its socket would publish nothing. On failure whatever
// this call attached is detached again.
func (d *Datapath) attachWorkload(cgroupID uint64, path string) (err error) {
	if d.scope != ScopeWorkloads {
		return nil
	}
	if d.progs == nil {
		return errors.New("a read-only datapath handle cannot attach programs")
	}
	if path == "" {
		return fmt.Errorf("cgroup %d: the attach scope is workloads, and the workload has no cgroup path to attach to", cgroupID)
	}
	d.wlMu.Lock()
	defer d.wlMu.Unlock()
	if d.wlPaths[cgroupID] == path {
		// Attached, and checked, by this handle already: an update of
		// the workload's settings (a cgroup made anew has a new id).
		return nil
	}
	if id, err := CgroupID(path); err != nil {
		return err
	} else if id != cgroupID {
		return fmt.Errorf("cgroup %s has id %d, not %d (recreated?)", path, id, cgroupID)
	}
	if within(path, d.proxyCgroup) || within(d.proxyCgroup, path) {
		return fmt.Errorf("cgroup %s: the proxy's cgroup %s is it, or above or below it; with the workloads attach scope the proxy's programs would run twice for its sockets: run the proxy in a cgroup of its own", path, d.proxyCgroup)
	}
	for other, p := range d.wlPaths {
		if other != cgroupID && (within(path, p) || within(p, path)) {
			return fmt.Errorf("cgroup %s is nested with the selected cgroup %s: with the workloads attach scope its sockets would run the programs twice; select one of them, or use the node attach scope", path, p)
		}
	}
	// An earlier proxy's cgroup that is this one, above or below it, and
	// ancestors selected before an agent restart, not yet selected again.
	if proxies, err := pinnedIDs(d.pinPath, retiredDir); err != nil {
		return err
	} else if p, err := nestedWith(path, cgroupID, proxies); err != nil {
		return err
	} else if p != "" {
		return fmt.Errorf("cgroup %s is nested with %s, an earlier proxy's cgroup whose proxy programs are still attached: with the workloads attach scope its sockets would run programs twice", path, p)
	}
	if anc := ancestorWith(path, func(id uint64) bool {
		_, err := os.Stat(workloadPinDir(d.pinPath, id))
		return err == nil
	}); anc != "" {
		return fmt.Errorf("cgroup %s is below the selected cgroup %s: with the workloads attach scope its sockets would run the programs twice; select one of them, or use the node attach scope", path, anc)
	}
	dir := workloadPinDir(d.pinPath, cgroupID)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create %s: %w", dir, err)
	}
	var added []link.Link
	defer func() {
		if err != nil {
			for _, l := range slices.Backward(added) {
				l.Unpin()
				l.Detach()
				l.Close()
			}
			os.Remove(dir) // only if empty: links attached before stay
		}
	}()
	for _, a := range switchOrder(workloadAttachments()) {
		pin := linkPin(dir, a.prog)
		if _, err := os.Stat(pin); err == nil {
			continue
		}
		l, err := attach(path, a.attach, d.progs[a.prog])
		if err != nil {
			return err
		}
		added = append(added, l)
		if err := l.Pin(pin); err != nil {
			return fmt.Errorf("pin link %s of cgroup %d: %w", a.prog, cgroupID, err)
		}
	}
	for _, l := range added {
		l.Close() // the pin holds it
	}
	added = nil
	d.wlPaths[cgroupID] = path
	return nil
}

// detachWorkload detaches and unpins what attachWorkload attached to a
// cgroup, the connect programs first.
func (d *Datapath) detachWorkload(cgroupID uint64) error {
	if d.scope != ScopeWorkloads {
		return nil
	}
	d.wlMu.Lock()
	defer d.wlMu.Unlock()
	if err := detachDir(workloadPinDir(d.pinPath, cgroupID), workloadAttachments()); err != nil {
		return fmt.Errorf("cgroup %d: %w", cgroupID, err)
	}
	delete(d.wlPaths, cgroupID)
	return nil
}

// detachDir detaches and unpins the links of one cgroup's pin directory
// (programs as: a workload's, or a retired proxy's), connect programs
// first, and removes it. (A defunct link, of a removed cgroup, detaches
// without error.)
func detachDir(dir string, as []attachment) error {
	as = switchOrder(as)
	slices.Reverse(as)
	errs := detachLinks(dir, as)
	if err := os.Remove(dir); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// workloadDirs lists the cgroup ids with a pin directory under cgroups/.
func workloadDirs(pinPath string) ([]uint64, error) { return cgroupDirs(pinPath, workloadsDir) }

// cgroupDirs lists the cgroup ids with a pin directory under sub.
func cgroupDirs(pinPath, sub string) ([]uint64, error) {
	entries, err := os.ReadDir(filepath.Join(pinPath, sub))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []uint64
	for _, e := range entries {
		if id, err := strconv.ParseUint(e.Name(), 10, 64); err == nil && e.IsDir() {
			out = append(out, id)
		}
	}
	return out, nil
}

// pinnedIDs is the set of cgroup ids with a pin directory under sub.
func pinnedIDs(pinPath, sub string) (map[uint64]bool, error) {
	ids, err := cgroupDirs(pinPath, sub)
	if err != nil {
		return nil, err
	}
	out := make(map[uint64]bool, len(ids))
	for _, id := range ids {
		out[id] = true
	}
	return out, nil
}

// nestedWith returns the cgroup, in ids, that is dir (of id self), above it
// or below it: "" if none. It walks dir's subtree only when ids is not
// empty (a pod's is a handful of directories).
func nestedWith(dir string, self uint64, ids map[uint64]bool) (string, error) {
	if len(ids) == 0 {
		return "", nil
	}
	if ids[self] {
		return dir, nil
	}
	if anc := ancestorWith(dir, func(id uint64) bool { return ids[id] }); anc != "" {
		return anc, nil
	}
	var found string
	err := filepath.WalkDir(dir, func(p string, e os.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				return nil // removed meanwhile
			}
			return err
		}
		if !e.IsDir() || p == dir {
			return nil
		}
		if id, err := CgroupID(p); err == nil && ids[id] {
			found = p
			return filepath.SkipAll
		}
		return nil
	})
	return found, err
}

// ancestorWith returns the nearest cgroup above dir, up to the cgroup2
// mount, whose id has(): "" if none.
func ancestorWith(dir string, has func(id uint64) bool) string {
	for anc := filepath.Dir(dir); anc != filepath.Dir(anc) && IsCgroup2(anc); anc = filepath.Dir(anc) {
		if id, err := CgroupID(anc); err == nil && has(id) {
			return anc
		}
	}
	return ""
}

// pinnedLinkCgroup returns the id of the cgroup the link pinned at pin is
// attached to: 0 for a defunct link (the kernel released its cgroup).
func pinnedLinkCgroup(pin string) (uint64, error) {
	l, err := link.LoadPinnedLink(pin, nil)
	if err != nil {
		return 0, err
	}
	defer l.Close()
	info, err := l.Info()
	if err != nil {
		return 0, fmt.Errorf("inspect pinned link %s: %w", pin, err)
	}
	if cg := info.Cgroup(); cg != nil {
		return cg.CgroupId, nil
	}
	return 0, nil
}

// adoptProxy is reopen's first step for ScopeWorkloads' own links: it makes
// the pin directory's links those of the proxy cgroup want. A proxy link
// pinned for another cgroup (the previous agent's proxy, draining) moves to
// proxies/<its id>/ and stays attached; a defunct one (its cgroup went) is
// unpinned; links of want retired earlier (a cgroup that is the proxy's
// again) move back. Each move is one rename on bpffs: a crash part way
// leaves every link pinned once, and the next start finishes the moves.
// reopen then switches the root links and attaches the missing ones.
func adoptProxy(pinPath, wantPath string, want uint64) error {
	as := rootAttachments(ScopeWorkloads)
	// Nested with an earlier proxy's cgroup (its links stay attached) or
	// with a selected workload, the proxy's sockets would run programs
	// twice, or a workload's: refused, before anything moves.
	proxies, err := pinnedIDs(pinPath, retiredDir)
	if err != nil {
		return err
	}
	// Each root link's cgroup, read once: 0 for a defunct link.
	rootIDs := map[string]uint64{}
	for _, a := range as {
		id, err := pinnedLinkCgroup(linkPin(pinPath, a.prog))
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return fmt.Errorf("open pinned link %s: %w", a.prog, err)
		}
		rootIDs[a.prog] = id
		if id != 0 {
			proxies[id] = true
		}
	}
	delete(proxies, want) // the proxy's again: taken back below
	workloads, err := pinnedIDs(pinPath, workloadsDir)
	if err != nil {
		return err
	}
	for _, c := range []struct {
		ids  map[uint64]bool
		what string
	}{{proxies, "an earlier proxy's cgroup, whose proxy programs are still attached"}, {workloads, "a selected workload's cgroup"}} {
		if p, err := nestedWith(wantPath, want, c.ids); err != nil {
			return err
		} else if p != "" {
			return fmt.Errorf("the proxy's cgroup %s is nested with %s, %s: sockets would run the programs twice; use a cgroup beside it", wantPath, p, c.what)
		}
	}
	for _, a := range as {
		pin := linkPin(pinPath, a.prog)
		id, pinned := rootIDs[a.prog]
		switch {
		case !pinned || id == want:
			continue
		case id == 0:
			if err := os.Remove(pin); err != nil {
				return fmt.Errorf("unpin defunct link %s: %w", a.prog, err)
			}
		default:
			dir := cgroupPinDir(pinPath, retiredDir, id)
			if err := os.MkdirAll(dir, 0o700); err != nil {
				return fmt.Errorf("create %s: %w", dir, err)
			}
			if err := os.Rename(pin, linkPin(dir, a.prog)); err != nil {
				return fmt.Errorf("retire link %s of the previous proxy cgroup %d: %w", a.prog, id, err)
			}
		}
	}
	dir := cgroupPinDir(pinPath, retiredDir, want)
	for _, a := range as {
		from, to := linkPin(dir, a.prog), linkPin(pinPath, a.prog)
		if _, err := os.Stat(from); err != nil {
			continue
		}
		if _, err := os.Stat(to); err == nil {
			// Attached to want twice (a crash between attaching anew
			// and retiring): one is enough.
			if errs := detachLinks(dir, []attachment{a}); len(errs) > 0 {
				return errors.Join(errs...)
			}
			continue
		}
		if err := os.Rename(from, to); err != nil {
			return fmt.Errorf("take back link %s of proxy cgroup %d: %w", a.prog, want, err)
		}
	}
	if err := os.Remove(dir); err != nil && !errors.Is(err, os.ErrNotExist) && !errors.Is(err, syscall.ENOTEMPTY) {
		return err
	}
	return nil
}

// switchWorkloads is reopen's step for ScopeWorkloads: every retired
// proxy's links, then every selected cgroup's, are switched to this
// binary's programs, connect last. A cgroup that is gone (its links are
// defunct: the kernel detached them when it was removed) loses its pin
// directory. A link missing from a workload's directory (a program an
// upgrade adds) is attached when the agent selects the cgroup again, which
// it does for every workload it keeps.
func (d *Datapath) switchWorkloads() error {
	if err := d.switchDirs(retiredDir, rootAttachments(ScopeWorkloads)); err != nil {
		return err
	}
	// Kept only while a retired proxy is: a release that does not know
	// proxies/ takes it for a dropped pin (same layout) and fails to
	// remove it if it holds anything.
	if err := os.Remove(filepath.Join(d.pinPath, retiredDir)); err != nil && !errors.Is(err, os.ErrNotExist) && !errors.Is(err, syscall.ENOTEMPTY) {
		return err
	}
	return d.switchDirs(workloadsDir, workloadAttachments())
}

func (d *Datapath) switchDirs(sub string, as []attachment) error {
	ids, err := cgroupDirs(d.pinPath, sub)
	if err != nil {
		return err
	}
	for _, id := range ids {
		dir := cgroupPinDir(d.pinPath, sub, id)
		// A directory with no link (a crash between its mkdir and its
		// first pin) would only refuse its cgroup: removed.
		if err := os.Remove(dir); err == nil || errors.Is(err, os.ErrNotExist) {
			continue
		}
		for _, a := range switchOrder(as) {
			l, err := link.LoadPinnedLink(linkPin(dir, a.prog), nil)
			if errors.Is(err, os.ErrNotExist) {
				continue
			}
			if err != nil {
				return fmt.Errorf("open pinned link %s of cgroup %d: %w", a.prog, id, err)
			}
			err = nil
			if info, ierr := l.Info(); ierr == nil && (info.Cgroup() == nil || info.Cgroup().CgroupId == 0) {
				err = syscall.ENOLINK // the kernel released the cgroup
			} else {
				err = l.Update(d.progs[a.prog])
			}
			l.Close()
			if errors.Is(err, syscall.ENOLINK) {
				if err := detachDir(dir, as); err != nil {
					return fmt.Errorf("remove the pins of removed cgroup %d: %w", id, err)
				}
				break
			}
			if err != nil {
				return fmt.Errorf("upgrade program %s of cgroup %d: %w", a.prog, id, err)
			}
		}
	}
	return nil
}
