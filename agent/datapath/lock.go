package datapath

import (
	"context"
	"errors"
	"fmt"
	"os"
	"syscall"
	"time"
)

// NodeLock is held by the one agent that programs the pins of a node: two
// agents on a node at once (a DaemonSet update's new pod while the old one
// stops, or a stuck old pod) never write the same maps concurrently. It is
// an flock(2) on a directory next to the pins, on the same bpffs, so every
// container that mounts the host's bpffs sees the same lock, and the
// kernel releases it when its holder exits, however it exits.
type NodeLock struct {
	f *os.File
}

// LockPath is the directory whose flock is pinPath's node lock.
func LockPath(pinPath string) string { return pinPath + "-lock" }

// lockPoll is how often a waiting LockNode tries again.
const lockPoll = 100 * time.Millisecond

// LockNode takes pinPath's node lock, waiting while another process holds
// it; waiting is called once when it has to wait, then every 10 s with how
// long it has waited. It returns ctx's error if ctx ends first.
func LockNode(ctx context.Context, pinPath string, waiting func(time.Duration)) (*NodeLock, error) {
	dir := LockPath(pinPath)
	if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
		return nil, fmt.Errorf("node lock: %w", err)
	}
	f, err := os.Open(dir)
	if err != nil {
		return nil, fmt.Errorf("node lock: %w", err)
	}
	start := time.Now()
	var told time.Time
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return &NodeLock{f: f}, nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("node lock %s: %w", dir, err)
		}
		if waiting != nil && (told.IsZero() || time.Since(told) >= 10*time.Second) {
			waiting(time.Since(start))
			told = time.Now()
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("waiting for the node lock %s: %w", dir, ctx.Err())
		case <-time.After(lockPoll):
		}
	}
}

// TryLockNode takes pinPath's node lock if it is free; nil, nil when another
// process holds it.
func TryLockNode(pinPath string) (*NodeLock, error) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	l, err := LockNode(ctx, pinPath, nil)
	if errors.Is(err, context.Canceled) {
		return nil, nil
	}
	return l, err
}

// Unlock releases the lock.
func (l *NodeLock) Unlock() error { return l.f.Close() }

// removeLock removes pinPath's lock directory unless someone holds it
// (uninstall: no agent runs any more).
func removeLock(pinPath string) error {
	dir := LockPath(pinPath)
	f, err := os.Open(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	defer f.Close()
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		return fmt.Errorf("node lock %s is held: an agent still runs (left in place): %w", dir, err)
	}
	return os.Remove(dir)
}
