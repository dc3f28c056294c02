// Package datapath owns sluice's eBPF programs: it loads them, attaches them
// to a cgroup v2 directory with bpf_link, pins everything under a bpffs
// directory so the datapath outlives the agent, and offers typed access to the
// maps the agent programs (workloads, proxy address, exclusions, counters).
package datapath

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"syscall"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/rlimit"
)

// Defaults for production nodes.
const (
	DefaultBPFFS   = "/sys/fs/bpf"
	DefaultPinPath = DefaultBPFFS + "/sluice"

	// DefaultInFlightEntries is the capacity of the in-flight map
	// (pending_tuples): handshakes between client and proxy in flight at
	// once on the node.
	DefaultInFlightEntries = 65536
	// MinInFlightEntries and MaxInFlightEntries bound Config.InFlightEntries.
	MinInFlightEntries = 1024
	MaxInFlightEntries = 1 << 22
)

// inFlightMaps are the LRU maps whose capacity is the operator's, not the
// layout's: a pinned map keeps the capacity it was created with.
// Config.InFlightEntries sets both. Layout 5's programs only read
// orig_dsts (for sockets redirected by the release before), but a fresh
// install still gives it the full capacity: a rollback to a layout 4
// release (--allow-downgrade) keeps the pinned map, and its connect4
// writes every redirected socket there.
var inFlightMaps = []string{"orig_dsts", "pending_tuples"}

var (
	// ErrNotInstalled is returned when no pinned datapath exists.
	ErrNotInstalled = errors.New("datapath not installed")
	// ErrIncompatiblePins is returned when pinned maps were made by a
	// version whose map layout differs from this one.
	ErrIncompatiblePins = errors.New("pinned datapath is incompatible with this version")
	// ErrOtherCgroup is returned when the pinned links are attached to a
	// different cgroup than the one asked for.
	ErrOtherCgroup = errors.New("pinned datapath is attached to another cgroup")
)

// attachment is a program and where it hooks.
type attachment struct {
	prog   string
	attach ebpf.AttachType
}

// attachmentsOf lists every program of spec and where it hooks, in name
// order (each program's ELF section names its attach type), so a program
// added in C needs no Go table.
func attachmentsOf(spec *ebpf.CollectionSpec) []attachment {
	var out []attachment
	for name, p := range spec.Programs {
		out = append(out, attachment{name, p.AttachType})
	}
	slices.SortFunc(out, func(a, b attachment) int { return strings.Compare(a.prog, b.prog) })
	return out
}

// attachments are the embedded object's programs (objectTables). The link
// pin of each is named "link_<program>" in the pin directory.
func attachments() []attachment { return tables().attachments }

func linkPin(dir, prog string) string { return filepath.Join(dir, "link_"+prog) }

// Config says where to attach and where to pin.
type Config struct {
	// Scope says where the programs attach (ScopeNode by default).
	Scope Scope
	// CgroupPath is the cgroup v2 directory the programs attach to in
	// ScopeNode: the cgroup2 mount root on a node (see Cgroup2Mount), a
	// child in tests. Unused in ScopeWorkloads.
	CgroupPath string
	// ProxyCgroupPath is the proxy's cgroup v2 directory in ScopeWorkloads,
	// where its sockops and getsockopt programs attach. It has to outlive
	// the proxy process (a slice, or the proxy's pod; not a systemd
	// service's own cgroup, which is made anew at every start), and no
	// selected workload may be in it, above it or below it. Pins made for
	// another proxy cgroup (an update's previous pod) keep that cgroup's
	// links attached, retired, until it goes: its proxy drains meanwhile.
	ProxyCgroupPath string
	// PinPath is the bpffs directory holding our pins (DefaultPinPath).
	// Its parent must be on a bpffs; see EnsureBPFFS.
	PinPath string
	// InFlightEntries is the capacity of the in-flight map
	// (pending_tuples) when the datapath is installed (0:
	// DefaultInFlightEntries). A datapath that is already pinned keeps the
	// capacity it was created with: maps cannot be resized in place, and
	// replacing one would lose the entries of handshakes in flight.
	// Datapath.InFlightCapacity says what is in effect.
	InFlightEntries int
	// AllowDowngrade lets this version adopt pins of a newer layout
	// (ErrNewerLayout otherwise): the maps it knows are used, the others
	// stay pinned and unused.
	AllowDowngrade bool
}

