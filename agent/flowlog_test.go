package agent

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

// A flow log file is moved to FILE.1 when the next line would take it past
// its limit: never more than about twice the limit on disk, no line split.
func TestFlowLogRotates(t *testing.T) {
	path := filepath.Join(t.TempDir(), "flows.jsonl")
	w, closeFn, err := openFlowLog(path, 100)
	if err != nil {
		t.Fatal(err)
	}
	line := append(bytes.Repeat([]byte("x"), 39), '\n')
	for range 7 {
		if _, err := w.Write(line); err != nil {
			t.Fatal(err)
		}
	}
	if err := closeFn(); err != nil {
		t.Fatal(err)
	}
	cur, _ := os.ReadFile(path)
	prev, _ := os.ReadFile(path + ".1")
	// 7 lines of 40 bytes, 2 per 100-byte file: 2 in .1, 1 in the current.
	if len(cur) != 40 || len(prev) != 80 {
		t.Errorf("after 7 lines: current %d bytes, previous %d; want 40 and 80", len(cur), len(prev))
	}
	if w, _, err := openFlowLog("-", 0); err != nil || w != os.Stdout {
		t.Errorf(`"-": %v, %v; want stdout`, w, err)
	}
	if w, _, err := openFlowLog("", 0); err != nil || w != nil {
		t.Errorf(`"": %v, %v; want none`, w, err)
	}
}
