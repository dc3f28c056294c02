package datapath

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"golang.org/x/sys/unix"
)

// Cgroup2Mount returns the mount point of the cgroup v2 hierarchy as seen by
// this process. Hybrid hosts mount it at /sys/fs/cgroup/unified rather than
// /sys/fs/cgroup, so it is read from /proc/self/mountinfo, never assumed.
func Cgroup2Mount() (string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", fmt.Errorf("find cgroup2 mount: %w", err)
	}
	defer f.Close()
	return findMount(f, "cgroup2")
}

// findMount returns the first mount point of the given filesystem type in
// mountinfo format (proc(5)): "... mountpoint opts [optional...] - fstype ...".
func findMount(r io.Reader, fstype string) (string, error) {
	s := bufio.NewScanner(r)
	for s.Scan() {
		fields := strings.Fields(s.Text())
		for i, f := range fields {
			if f == "-" && i+1 < len(fields) && i >= 5 {
				if fields[i+1] == fstype {
					return unescapeMountPath(fields[4]), nil
				}
				break
			}
		}
	}
	if err := s.Err(); err != nil {
		return "", fmt.Errorf("read mountinfo: %w", err)
	}
	return "", fmt.Errorf("no %s filesystem is mounted", fstype)
}

// unescapeMountPath undoes the octal escapes (\040 for space, ...) that
// mountinfo uses in paths.
func unescapeMountPath(p string) string {
	if !strings.Contains(p, `\`) {
		return p
	}
	var b strings.Builder
	for i := 0; i < len(p); i++ {
		if p[i] == '\\' && i+3 < len(p) {
			var v byte
			ok := true
			for _, c := range p[i+1 : i+4] {
				if c < '0' || c > '7' {
					ok = false
					break
				}
				v = v*8 + byte(c-'0')
			}
			if ok {
				b.WriteByte(v)
				i += 3
				continue
			}
		}
		b.WriteByte(p[i])
	}
	return b.String()
}

// CgroupID returns the id of a cgroup v2 directory: the value
// bpf_get_current_cgroup_id() returns for tasks in it. It is the kernfs node
// id, which the kernel exposes as the 8-byte file handle of the directory
// (and, on 64-bit, as its inode number).
func CgroupID(path string) (uint64, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return 0, fmt.Errorf("cgroup %s: %w", path, err)
	}
	if st.Type != unix.CGROUP2_SUPER_MAGIC {
		return 0, fmt.Errorf("cgroup %s: not on a cgroup2 filesystem", path)
	}
	h, _, err := unix.NameToHandleAt(unix.AT_FDCWD, path, 0)
	if err == nil && h.Size() == 8 {
		return binary.NativeEndian.Uint64(h.Bytes()), nil
	}
	var s unix.Stat_t
	if err := unix.Stat(path, &s); err != nil {
		return 0, fmt.Errorf("cgroup %s: %w", path, err)
	}
	return s.Ino, nil
}

// ErrNotBPFFS is returned when a directory exists but is not on bpffs.
var ErrNotBPFFS = errors.New("not a bpffs mount")

// EnsureBPFFS makes sure dir is a mounted bpffs, mounting one if dir is not
// (bpffs is not mounted by default on every distribution).
func EnsureBPFFS(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create %s: %w", dir, err)
	}
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return fmt.Errorf("statfs %s: %w", dir, err)
	}
	if st.Type == unix.BPF_FS_MAGIC {
		return nil
	}
	if err := unix.Mount("bpf", dir, "bpf", 0, "mode=0700"); err != nil {
		return fmt.Errorf("mount bpffs at %s: %w", dir, err)
	}
	return nil
}

// IsCgroup2 reports whether dir is on a cgroup v2 filesystem.
func IsCgroup2(dir string) bool {
	var st unix.Statfs_t
	return unix.Statfs(dir, &st) == nil && st.Type == unix.CGROUP2_SUPER_MAGIC
}

// ResolveCgroup2 returns dir when it is on cgroup v2, or dir/unified when
// dir is a hybrid host's cgroup directory (a tmpfs of v1 hierarchies) whose
// v2 hierarchy is mounted at unified: the DaemonSet mounts the host's
// /sys/fs/cgroup whatever its layout.
func ResolveCgroup2(dir string) (string, error) {
	if IsCgroup2(dir) {
		return dir, nil
	}
	if u := dir + "/unified"; IsCgroup2(u) {
		return u, nil
	}
	return "", fmt.Errorf("%s is not a cgroup v2 directory, and has no cgroup v2 hierarchy at unified/ (hybrid hosts mount it there)", dir)
}