func (c Config) inFlightEntries() (uint32, error) {
	n := c.InFlightEntries
	if n == 0 {
		return DefaultInFlightEntries, nil
	}
	if n < MinInFlightEntries || n > MaxInFlightEntries {
		return 0, fmt.Errorf("datapath: in-flight map capacity %d is outside %d-%d", n, MinInFlightEntries, MaxInFlightEntries)
	}
	return uint32(n), nil
}

// Datapath is a handle on the installed, pinned datapath. Closing it releases
// the handle only: the programs stay attached until Uninstall.
type Datapath struct {
	pinPath string
	maps    sluiceMaps
	links   map[string]link.Link // by program name; nil for read-only handles
	progs   map[string]*ebpf.Program

	// adopted is the layout version of the pins this handle took over; 0
	// when it installed them.
	adopted int

	// scope, proxyCgroup: Config's; wlPaths the cgroup path of every
	// workload attachWorkload attached to (ScopeWorkloads), under wlMu.
	scope       Scope
	proxyCgroup string
	wlMu        sync.Mutex
	wlPaths     map[uint64]string

	mu sync.Mutex // serialises read-modify-write of the config entry
}

// AdoptedLayout is the layout version of the pins Open found and took over
// (migrating them when older than LayoutVersion), or 0 when Open installed
// the datapath.
func (d *Datapath) AdoptedLayout() int { return d.adopted }

// objects are the maps and programs we load; the generated sluiceObjects
// also names the .bss variable that loadSpec drops.
type objects struct {
	sluiceMaps
	sluicePrograms
}

// loadSpec returns the embedded collection spec, minus the .bss section that
// only exists to keep the counter enum in BTF for bpf2go.
func loadSpec() (*ebpf.CollectionSpec, error) {
	spec, err := loadSluice()
	if err != nil {
		return nil, fmt.Errorf("load embedded BPF object: %w", err)
	}
	delete(spec.Maps, ".bss")
	delete(spec.Variables, "unused_counter")
	return spec, nil
}

// Open installs the datapath, or, when pins from an earlier run exist, reopens
// them: the maps are reused as they are (entries survive), and each pinned
// link is atomically switched to this binary's program with link.Update, so a
// restart or upgrade never detaches anything. Links missing from the pins (a
// program added by an upgrade) are attached.
func Open(cfg Config) (*Datapath, error) {
	if cfg.PinPath == "" {
		return nil, errors.New("datapath: PinPath is required")
	}
	switch cfg.Scope {
	case ScopeNode:
		if cfg.CgroupPath == "" {
			return nil, errors.New("datapath: CgroupPath is required in the node attach scope")
		}
	case ScopeWorkloads:
		if cfg.ProxyCgroupPath == "" {
			return nil, errors.New("datapath: ProxyCgroupPath is required in the workloads attach scope")
		}
	default:
		return nil, fmt.Errorf("datapath: unknown attach scope %d", cfg.Scope)
	}
	entries, err := cfg.inFlightEntries()
	if err != nil {
		return nil, err
	}
	if err := rlimit.RemoveMemlock(); err != nil {
		return nil, fmt.Errorf("remove memlock limit: this kernel charges BPF maps to RLIMIT_MEMLOCK (before 5.11): the agent needs %s (on Kubernetes: add the daemonset/kernel-before-5.11 component) or an unlimited memlock limit: %w", MemlockCapability.Name, err)
	}
	spec, err := loadSpec()
	if err != nil {
		return nil, err
	}
	for _, name := range inFlightMaps {
		spec.Maps[name].MaxEntries = entries
	}
	for range 2 {
		if _, err := os.Stat(cfg.PinPath); err == nil {
			return reopen(spec, cfg)
		}
		d, err := install(spec, cfg)
		if errors.Is(err, errLostRace) {
			continue // another agent installed it between Stat and rename
		}
		return d, err
	}
	return nil, fmt.Errorf("install datapath at %s: %w", cfg.PinPath, errLostRace)
}

var (
	errLostRace = errors.New("pin directory appeared during install")
	errNotEmpty = syscall.ENOTEMPTY
)

