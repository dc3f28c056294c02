package datapath

// The BPF object is compiled from bpf/sluice.c and committed (sluice_bpfel.go,
// sluice_bpfel.o), so building and testing need no clang. `make generate`
// reruns this; `make verify` fails if the committed output is stale.
//go:generate go tool bpf2go -cc clang-14 -cflags "-O2 -g -Wall -Werror -Wno-unused-variable" -target bpfel -type workload -type proxy_config -type orig_dst -type tuple_key -type lpm_v4_key -type lpm_v6_key -type workload_stats -type resolver_key -type counter -type dst_class -type metadata_key -type layout_info -type flow_event -type flow_decision -type workload_flag -type proxy_added sluice ../../bpf/sluice.c -- -I../../bpf/include -I../../bpf
