package datapath

import (
	"context"
	"errors"
	"os"
	"testing"
	"time"
)

// The node lock admits one holder: a second waits (and says so) until the
// first releases it, gives up when its context ends, and uninstall removes
// the lock only once nobody holds it.
func TestPrivilegedNodeLock(t *testing.T) {
	cfg := testConfig(t)
	first, err := LockNode(context.Background(), cfg.PinPath, nil)
	if err != nil {
		t.Fatal(err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	waited := 0
	if _, err := LockNode(ctx, cfg.PinPath, func(time.Duration) { waited++ }); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("second lock while the first is held: %v, want it to wait until its deadline", err)
	}
	if waited != 1 {
		t.Errorf("the waiting callback ran %d times, want once", waited)
	}
	if err := Uninstall(cfg.PinPath); err == nil {
		t.Error("uninstall while the lock is held: no error, want it to say an agent runs")
	}
	if _, err := os.Stat(LockPath(cfg.PinPath)); err != nil {
		t.Errorf("uninstall removed a held lock: %v", err)
	}

	got := make(chan *NodeLock, 1)
	go func() {
		l, err := LockNode(context.Background(), cfg.PinPath, nil)
		if err != nil {
			t.Error(err)
		}
		got <- l
	}()
	select {
	case <-got:
		t.Fatal("a second holder got the lock while the first held it")
	case <-time.After(200 * time.Millisecond):
	}
	released := time.Now()
	first.Unlock()
	select {
	case l := <-got:
		t.Logf("handed over %v after the release", time.Since(released).Round(time.Millisecond))
		l.Unlock()
	case <-time.After(2 * time.Second):
		t.Fatal("the waiter did not get the lock after its release")
	}
	if err := Uninstall(cfg.PinPath); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(LockPath(cfg.PinPath)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("uninstall left the free lock: %v", err)
	}
}