// install loads, pins into a temporary directory next to PinPath (bpffs
// forbids dots in names, hence no dot-file), attaches,
// and renames the directory into place, so PinPath either holds a complete
// datapath or nothing.
func install(spec *ebpf.CollectionSpec, cfg Config) (_ *Datapath, err error) {
	tmp, err := os.MkdirTemp(filepath.Dir(cfg.PinPath), filepath.Base(cfg.PinPath)+"-installing-")
	if err != nil {
		return nil, fmt.Errorf("create temporary pin directory: %w", err)
	}
	d := cfg.handle()
	defer func() {
		if err != nil {
			// Unpin before closing so that closing the links detaches them.
			os.RemoveAll(tmp)
			d.Close()
		}
	}()

	if err := spec.Variables["legacy_port_keys"].Set(legacyPortKeys(0, cfg.Scope)); err != nil {
		return nil, fmt.Errorf("set legacy_port_keys: %w", err)
	}
	var objs objects
	if err := spec.LoadAndAssign(&objs, nil); err != nil {
		return nil, fmt.Errorf("load BPF programs: %w", describeVerifierError(err))
	}
	d.maps = objs.sluiceMaps
	d.progs = programsOf(&objs.sluicePrograms)
	for name, m := range d.mapsByName() {
		if err := m.Pin(filepath.Join(tmp, name)); err != nil {
			return nil, fmt.Errorf("pin map %s: %w", name, err)
		}
	}
	for _, a := range rootAttachments(cfg.Scope) {
		l, err := attach(cfg.rootCgroup(), a.attach, d.progs[a.prog])
		if err != nil {
			return nil, err
		}
		d.links[a.prog] = l
		if err := l.Pin(linkPin(tmp, a.prog)); err != nil {
			return nil, fmt.Errorf("pin link %s: %w", a.prog, err)
		}
	}
	if cfg.Scope == ScopeWorkloads {
		if err := os.Mkdir(filepath.Join(tmp, workloadsDir), 0o700); err != nil {
			return nil, fmt.Errorf("create %s: %w", workloadsDir, err)
		}
	}
	if err := d.writeLayout(); err != nil {
		return nil, err
	}
	if err := os.Rename(tmp, cfg.PinPath); err != nil {
		if errors.Is(err, os.ErrExist) || errors.Is(err, errNotEmpty) {
			return nil, errLostRace
		}
		return nil, fmt.Errorf("move pins into %s: %w", cfg.PinPath, err)
	}
	return d, nil
}

// legacyPortKeys is the legacy_port_keys constant for programs taking over
// pins of layout pinned (0: a fresh install) in scope: 1 only when
// programs of layouts 1-3 may have published port-keyed entries.
func legacyPortKeys(pinned int, scope Scope) uint8 {
	if pinned >= 1 && pinned <= 3 && scope == ScopeNode {
		return 1
	}
	return 0
}

// handle is a Datapath for cfg with nothing loaded yet.
func (cfg Config) handle() *Datapath {
	return &Datapath{pinPath: cfg.PinPath, links: map[string]link.Link{}, scope: cfg.Scope, proxyCgroup: cfg.ProxyCgroupPath, wlPaths: map[uint64]string{}}
}

// rootCgroup is where the pin directory's own links attach.
func (cfg Config) rootCgroup() string {
	if cfg.Scope == ScopeWorkloads {
		return cfg.ProxyCgroupPath
	}
	return cfg.CgroupPath
}

func attach(cgroupPath string, typ ebpf.AttachType, prog *ebpf.Program) (link.Link, error) {
	l, err := link.AttachCgroup(link.CgroupOptions{Path: cgroupPath, Attach: typ, Program: prog})
	if err != nil {
		return nil, fmt.Errorf("attach %s to %s: %w", typ, cgroupPath, err)
	}
	return l, nil
}

