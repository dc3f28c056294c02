package datapath

import "sync"

// objectTables are the tables the Go side derives from the embedded object
// instead of keeping copies of C lists: its programs, its counters, its
// flow decisions and the resolvers map's capacity.
type objectTables struct {
	attachments  []attachment
	counters     []counterSlot
	flowNames    map[FlowDecision]string
	maxResolvers int
}

// tables reads objectTables from one parse of the embedded object, on
// first use; the parsed spec is not kept. The object is part of the
// binary, so failing to read it is a build defect (the unit tests read it).
var tables = sync.OnceValue(func() objectTables {
	spec, err := loadSpec()
	if err != nil {
		panic(err)
	}
	return objectTables{
		attachments:  attachmentsOf(spec),
		counters:     counterSlotsOf(spec),
		flowNames:    flowNamesOf(spec),
		maxResolvers: int(spec.Maps["resolvers"].MaxEntries),
	}
})
