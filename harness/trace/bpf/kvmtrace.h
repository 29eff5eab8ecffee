/* Types shared by the BPF program (kvmtrace.bpf.c) and its loader (loader.c).
 *
 * Every key is a struct of u32s so that the loader can print it as bpftrace
 * does ("1,2,3"), and the harness parses both backends' output with one parser
 * (harness/trace/parse.py). Maps are named as in harness/trace/program.py.
 */
#ifndef KVMTRACE_H
#define KVMTRACE_H

#define KVMT_MAX_TARGETS 16
#define KVMT_MAX_PROBES 64
#define KVMT_MAX_STACK_DEPTH 127
/* The largest sampling period (harness/trace/probes.py MAX_STACK_PERIOD). */
#define KVMT_MAX_STACK_PERIOD (1 << 20)
/* stack_period[] of a rate target: this flag | ns between stacks. */
#define KVMT_RATE_TARGET 0x80000000u
#define KVMT_LAT_BUCKETS 66 /* 0, then [2^k, 2^(k+1)) for k = 0..63 */

/* getpriority(which, who) host markers (harness/trace/program.py). */
#define KVMT_HOST_MARKER_WHICH 0x4B564D00
#define KVMT_HOST_DUMP_WHICH 0x4B564D01
#define KVMT_GUEST_MARKER_LEAF 0x4B564D00

struct kvmt_vmstate {
	__u64 g;       /* current guest-marker phase */
	__u64 h;       /* current host-window phase */
	__u64 gstart;  /* nsecs the guest phase began (0: none yet) */
	__u64 hstart;
};

struct kvmt_evt_key { __u32 pid, tid, g, h, probe; };
struct kvmt_phase_key { __u32 pid, phase; };
struct kvmt_exit_key { __u32 pid, g, h, isa, reason; };
struct kvmt_pf_key { __u32 pid, g, h, isa, reason; __u32 pad; __u64 ec; };
struct kvmt_cr_key { __u32 pid, g, h, cr; };
struct kvmt_getpage_key { __u32 pid, g, h, created; };
struct kvmt_lat_key { __u32 pid, g, h, id, bucket; };
struct kvmt_stk_key { __u32 pid, g, h, probe; __s32 stackid; };

/* @evt's fast path: per CPU, per (VM, probe), the count of the (tid, g, h) that
 * fired last (and the sampling state of a stacked probe). A different key flushes
 * the count into @evt first. ``seq`` is odd while a flush rewrites the slot, so a
 * reader can tell a consistent copy. */
struct kvmt_slot {
	__u64 seq;
	__u32 tid, g, h, used;
	__u64 count;
	__u64 since;   /* sampled stacks: events since this CPU's last stack of (VM, probe) */
	/* Rate targets only: the period in force (0: take the next event) and the
	 * bpf_ktime_get_ns() of the last stack; both restart with a new phase pair. */
	__u64 period;
	__u64 last_ns;
};

/* Per-thread scratch: the last exit (for the page fault it causes), latency starts. */
struct kvmt_scratch {
	__u64 lx;      /* (isa << 32) | exit_reason of the last kvm_exit */
	__u64 t_exit;
	__u64 t_pf;
};

#endif