// reopen takes over an existing pinned datapath, migrating it in place when
// it has an older layout:
//
//   - maps whose definition is unchanged are reused with their entries;
//   - maps this version adds are created;
//   - maps whose capacity or flags changed are created anew and filled with
//     the old ones' entries (copyable), and their pins replaced by rename;
//   - every link is then switched to this binary's program with link.Update,
//     so the hooks never run without a program;
//   - last, the layout map gets this version, and the pins of maps an older
//     layout had and this one dropped are removed.
//
// A crash part way leaves pins that the next start migrates again: the
// pins are switched before the programs, so a program never uses a map
// that is not pinned. Entries the old programs add between the copy and
// the switch are lost: those of connections mid-handshake, never those of
// established connections (their entries are older than the copy).
func reopen(spec *ebpf.CollectionSpec, cfg Config) (_ *Datapath, err error) {
	cgroupID, err := CgroupID(cfg.rootCgroup())
	if err != nil {
		return nil, err
	}
	if s := pinnedScope(cfg.PinPath); s != cfg.Scope {
		return nil, fmt.Errorf("%s: %w (%s, this agent's is %s): run 'sluice uninstall' first, or keep the scope", cfg.PinPath, ErrOtherScope, s, cfg.Scope)
	}
	pinned, err := PinnedLayout(cfg.PinPath)
	if err != nil {
		return nil, err
	}
	if pinned > LayoutVersion && !cfg.AllowDowngrade {
		return nil, fmt.Errorf("%s has layout %d, this version makes layout %d: %w; run a release that knows layout %d, or allow the downgrade (--allow-downgrade: the maps this version does not know stay pinned, unused)",
			cfg.PinPath, pinned, LayoutVersion, ErrNewerLayout, pinned)
	}
	d := cfg.handle()
	d.adopted = pinned
	defer func() {
		if err != nil {
			d.Close()
		}
	}()

	replacements := map[string]*ebpf.Map{} // reused as pinned
	migrated := map[string]*ebpf.Map{}     // pinned, copied into a new map
	var created []string                   // not pinned: this layout adds it
	defer func() {
		for _, m := range replacements {
			m.Close()
		}
		for _, m := range migrated {
			m.Close()
		}
	}()
	// Only pins from layouts 1-3, in the node scope, can hold port-keyed
	// entries (legacy_port_keys in bpf/sluice.c).
	if err := spec.Variables["legacy_port_keys"].Set(legacyPortKeys(pinned, cfg.Scope)); err != nil {
		return nil, fmt.Errorf("set legacy_port_keys: %w", err)
	}
	for name, ms := range spec.Maps {
		if strings.HasPrefix(name, ".") {
			continue // .rodata: the load's constants, never pinned
		}
		m, err := ebpf.LoadPinnedMap(filepath.Join(cfg.PinPath, name), nil)
		if errors.Is(err, os.ErrNotExist) {
			created = append(created, name)
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("open pinned map %s: %w", name, err)
		}
		if slices.Contains(inFlightMaps, name) {
			// The pinned capacity stays (see Config.InFlightEntries).
			ms.MaxEntries = m.MaxEntries()
		}
		cerr := ms.Compatible(m)
		switch {
		case cerr == nil:
			replacements[name] = m
		case copyable(ms, m):
			migrated[name] = m
		default:
			m.Close()
			return nil, fmt.Errorf("map %s: %w: %w: no migration from layout %d to %d (run 'sluice uninstall' first)", name, ErrIncompatiblePins, cerr, pinned, LayoutVersion)
		}
	}
	var objs objects
	if err := spec.LoadAndAssign(&objs, &ebpf.CollectionOptions{MapReplacements: replacements}); err != nil {
		return nil, fmt.Errorf("load BPF programs: %w", describeVerifierError(err))
	}
	d.maps = objs.sluiceMaps
	d.progs = programsOf(&objs.sluicePrograms)
	byName := d.mapsByName()

	for name, old := range migrated {
		n, err := copyEntries(old, byName[name])
		if err != nil {
			return nil, fmt.Errorf("migrate map %s (%d entries copied): %w", name, n, err)
		}
		// Pin next to the old one, then rename over it: the pin is
		// always one map or the other.
		next := filepath.Join(cfg.PinPath, name+"_migrating")
		os.Remove(next) // left by a migration that crashed
		if err := byName[name].Pin(next); err != nil {
			return nil, fmt.Errorf("pin migrated map %s: %w", name, err)
		}
		if err := os.Rename(next, filepath.Join(cfg.PinPath, name)); err != nil {
			return nil, fmt.Errorf("replace pinned map %s: %w", name, err)
		}
	}
	for _, name := range created {
		if err := byName[name].Pin(filepath.Join(cfg.PinPath, name)); err != nil {
			return nil, fmt.Errorf("pin map %s: %w", name, err)
		}
	}

	if cfg.Scope == ScopeWorkloads {
		for _, a := range attachments() {
			if a.onProxy() {
				continue
			}
			if _, err := os.Stat(linkPin(cfg.PinPath, a.prog)); err == nil {
				return nil, fmt.Errorf("%s has link_%s: %w (node)", cfg.PinPath, a.prog, ErrOtherScope)
			}
		}
		// A proxy of another cgroup (the previous pod's) keeps its
		// links, retired, while it drains.
		if err := adoptProxy(cfg.PinPath, cfg.ProxyCgroupPath, cgroupID); err != nil {
			return nil, err
		}
	}
	for _, a := range switchOrder(rootAttachments(cfg.Scope)) {
		pin := linkPin(cfg.PinPath, a.prog)
		l, err := link.LoadPinnedLink(pin, nil)
		if errors.Is(err, os.ErrNotExist) {
			// A program this version adds: attach it now.
			if l, err = attach(cfg.rootCgroup(), a.attach, d.progs[a.prog]); err != nil {
				return nil, err
			}
			d.links[a.prog] = l
			if err := l.Pin(pin); err != nil {
				return nil, fmt.Errorf("pin link %s: %w", a.prog, err)
			}
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("open pinned link %s: %w", a.prog, err)
		}
		d.links[a.prog] = l
		info, err := l.Info()
		if err != nil {
			return nil, fmt.Errorf("inspect pinned link %s: %w", a.prog, err)
		}
		if cg := info.Cgroup(); cg != nil && cg.CgroupId != cgroupID {
			return nil, fmt.Errorf("link %s: %w (cgroup id %d, want %d for %s)",
				a.prog, ErrOtherCgroup, cg.CgroupId, cgroupID, cfg.rootCgroup())
		}
		// Atomic replacement: the hook never runs without a program.
		if err := l.Update(d.progs[a.prog]); err != nil {
			return nil, fmt.Errorf("upgrade program %s: %w", a.prog, err)
		}
	}
	if cfg.Scope == ScopeWorkloads {
		// The workloads' programs after the proxy's: the proxy's claim
		// reads what the workloads' sockops publishes, and a newer claim
		// reads the older key forms too (the connect programs' rule,
		// switchOrder, across both sets).
		if err := d.switchWorkloads(); err != nil {
			return nil, err
		}
	}
	if err := d.writeLayout(); err != nil {
		return nil, err
	}
	if pinned <= LayoutVersion {
		if err := removeDropped(cfg.PinPath, spec); err != nil {
			return nil, err
		}
	}
	return d, nil
}

