// SPDX-License-Identifier: GPL-2.0
/* Host KVM tracing per VM and workload phase: the libbpf backend.
 *
 * The same aggregates as the bpftrace program (harness/trace/program.py), with
 * per-event work designed for cost:
 *   - targets (QEMU pids, marker tokens) are read-only data set by the loader
 *     before load, so the pid filter is a few compares against constants;
 *   - each VM's phase state is a global (.bss) array: no map lookup to find it;
 *   - @evt is counted in a per-CPU slot per (VM, probe) while the thread and
 *     phases stay the same (an array element: no hashing), and flushed into
 *     the per-CPU hash when they change; the loader adds the slots to the hash
 *     when it dumps, and retries a dump during which a slot was flushed;
 *   - the per-probe extras where the probe has some (exit reasons, fault
 *     codes, CR writes, root lookups) are one per-CPU hash update each;
 *   - tracepoints attach as BTF-typed raw tracepoints (tp_btf), so no event
 *     record is built; functions as fentry where the kernel has trampolines.
 * Per-probe, per-phase, per-vCPU and unphased totals are derived from @evt in
 * Python. Programs the run does not ask for are not loaded (the loader turns
 * their autoload off).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "kvmtrace.h"
#include "probe_ids.h"

char LICENSE[] SEC("license") = "GPL";

/* Set by the loader before load. */
const volatile __u32 n_targets = 0;
const volatile __u32 target_pid[KVMT_MAX_TARGETS] = {};
const volatile __u32 target_token[KVMT_MAX_TARGETS] = {};
const volatile __u32 session = 0;
const volatile __u32 owner_pid = 0;    /* host markers count only from this harness */
/* 0: no stacks; N: a stack on every Nth event per CPU and VM (1: every event);
 * KVMT_RATE_TARGET | ns: a rate target, the period adapted for a stack every ns
 * (1e9 / R for about R stacks a second per CPU and VM). One value, tested with one
 * compare against an immediate (period > KVMT_MAX_STACK_PERIOD), so that the
 * verifier, which knows the load-time constant, removes the test: probes without a
 * rate target run the same instructions as before. */
const volatile __u32 stack_period[KVMT_MAX_PROBES] = {};
const volatile __u8 lat_exit_on = 0;   /* latency 0: kvm_exit -> kvm_entry */
const volatile __u8 lat_pf_on = 0;     /* latency 1: kvm_page_fault -> kvm_entry */
const volatile __u8 exit_traced = 0;   /* kvm_exit is attached: faults name their exit */
const volatile __u8 pf_vcpu_arg = 1;   /* kvm_page_fault's raw args start with the vCPU (5.16+) */
/* Benchmarks only (tests/bench/test_tracer_floor.py): 0 runs the whole program;
 * N stops every event after part N of begin() (1: attach alone, 2: + pid filter,
 * 3: + phase lookup, 4: + the per-CPU counter), so each part's cost can be
 * measured. Constant at load, so the verifier removes the parts not run. */
const volatile __u8 bench_stage = 0;

struct kvmt_vmstate vms[KVMT_MAX_TARGETS] = {};

#define HASH(name, kind, k, v, n)                  \
	struct {                                       \
		__uint(type, kind);                        \
		__uint(max_entries, n);                    \
		__uint(map_flags, BPF_F_NO_PREALLOC);      \
		__type(key, k);                            \
		__type(value, v);                          \
	} name SEC(".maps")