// switchOrder is the order in which reopen switches the programs: the
// connect programs last. They write what the others read later in a
// connection's life (its original destination), and a newer layout may
// keep it elsewhere (layout 5: in the socket's storage, not in orig_dsts);
// every newer program also reads where the older ones wrote. Switched
// first, a new connect4 would redirect connections whose handshake the old
// sockops program then completes without finding their destination (seen:
// about one connection in 900 across an upgrade from layout 4).
func switchOrder(as []attachment) []attachment {
	out := slices.Clone(as)
	slices.SortStableFunc(out, func(a, b attachment) int {
		switch {
		case a.isConnect() && !b.isConnect():
			return 1
		case !a.isConnect() && b.isConnect():
			return -1
		}
		return 0
	})
	return out
}

// isConnect reports whether a hooks connect(2): cgroup/connect4 or 6.
func (a attachment) isConnect() bool {
	return a.attach == ebpf.AttachCGroupInet4Connect || a.attach == ebpf.AttachCGroupInet6Connect
}

// writeLayout records this binary's layout version in the pins.
func (d *Datapath) writeLayout() error {
	if err := d.maps.Layout.Put(layoutKey, sluiceLayoutInfo{Version: LayoutVersion}); err != nil {
		return fmt.Errorf("write layout version: %w", err)
	}
	return nil
}