HASH(evt, BPF_MAP_TYPE_PERCPU_HASH, struct kvmt_evt_key, __u64, 65536);
HASH(exits, BPF_MAP_TYPE_PERCPU_HASH, struct kvmt_exit_key, __u64, 65536);
HASH(pf, BPF_MAP_TYPE_PERCPU_HASH, struct kvmt_pf_key, __u64, 65536);
HASH(crw, BPF_MAP_TYPE_PERCPU_HASH, struct kvmt_cr_key, __u64, 65536);
HASH(getpage, BPF_MAP_TYPE_PERCPU_HASH, struct kvmt_getpage_key, __u64, 65536);
HASH(lat, BPF_MAP_TYPE_PERCPU_HASH, struct kvmt_lat_key, __u64, 65536);
HASH(stk, BPF_MAP_TYPE_PERCPU_HASH, struct kvmt_stk_key, __u64, 65536);
/* Rate targets: per stack, the sum of its samples' weights (periods) and their squares. */
HASH(stkw, BPF_MAP_TYPE_PERCPU_HASH, struct kvmt_stk_key, __u64, 65536);
HASH(stkw2, BPF_MAP_TYPE_PERCPU_HASH, struct kvmt_stk_key, __u64, 65536);
/* Rare events (markers): shared maps, atomic adds. */
HASH(markers, BPF_MAP_TYPE_HASH, struct kvmt_phase_key, __u64, 65536);
HASH(marker_ns, BPF_MAP_TYPE_HASH, struct kvmt_phase_key, __u64, 65536);
HASH(gdur, BPF_MAP_TYPE_HASH, struct kvmt_phase_key, __u64, 65536);
HASH(hmarks, BPF_MAP_TYPE_HASH, struct kvmt_phase_key, __u64, 65536);
HASH(hmark_ns, BPF_MAP_TYPE_HASH, struct kvmt_phase_key, __u64, 65536);
HASH(hdur, BPF_MAP_TYPE_HASH, struct kvmt_phase_key, __u64, 65536);
HASH(scratch, BPF_MAP_TYPE_HASH, __u32, struct kvmt_scratch, 65536);

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, KVMT_MAX_TARGETS * KVMT_MAX_PROBES);
	__type(key, __u32);
	__type(value, struct kvmt_slot);
} slots SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_STACK_TRACE);
	__uint(max_entries, 16384);
	__uint(key_size, sizeof(__u32));
	/* The loader sets stack_depth * 8 before load. */
	__uint(value_size, KVMT_MAX_STACK_DEPTH * sizeof(__u64));
} stackmap SEC(".maps");

/* Dump requests (a host marker with this session) wake the loader. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4096);
} dumpreq SEC(".maps");

static __always_inline int target_of_pid(__u32 pid)
{
#pragma unroll
	for (int i = 0; i < KVMT_MAX_TARGETS; i++) {
		if (i >= n_targets)
			break;
		if (target_pid[i] == pid)
			return i;
	}
	return -1;
}

static __always_inline int target_of_token(__u32 token)
{
#pragma unroll
	for (int i = 0; i < KVMT_MAX_TARGETS; i++) {
		if (i >= n_targets)
			break;
		if (target_token[i] == token)
			return i;
	}
	return -1;
}

static __always_inline void percpu_inc(void *map, void *key)
{
	__u64 *v = bpf_map_lookup_elem(map, key);
	if (v) {
		*v += 1;
		return;
	}
	__u64 one = 1;
	/* Another CPU may insert the same key first: then count into its element. */
	if (bpf_map_update_elem(map, key, &one, BPF_NOEXIST)) {
		v = bpf_map_lookup_elem(map, key);
		if (v)
			*v += 1;
	}
}

static __always_inline void shared_add(void *map, void *key, __u64 n)
{
	__u64 *v = bpf_map_lookup_elem(map, key);
	if (!v) {
		__u64 zero = 0;
		bpf_map_update_elem(map, key, &zero, BPF_NOEXIST);
		v = bpf_map_lookup_elem(map, key);
		if (!v)
			return;
	}
	__sync_fetch_and_add(v, n);
}

static __always_inline void set_first(void *map, void *key, __u64 ns)
{
	bpf_map_update_elem(map, key, &ns, BPF_NOEXIST);
}

/* Move VM i to phase ph: close the running interval, count the marker. */
static __always_inline void switch_guest(int i, __u32 pid, __u32 ph)
{
	if (i < 0 || i >= KVMT_MAX_TARGETS)
		return;
	struct kvmt_vmstate *s = &vms[i];
	__u64 now = bpf_ktime_get_ns();
	struct kvmt_phase_key k = { .pid = pid, .phase = (__u32)s->g };
	if (s->gstart)
		shared_add(&gdur, &k, now - s->gstart);
	s->gstart = now;
	s->g = ph;
	k.phase = ph;
	shared_add(&markers, &k, 1);
	set_first(&marker_ns, &k, now);
}

static __always_inline void switch_host(int i, __u32 pid, __u32 ph)
{
	if (i < 0 || i >= KVMT_MAX_TARGETS)
		return;
	struct kvmt_vmstate *s = &vms[i];
	__u64 now = bpf_ktime_get_ns();
	struct kvmt_phase_key k = { .pid = pid, .phase = (__u32)s->h };
	if (s->hstart)
		shared_add(&hdur, &k, now - s->hstart);
	s->hstart = now;
	s->h = ph;
	k.phase = ph;
	shared_add(&hmarks, &k, 1);
	set_first(&hmark_ns, &k, now);
}

struct ev {
	int i;
	__u32 pid, tid, g, h;
};