// removeDropped removes what an older layout pinned and this one no longer
// has: maps by name, and links of programs this version dropped (detached
// first).
func removeDropped(pinPath string, spec *ebpf.CollectionSpec) error {
	entries, err := os.ReadDir(pinPath)
	if err != nil {
		return err
	}
	known := map[string]bool{}
	for _, a := range attachments() {
		known[filepath.Base(linkPin(pinPath, a.prog))] = true
	}
	var errs []error
	for _, e := range entries {
		name := e.Name()
		if _, ok := spec.Maps[name]; ok || known[name] || name == workloadsDir || name == retiredDir {
			continue
		}
		p := filepath.Join(pinPath, name)
		if strings.HasPrefix(name, "link_") {
			if l, err := link.LoadPinnedLink(p, nil); err == nil {
				if err := l.Detach(); err != nil && !errors.Is(err, link.ErrNotSupported) {
					errs = append(errs, fmt.Errorf("detach dropped %s: %w", name, err))
				}
				l.Close()
			}
		}
		if err := os.Remove(p); err != nil {
			errs = append(errs, fmt.Errorf("remove dropped pin %s: %w", name, err))
		}
	}
	return errors.Join(errs...)
}

// OpenPinned opens the pinned maps of an installed datapath without loading or
// attaching anything: for `sluice status` and tools, whether or not an agent
// runs.
func OpenPinned(pinPath string) (*Datapath, error) {
	if _, err := os.Stat(pinPath); errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%s: %w", pinPath, ErrNotInstalled)
	}
	spec, err := loadSpec()
	if err != nil {
		return nil, err
	}
	d := &Datapath{pinPath: pinPath, scope: pinnedScope(pinPath), wlPaths: map[uint64]string{}}
	ms := map[string]**ebpf.Map{}
	for name, p := range d.mapFields() {
		ms[name] = p
	}
	for name := range spec.Maps {
		if strings.HasPrefix(name, ".") {
			continue
		}
		m, err := ebpf.LoadPinnedMap(filepath.Join(pinPath, name), nil)
		if errors.Is(err, os.ErrNotExist) {
			continue // an older layout's pins (the agent migrates them)
		}
		if err != nil {
			d.Close()
			return nil, fmt.Errorf("open pinned map %s: %w", name, err)
		}
		if p, ok := ms[name]; ok {
			*p = m
		} else {
			m.Close()
		}
	}
	return d, nil
}

// PinPath is where this datapath is pinned.
func (d *Datapath) PinPath() string { return d.pinPath }

// Close releases this handle's file descriptors. Pinned programs stay attached
// and pinned maps keep their entries.
func (d *Datapath) Close() error {
	var errs []error
	for _, l := range d.links {
		errs = append(errs, l.Close())
	}
	for _, p := range d.progs {
		errs = append(errs, p.Close())
	}
	for _, m := range d.mapsByName() {
		errs = append(errs, m.Close())
	}
	d.links, d.progs = nil, nil
	return errors.Join(errs...)
}

// programsOf maps each program name to its field in p, from the generated
// struct's ebpf tags.
func programsOf(p *sluicePrograms) map[string]*ebpf.Program {
	out := map[string]*ebpf.Program{}
	v := reflect.ValueOf(p).Elem()
	for i := range v.NumField() {
		if name := v.Type().Field(i).Tag.Get("ebpf"); name != "" {
			out[name] = v.Field(i).Interface().(*ebpf.Program)
		}
	}
	return out
}

// mapFields maps each BPF map name to its field in d.maps, from the
// generated struct's ebpf tags (so a map added in C needs no Go table).
func (d *Datapath) mapFields() map[string]**ebpf.Map {
	out := map[string]**ebpf.Map{}
	v := reflect.ValueOf(&d.maps).Elem()
	for i := range v.NumField() {
		if name := v.Type().Field(i).Tag.Get("ebpf"); name != "" {
			out[name] = v.Field(i).Addr().Interface().(**ebpf.Map)
		}
	}
	return out
}

func (d *Datapath) mapsByName() map[string]*ebpf.Map {
	out := map[string]*ebpf.Map{}
	for name, p := range d.mapFields() {
		if *p != nil {
			out[name] = *p
		}
	}
	return out
}

// describeVerifierError keeps the tail of the verifier log, which says why a
// program was rejected, instead of a one-line summary.
func describeVerifierError(err error) error {
	var ve *ebpf.VerifierError
	if errors.As(err, &ve) {
		return fmt.Errorf("%+v", ve)
	}
	return err
}