static __always_inline void percpu_add(void *map, void *key, __u64 n)
{
	__u64 *v = bpf_map_lookup_elem(map, key);
	if (v) {
		*v += n;
		return;
	}
	if (bpf_map_update_elem(map, key, &n, BPF_NOEXIST)) {
		v = bpf_map_lookup_elem(map, key);
		if (v)
			*v += n;
	}
}

/* @evt[pid, tid, g, h, probe] += 1, through this CPU's slot for (VM, probe). */
static __always_inline struct kvmt_slot *count_event(struct ev *e, __u32 probe)
{
	__u32 idx = (__u32)e->i * KVMT_MAX_PROBES + probe;
	struct kvmt_slot *s = bpf_map_lookup_elem(&slots, &idx);
	if (!s)
		return NULL;
	if (s->used && s->tid == e->tid && s->g == e->g && s->h == e->h) {
		s->count += 1;
		return s;
	}
	__sync_fetch_and_add(&s->seq, 1); /* odd: being rewritten */
	if (s->used) {
		struct kvmt_evt_key old = { e->pid, s->tid, s->g, s->h, probe };
		percpu_add(&evt, &old, s->count);
	}
	/* A rate target's sampling restarts in a new phase pair, so that a stack's
	 * weight counts events of its own phase only. */
	if (probe < KVMT_MAX_PROBES && stack_period[probe] > KVMT_MAX_STACK_PERIOD &&
	    (s->g != e->g || s->h != e->h)) {
		s->since = 0;
		s->period = 0;
	}
	s->tid = e->tid;
	s->g = e->g;
	s->h = e->h;
	s->used = 1;
	s->count = 1;
	__sync_fetch_and_add(&s->seq, 1); /* even: consistent */
	return s;
}

/* A rate target's stack: weighted by the period in force (the events since the last
 * stack), then the period adapted to the rate seen since that stack: the mean of the
 * old period and old x interval / dt, in 1..KVMT_MAX_STACK_PERIOD. The only clock read
 * is here, on sampled events. */
static __always_inline void rate_stack(void *ctx, __u32 probe, struct ev *e,
					      struct kvmt_slot *slot, __u64 interval)
{
	__u64 w = slot->period ? slot->period : 1;
	slot->since = 0;
	struct kvmt_stk_key sk = { e->pid, e->g, e->h, probe, 0 };
	sk.stackid = bpf_get_stackid(ctx, &stackmap, 0);
	percpu_inc(&stk, &sk);
	percpu_add(&stkw, &sk, w);
	percpu_add(&stkw2, &sk, w * w);
	__u64 now = bpf_ktime_get_ns();
	__u64 dt = now - slot->last_ns;
	slot->last_ns = now;
	__u64 q = (w + w * interval / (dt ? dt : 1)) / 2;
	slot->period = q < 1 ? 1 : (q > KVMT_MAX_STACK_PERIOD ? KVMT_MAX_STACK_PERIOD : q);
}

/* Filter, phase lookup and the one counter update every probe makes. */
static __always_inline int begin(void *ctx, __u32 probe, struct ev *e)
{
	if (bench_stage == 1)
		return 0;
	__u64 id = bpf_get_current_pid_tgid();
	e->pid = id >> 32;
	e->i = target_of_pid(e->pid);
	if (e->i < 0 || e->i >= KVMT_MAX_TARGETS)
		return 0;
	if (bench_stage == 2)
		return 0;
	e->tid = (__u32)id;
	e->g = (__u32)vms[e->i].g;
	e->h = (__u32)vms[e->i].h;
	if (bench_stage == 3) {
		/* Keep the loads the benchmark measures: nothing else uses them here. */
		__u32 g = e->g, h = e->h;
		barrier_var(g);
		barrier_var(h);
		return 0;
	}
	struct kvmt_slot *slot = count_event(e, probe);
	if (bench_stage == 4)
		return 0;
	__u32 period = probe < KVMT_MAX_PROBES ? stack_period[probe] : 0;
	if (period && slot) {
		/* A rate target is handled out of line (below), so that a fixed period
		 * runs the instructions it ran before: the verifier drops this test on a
		 * load-time constant (checked with bpftool prog dump xlated). */
		if (period > KVMT_MAX_STACK_PERIOD)
			goto rate_target;
		/* Sampled: only every period-th event of this CPU and VM takes a stack. */
		if (period > 1) {
			if (++slot->since < period)
				return 1;
			slot->since = 0;
		}
		struct kvmt_stk_key sk = { e->pid, e->g, e->h, probe, 0 };
		sk.stackid = bpf_get_stackid(ctx, &stackmap, 0);
		percpu_inc(&stk, &sk);
	}
	return 1;
rate_target:
	/* KVMT_RATE_TARGET is set: the same compare as a fixed period, against the slot's. */
	if (++slot->since < slot->period)
		return 1;
	rate_stack(ctx, probe, e, slot, period & ~KVMT_RATE_TARGET);
	return 1;
}

static __always_inline struct kvmt_scratch *scratch_of(__u32 tid)
{
	struct kvmt_scratch *s = bpf_map_lookup_elem(&scratch, &tid);
	if (s)
		return s;
	struct kvmt_scratch zero = {};
	bpf_map_update_elem(&scratch, &tid, &zero, BPF_NOEXIST);
	return bpf_map_lookup_elem(&scratch, &tid);
}

/* Counting-only tracepoints and functions. */
#define COUNT_TP(name)                                  \
	SEC("tp_btf/" #name)                                \
	int tp_##name(__u64 *ctx)                           \
	{                                                   \
		struct ev e;                                    \
		begin(ctx, PROBE_##name, &e);                   \
		return 0;                                       \
	}
#define COUNT_FN(name)                                  \
	SEC("fentry/" #name)                                \
	int fn_##name(__u64 *ctx)                           \
	{                                                   \
		struct ev e;                                    \
		begin(ctx, PROBE_##name, &e);                   \
		return 0;                                       \
	}

/* Host markers come from the harness (not QEMU): the token names the VM. */
SEC("tracepoint/syscalls/sys_enter_getpriority")
int host_marker(struct trace_event_raw_sys_enter *ctx)
{
	__u64 which = ctx->args[0];
	__u32 who = (__u32)ctx->args[1];
	/* Another harness run may have drawn the same token or session. */
	if (owner_pid && (bpf_get_current_pid_tgid() >> 32) != owner_pid)
		return 0;
	if (which == KVMT_HOST_MARKER_WHICH) {
		int i = target_of_token(who >> 16);
		if (i >= 0 && i < KVMT_MAX_TARGETS)
			switch_host(i, target_pid[i], who & 0xffff);
	} else if (which == KVMT_HOST_DUMP_WHICH && (who >> 16) == session) {
		__u64 seq = who & 0xffff;
		bpf_ringbuf_output(&dumpreq, &seq, sizeof(seq), 0);
	}
	return 0;
}

SEC("tp_btf/kvm_cpuid")
int BPF_PROG(tp_kvm_cpuid, unsigned int function, unsigned int index)
{
	__u32 pid = bpf_get_current_pid_tgid() >> 32;
	int i = target_of_pid(pid);
	if (i < 0 || i >= KVMT_MAX_TARGETS)
		return 0;
	if (function == KVMT_GUEST_MARKER_LEAF && (index >> 16) == target_token[i])
		switch_guest(i, pid, index & 0xffff);
	struct ev e;
	begin(ctx, PROBE_kvm_cpuid, &e);
	return 0;
}

/* kvm_exit's reason is computed by the vendor module inside the event's
 * TP_fast_assign, so the raw tracepoint does not carry it: the classic
 * tracepoint reads it from the record (CO-RE: the layout changes by kernel). */
struct trace_event_raw_kvm_exit___kvmt {
	unsigned int exit_reason;
	__u32 isa;
} __attribute__((preserve_access_index));

SEC("tracepoint/kvm/kvm_exit")
int tp_kvm_exit(void *ctx)
{
	struct trace_event_raw_kvm_exit___kvmt *r = ctx;
	/* Loads from the record at offsets relocated to this kernel's layout. */
	__u32 reason = r->exit_reason;
	__u32 isa = r->isa;
	struct ev e;
	if (!begin(ctx, PROBE_kvm_exit, &e))
		return 0;
	struct kvmt_exit_key k = { e.pid, e.g, e.h, isa, reason };
	percpu_inc(&exits, &k);
	if (lat_exit_on || lat_pf_on) {
		struct kvmt_scratch *s = scratch_of(e.tid);
		if (s) {
			s->lx = ((__u64)isa << 32) | reason;
			if (lat_exit_on)
				s->t_exit = bpf_ktime_get_ns();
		}
	} else if (exit_traced) {
		struct kvmt_scratch *s = scratch_of(e.tid);
		if (s)
			s->lx = ((__u64)isa << 32) | reason;
	}
	return 0;
}

SEC("tp_btf/kvm_page_fault")
int tp_kvm_page_fault(__u64 *ctx)
{
	/* 5.16+: (vcpu, fault_address, error_code); before: (fault_address, error_code). */
	__u64 ec = pf_vcpu_arg ? ctx[2] : (__u32)ctx[1];
	struct ev e;
	if (!begin(ctx, PROBE_kvm_page_fault, &e))
		return 0;
	struct kvmt_pf_key k = { .pid = e.pid, .g = e.g, .h = e.h, .ec = ec };
	if (exit_traced || lat_pf_on) {
		struct kvmt_scratch *s = scratch_of(e.tid);
		if (s) {
			if (exit_traced) {
				k.isa = s->lx >> 32;
				k.reason = (__u32)s->lx;
			}
			if (lat_pf_on)
				s->t_pf = bpf_ktime_get_ns();
		}
	}
	percpu_inc(&pf, &k);
	return 0;
}

static __always_inline __u32 log2_bucket(__u64 v)
{
	/* bpftrace's hist(): bucket 0 holds 0, bucket k+1 holds [2^k, 2^(k+1)). */
	if (v == 0)
		return 0;
	__u32 r = 0;
#pragma unroll
	for (int s = 32; s > 0; s >>= 1) {
		if (v >> s) {
			v >>= s;
			r += s;
		}
	}
	return r + 1;
}

SEC("tp_btf/kvm_entry")
int tp_kvm_entry(__u64 *ctx)
{
	struct ev e;
	if (!begin(ctx, PROBE_kvm_entry, &e))
		return 0;
	if (!(lat_exit_on || lat_pf_on))
		return 0;
	struct kvmt_scratch *s = bpf_map_lookup_elem(&scratch, &e.tid);
	if (!s)
		return 0;
	__u64 now = bpf_ktime_get_ns();
	if (lat_exit_on && s->t_exit) {
		struct kvmt_lat_key k = { e.pid, e.g, e.h, 0, log2_bucket(now - s->t_exit) };
		percpu_inc(&lat, &k);
		s->t_exit = 0;
	}
	if (lat_pf_on && s->t_pf) {
		struct kvmt_lat_key k = { e.pid, e.g, e.h, 1, log2_bucket(now - s->t_pf) };
		percpu_inc(&lat, &k);
		s->t_pf = 0;
	}
	return 0;
}

SEC("tp_btf/kvm_cr")
int BPF_PROG(tp_kvm_cr, unsigned int rw, unsigned int cr)
{
	struct ev e;
	if (!begin(ctx, PROBE_kvm_cr, &e))
		return 0;
	if (rw == 1) {
		struct kvmt_cr_key k = { e.pid, e.g, e.h, cr };
		percpu_inc(&crw, &k);
	}
	return 0;
}

SEC("tp_btf/kvm_mmu_get_page")
int BPF_PROG(tp_kvm_mmu_get_page, void *sp, bool created)
{
	struct ev e;
	if (!begin(ctx, PROBE_kvm_mmu_get_page, &e))
		return 0;
	struct kvmt_getpage_key k = { e.pid, e.g, e.h, created ? 1 : 0 };
	percpu_inc(&getpage, &k);
	return 0;
}

COUNT_TP(kvm_pio)
COUNT_TP(kvm_mmio)
COUNT_TP(kvm_emulate_insn)
COUNT_TP(kvm_mmu_prepare_zap_page)
COUNT_TP(kvm_mmu_sync_page)
COUNT_TP(kvm_mmu_unsync_page)
COUNT_TP(fast_page_fault)
COUNT_TP(kvm_mmu_split_huge_page)
COUNT_TP(kvm_mmu_zap_all_fast)
COUNT_TP(kvm_mmu_set_spte)
COUNT_TP(kvm_tdp_mmu_spte_changed)
COUNT_TP(kvm_mmu_set_accessed_bit)
COUNT_TP(kvm_mmu_set_dirty_bit)

COUNT_FN(kvm_mmu_load)
COUNT_FN(kvm_mmu_reset_context)
COUNT_FN(kvm_set_cr3)
COUNT_FN(kvm_mmu_create)
COUNT_FN(vmx_load_mmu_pgd)
COUNT_FN(svm_load_mmu_pgd)
COUNT_FN(construct_eptp)
COUNT_FN(kvm_mmu_page_fault)
COUNT_FN(handle_ept_violation)
COUNT_FN(vmx_vcpu_run)
COUNT_FN(svm_vcpu_run)
COUNT_FN(kvm_arch_vcpu_ioctl_run)
COUNT_FN(kvm_mmu_new_pgd)
COUNT_FN(vt_load_mmu_pgd)
