// SPDX-License-Identifier: GPL-2.0
/* kvmtrace: loads kvmtrace.bpf.c through its libbpf skeleton, attaches the
 * probes a run asks for, and speaks the bpftrace 0.17 "-f json" dialect the
 * harness already parses (harness/trace/parse.py): "attached_probes", a ready
 * printf once every probe is attached, and one "map"/"hist" line per map on
 * each dump request and at exit. Dump requests arrive from the BPF side (a
 * getpriority host marker carrying this session, through a ring buffer), so the
 * harness drives both backends the same way (harness/trace/runner.py).
 *
 * Usage: kvmtrace CONFIG    (CONFIG: lines "session N", "target PID TOKEN",
 *                            "probe NAME", "stack NAME [PERIOD]", "stack_rate NAME R",
 *                            "stack_depth N",
 *                            "latency ID", optional "btf PATH")
 * SIGINT/SIGTERM: print all maps once more and exit 0.
 */
#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <bpf/bpf.h>
#include <bpf/btf.h>
#include <bpf/libbpf.h>
#include <linux/types.h>
#include "kvmtrace.h"
#include "probe_ids.h"
#include "kvmtrace.skel.h"

#define READY_MESSAGE "harness-tracer-ready"

static volatile sig_atomic_t stop;
static int nr_cpus;

struct config {
	unsigned session;
	unsigned owner; /* the only process whose host markers count (0: any) */
	unsigned n_targets;
	unsigned pid[KVMT_MAX_TARGETS], token[KVMT_MAX_TARGETS];
	char probes[KVMT_MAX_PROBES][64];
	unsigned n_probes;
	char stacks[KVMT_MAX_PROBES][64];
	unsigned stack_period[KVMT_MAX_PROBES];
	unsigned stack_rate[KVMT_MAX_PROBES]; /* 0: fixed period; R: about R stacks/s per CPU */
	unsigned n_stacks, n_rates;
	unsigned stack_depth;
	int lat[2];
	unsigned bench_stage; /* benchmarks only: see kvmtrace.bpf.c */
	char btf[4096];
};

static void die(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	fprintf(stderr, "kvmtrace: ");
	vfprintf(stderr, fmt, ap);
	fprintf(stderr, "\n");
	va_end(ap);
	exit(1);
}

/* Room for element n of a growable array: doubles its capacity (from first) when full. */
static void *grow(void *arr, size_t *cap, size_t n, size_t elem, size_t first)
{
	if (n < *cap)
		return arr;
	*cap = *cap ? *cap * 2 : first;
	arr = realloc(arr, *cap * elem);
	if (!arr)
		die("out of memory");
	return arr;
}

static int libbpf_print(enum libbpf_print_level level, const char *fmt, va_list ap)
{
	if (level > LIBBPF_WARN)
		return 0;
	return vfprintf(stderr, fmt, ap);
}

static void on_signal(int sig) { (void)sig; stop = 1; }

static void read_config(const char *path, struct config *c)
{
	FILE *f = fopen(path, "r");
	char line[4200], word[64], arg[4096];
	unsigned a, b;
	int lineno = 0;
	if (!f)
		die("%s: %s", path, strerror(errno));
	memset(c, 0, sizeof(*c));
	c->stack_depth = 32;
	while (fgets(line, sizeof(line), f)) {
		char key[32];
		lineno++;
		if (line[0] == '#' || line[0] == '\n')
			continue;
		arg[0] = 0;
		if (sscanf(line, "%31s %4095[^\n]", key, arg) < 1)
			continue;
		if (!strcmp(key, "session") && sscanf(arg, "%u", &a) == 1) {
			c->session = a;
		} else if (!strcmp(key, "owner") && sscanf(arg, "%u", &a) == 1) {
			c->owner = a;
		} else if (!strcmp(key, "target") && sscanf(arg, "%u %u", &a, &b) == 2) {
			if (c->n_targets >= KVMT_MAX_TARGETS)
				die("%s:%d: more than %d targets", path, lineno, KVMT_MAX_TARGETS);
			c->pid[c->n_targets] = a;
			c->token[c->n_targets++] = b;
		} else if (!strcmp(key, "probe") && sscanf(arg, "%63s", word) == 1) {
			if (c->n_probes >= KVMT_MAX_PROBES)
				die("%s:%d: too many probes", path, lineno);
			strcpy(c->probes[c->n_probes++], word);
		} else if (!strcmp(key, "stack") && sscanf(arg, "%63s", word) == 1) {
			/* "stack NAME [PERIOD]": PERIOD 1 (the default) stacks every event. */
			int n = sscanf(arg, "%*s %u", &a);
			if (c->n_stacks >= KVMT_MAX_PROBES)
				die("%s:%d: too many stacks", path, lineno);
			if (n == 1 && a < 1)
				die("%s:%d: stack period 0; it must be 1 or more", path, lineno);
			c->stack_period[c->n_stacks] = n == 1 ? a : 1;
			strcpy(c->stacks[c->n_stacks++], word);
		} else if (!strcmp(key, "stack_rate") && sscanf(arg, "%63s %u", word, &a) == 2) {
			/* "stack_rate NAME R": the period follows the event rate, about R stacks
			 * a second per CPU and VM, each weighted by the period in force. */
			if (c->n_stacks >= KVMT_MAX_PROBES)
				die("%s:%d: too many stacks", path, lineno);
			if (a < 1 || a > 100000)
				die("%s:%d: stack rate %u not in 1..100000", path, lineno, a);
			c->stack_period[c->n_stacks] = 0;
			c->stack_rate[c->n_stacks] = a;
			c->n_rates++;
			strcpy(c->stacks[c->n_stacks++], word);
		} else if (!strcmp(key, "stack_depth") && sscanf(arg, "%u", &a) == 1) {
			if (a < 1 || a > KVMT_MAX_STACK_DEPTH)
				die("%s:%d: stack_depth %u not in 1..%d", path, lineno, a,
				    KVMT_MAX_STACK_DEPTH);
			c->stack_depth = a;
		} else if (!strcmp(key, "bench_stage") && sscanf(arg, "%u", &a) == 1 && a <= 4) {
			c->bench_stage = a;
		} else if (!strcmp(key, "latency") && sscanf(arg, "%u", &a) == 1 && a < 2) {
			c->lat[a] = 1;
		} else if (!strcmp(key, "btf") && arg[0]) {
			strcpy(c->btf, arg);
		} else {
			die("%s:%d: cannot parse: %s", path, lineno, line);
		}
	}
	fclose(f);
	if (!c->n_targets)
		die("%s: no target", path);
}

/* --- probe names ---------------------------------------------------------- */

struct probe_name { const char *name; int id; };
static const struct probe_name probe_names[] = {
#define P(n) { #n, PROBE_##n },
	P(kvm_exit) P(kvm_page_fault) P(kvm_cr) P(kvm_cpuid) P(kvm_pio) P(kvm_mmio)
	P(kvm_emulate_insn) P(kvm_entry) P(kvm_mmu_get_page) P(kvm_mmu_prepare_zap_page)
	P(kvm_mmu_sync_page) P(kvm_mmu_unsync_page) P(fast_page_fault)
	P(kvm_mmu_split_huge_page) P(kvm_mmu_zap_all_fast) P(kvm_mmu_set_spte)
	P(kvm_tdp_mmu_spte_changed) P(kvm_mmu_set_accessed_bit) P(kvm_mmu_set_dirty_bit)
	P(kvm_mmu_load) P(kvm_mmu_reset_context) P(kvm_set_cr3) P(kvm_mmu_create)
	P(vmx_load_mmu_pgd) P(svm_load_mmu_pgd) P(construct_eptp) P(kvm_mmu_page_fault)
	P(handle_ept_violation) P(vmx_vcpu_run) P(svm_vcpu_run) P(kvm_arch_vcpu_ioctl_run)
	P(kvm_mmu_new_pgd) P(vt_load_mmu_pgd)
#undef P
};

static int probe_id_of(const char *name)
{
	for (size_t i = 0; i < sizeof(probe_names) / sizeof(probe_names[0]); i++)
		if (!strcmp(probe_names[i].name, name))
			return probe_names[i].id;
	return -1;
}

/* The program of catalogue probe NAME: tp_NAME (tracepoint) or fn_NAME (function). */
static struct bpf_program *program_of(struct bpf_object *obj, const char *name)
{
	char buf[80];
	struct bpf_program *p;
	snprintf(buf, sizeof(buf), "tp_%s", name);
	p = bpf_object__find_program_by_name(obj, buf);
	if (p)
		return p;
	snprintf(buf, sizeof(buf), "fn_%s", name);
	return bpf_object__find_program_by_name(obj, buf);
}

static int wanted(const struct config *c, const char *prog_name)
{
	if (!strcmp(prog_name, "host_marker"))
		return 1;
	for (unsigned i = 0; i < c->n_probes; i++) {
		char buf[80];
		snprintf(buf, sizeof(buf), "tp_%s", c->probes[i]);
		if (!strcmp(buf, prog_name))
			return 1;
		snprintf(buf, sizeof(buf), "fn_%s", c->probes[i]);
		if (!strcmp(buf, prog_name))
			return 1;
	}
	return 0;
}

/* Number of arguments of the raw tracepoint NAME (its btf_trace_NAME typedef), or -1. */
static int raw_tp_args(const struct btf *btf, const char *name)
{
	char buf[128];
	snprintf(buf, sizeof(buf), "btf_trace_%s", name);
	int id = btf__find_by_name_kind(btf, buf, BTF_KIND_TYPEDEF);
	if (id < 0)
		return -1;
	const struct btf_type *t = btf__type_by_id(btf, id);
	t = btf__type_by_id(btf, t->type); /* pointer */
	if (!t || !btf_is_ptr(t))
		return -1;
	t = btf__type_by_id(btf, t->type);
	if (!t || !btf_is_func_proto(t))
		return -1;
	return btf_vlen(t) - 1; /* the first is the tracepoint's void *data */
}

/* --- kernel symbols (stacks) ----------------------------------------------- */

struct ksym { unsigned long addr; char *name; };
static struct ksym *ksyms;
static size_t n_ksyms;

static int ksym_cmp(const void *a, const void *b)
{
	const struct ksym *x = a, *y = b;
	return x->addr < y->addr ? -1 : x->addr > y->addr;
}

static void load_ksyms(void)
{
	FILE *f = fopen("/proc/kallsyms", "r");
	char line[512], name[256], type;
	unsigned long addr;
	size_t cap = 0;
	if (!f)
		die("/proc/kallsyms: %s", strerror(errno));
	while (fgets(line, sizeof(line), f)) {
		if (sscanf(line, "%lx %c %255s", &addr, &type, name) != 3)
			continue;
		if (type != 't' && type != 'T')
			continue;
		ksyms = grow(ksyms, &cap, n_ksyms, sizeof(*ksyms), 65536);
		ksyms[n_ksyms].addr = addr;
		ksyms[n_ksyms++].name = strdup(name);
	}
	fclose(f);
	qsort(ksyms, n_ksyms, sizeof(*ksyms), ksym_cmp);
}

static const struct ksym *ksym_of(unsigned long addr)
{
	size_t lo = 0, hi = n_ksyms;
	while (lo < hi) {
		size_t mid = (lo + hi) / 2;
		if (ksyms[mid].addr <= addr)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo ? &ksyms[lo - 1] : NULL;
}

/* --- dumps ----------------------------------------------------------------- */

static int map_empty(int fd, size_t key_size)
{
	char key[64];
	(void)key_size;
	return bpf_map_get_next_key(fd, NULL, key) != 0;
}

static __u64 percpu_sum(int fd, const void *key, __u64 *buf)
{
	__u64 sum = 0;
	if (bpf_map_lookup_elem(fd, key, buf))
		return 0;
	for (int c = 0; c < nr_cpus; c++)
		sum += buf[c];
	return sum;
}

/* Print a map whose keys are NFIELDS u32s (then an optional u64) and values u64. */
static void print_counter_map(const char *name, int fd, int nfields, int u64_tail, int percpu)
{
	char key[64], next[64];
	__u64 buf[nr_cpus > 0 ? nr_cpus : 1];
	void *prev = NULL;
	int first = 1;
	if (map_empty(fd, sizeof(key)))
		return;
	printf("{\"type\": \"map\", \"data\": {\"@%s\": {", name);
	while (bpf_map_get_next_key(fd, prev, next) == 0) {
		__u64 v;
		memcpy(key, next, sizeof(key));
		prev = key;
		if (percpu) {
			v = percpu_sum(fd, key, buf);
		} else if (bpf_map_lookup_elem(fd, key, &v)) {
			continue;
		}
		if (percpu && v == 0)
			continue;
		printf("%s\"", first ? "" : ", ");
		first = 0;
		const __u32 *f = (const __u32 *)key;
		for (int i = 0; i < nfields; i++)
			printf(i ? ",%u" : "%u", f[i]);
		if (u64_tail) {
			__u64 tail;
			memcpy(&tail, key + ((nfields + 1) & ~1) * 4, sizeof(tail));
			printf(",%llu", (unsigned long long)tail);
		}
		printf("\": %llu", (unsigned long long)v);
	}
	printf("}}}\n");
}

/* @evt = the per-CPU hash plus every CPU's slots (kvmtrace.h, struct kvmt_slot).
 * The slots are read before and after the hash; a slot whose seq moved (or was
 * odd) was flushed into the hash meanwhile, and the dump is taken again. */
struct evt_row { struct kvmt_evt_key k; __u64 n; };

static int slots_read(int fd, unsigned n, struct kvmt_slot *out)
{
	for (__u32 i = 0; i < n; i++)
		if (bpf_map_lookup_elem(fd, &i, out + (size_t)i * nr_cpus))
			return -1;
	return 0;
}

static void print_evt(struct kvmtrace *skel, const struct config *c)
{
	int hfd = bpf_map__fd(skel->maps.evt), sfd = bpf_map__fd(skel->maps.slots);
	unsigned n_slots = c->n_targets * KVMT_MAX_PROBES;
	size_t per = (size_t)n_slots * nr_cpus;
	struct kvmt_slot *s1 = calloc(per, sizeof(*s1)), *s2 = calloc(per, sizeof(*s2));
	__u64 buf[nr_cpus > 0 ? nr_cpus : 1];
	struct evt_row *rows = NULL;
	size_t n_rows = 0, cap = 0;
	int consistent = 0;
	if (!s1 || !s2)
		die("out of memory");
	for (int attempt = 0; attempt < 100 && !consistent; attempt++) {
		struct kvmt_evt_key key, next, *prev = NULL;
		n_rows = 0;
		if (slots_read(sfd, n_slots, s1))
			die("reading the event slots: %s", strerror(errno));
		while (bpf_map_get_next_key(hfd, prev, &next) == 0) {
			key = next;
			prev = &key;
			__u64 v = percpu_sum(hfd, &key, buf);
			rows = grow(rows, &cap, n_rows, sizeof(*rows), 1024);
			rows[n_rows].k = key;
			rows[n_rows++].n = v;
		}
		if (slots_read(sfd, n_slots, s2))
			die("reading the event slots: %s", strerror(errno));
		consistent = 1;
		for (size_t i = 0; i < per; i++)
			if (s1[i].seq != s2[i].seq || (s2[i].seq & 1))
				consistent = 0;
	}
	if (!consistent)
		fprintf(stderr, "kvmtrace: @evt kept changing during 100 dump attempts; "
				"this dump may be off by a flushed slot\n");
	for (unsigned i = 0; i < n_slots; i++) {
		for (int cpu = 0; cpu < nr_cpus; cpu++) {
			const struct kvmt_slot *s = &s2[(size_t)i * nr_cpus + cpu];
			if (!s->used || !s->count)
				continue;
			struct kvmt_evt_key k = { c->pid[i / KVMT_MAX_PROBES], s->tid, s->g, s->h,
						  i % KVMT_MAX_PROBES };
			size_t r;
			for (r = 0; r < n_rows; r++)
				if (!memcmp(&rows[r].k, &k, sizeof(k)))
					break;
			if (r == n_rows) {
				rows = grow(rows, &cap, n_rows, sizeof(*rows), 1024);
				rows[n_rows].k = k;
				rows[n_rows++].n = 0;
			}
			rows[r].n += s->count;
		}
	}
	int first = 1;
	for (size_t r = 0; r < n_rows; r++) {
		if (!rows[r].n)
			continue;
		printf(first ? "{\"type\": \"map\", \"data\": {\"@evt\": {" : ", ");
		first = 0;
		printf("\"%u,%u,%u,%u,%u\": %llu", rows[r].k.pid, rows[r].k.tid, rows[r].k.g,
		       rows[r].k.h, rows[r].k.probe, (unsigned long long)rows[r].n);
	}
	if (!first)
		printf("}}}\n");
	free(rows);
	free(s1);
	free(s2);
}

static void print_phases(struct kvmtrace *skel, const struct config *c)
{
	const char *names[2] = { "gphase", "hphase" };
	for (int kind = 0; kind < 2; kind++) {
		int first = 1;
		for (unsigned i = 0; i < c->n_targets; i++) {
			struct kvmt_vmstate *s = &skel->bss->vms[i];
			__u64 start = kind ? s->hstart : s->gstart;
			__u64 ph = kind ? s->h : s->g;
			if (!start)
				continue;
			printf(first ? "{\"type\": \"map\", \"data\": {\"@%s\": {" : "", names[kind]);
			printf("%s\"%u\": %llu", first ? "" : ", ", c->pid[i], (unsigned long long)ph);
			first = 0;
		}
		if (!first)
			printf("}}}\n");
	}
}

static void print_lat(int fd)
{
	struct kvmt_lat_key key, next, *prev = NULL;
	__u64 buf[nr_cpus > 0 ? nr_cpus : 1];
	/* (pid, g, h, id) -> counts per bucket; few keys, so a small linear table. */
	struct row { __u32 k[4]; __u64 n[KVMT_LAT_BUCKETS]; } *rows = NULL;
	size_t n_rows = 0, cap = 0;
	while (bpf_map_get_next_key(fd, prev, &next) == 0) {
		key = next;
		prev = &key;
		__u64 v = percpu_sum(fd, &key, buf);
		if (!v || key.bucket >= KVMT_LAT_BUCKETS)
			continue;
		size_t r;
		for (r = 0; r < n_rows; r++)
			if (!memcmp(rows[r].k, &key, sizeof(rows[r].k)))
				break;
		if (r == n_rows) {
			rows = grow(rows, &cap, n_rows, sizeof(*rows), 64);
			memset(&rows[r], 0, sizeof(*rows));
			memcpy(rows[r].k, &key, sizeof(rows[r].k));
			n_rows++;
		}
		rows[r].n[key.bucket] += v;
	}
	if (n_rows) {
		printf("{\"type\": \"hist\", \"data\": {\"@lat\": {");
		for (size_t r = 0; r < n_rows; r++) {
			printf("%s\"%u,%u,%u,%u\": [", r ? ", " : "", rows[r].k[0], rows[r].k[1],
			       rows[r].k[2], rows[r].k[3]);
			int first = 1;
			for (int b = 0; b < KVMT_LAT_BUCKETS; b++) {
				if (!rows[r].n[b])
					continue;
				unsigned long long lo = b ? 1ULL << (b - 1) : 0;
				unsigned long long hi = b ? (b == 64 ? ~0ULL : (1ULL << b) - 1) : 0;
				printf("%s{\"min\": %llu, \"max\": %llu, \"count\": %llu}",
				       first ? "" : ", ", lo, hi, (unsigned long long)rows[r].n[b]);
				first = 0;
			}
			printf("]");
		}
		printf("}}}\n");
	}
	free(rows);
}

/* @stk: a stack whose id the kernel could not give (bpf_get_stackid failed: its
 * callchain buffer busy, or a stack-map collision) prints, as bpftrace does, as
 * an empty stack; all of a key's lost stacks are summed into that one entry. */
static void print_stacks(const char *name, int fd, int stack_fd, unsigned depth)
{
	struct kvmt_stk_key key, next, *prev = NULL;
	__u64 buf[nr_cpus > 0 ? nr_cpus : 1];
	__u64 ips[KVMT_MAX_STACK_DEPTH];
	struct { struct kvmt_stk_key k; __u64 n; } *rows = NULL;
	size_t n_rows = 0, cap = 0;
	while (bpf_map_get_next_key(fd, prev, &next) == 0) {
		key = next;
		prev = &key;
		__u64 v = percpu_sum(fd, &key, buf);
		if (!v)
			continue;
		struct kvmt_stk_key k = key;
		if (k.stackid < 0)
			k.stackid = -1;
		size_t r;
		for (r = 0; r < n_rows; r++)
			if (!memcmp(&rows[r].k, &k, sizeof(k)))
				break;
		if (r == n_rows) {
			rows = grow(rows, &cap, n_rows, sizeof(*rows), 256);
			rows[n_rows].k = k;
			rows[n_rows++].n = 0;
		}
		rows[r].n += v;
	}
	for (size_t r = 0; r < n_rows; r++) {
		const struct kvmt_stk_key *k = &rows[r].k;
		if (r)
			printf(", \"");
		else
			printf("{\"type\": \"map\", \"data\": {\"@%s\": {\"", name);
		printf("%u,%u,%u,%u,", k->pid, k->g, k->h, k->probe);
		memset(ips, 0, sizeof(ips));
		if (k->stackid >= 0 && bpf_map_lookup_elem(stack_fd, &k->stackid, ips) == 0) {
			for (unsigned i = 0; i < depth && ips[i]; i++) {
				const struct ksym *s = ksym_of(ips[i]);
				if (s)
					printf("\\n    %s+%llu", s->name,
					       (unsigned long long)(ips[i] - s->addr));
				else
					printf("\\n    0x%llx", (unsigned long long)ips[i]);
			}
			printf("\\n");
		}
		printf("\": %llu", (unsigned long long)rows[r].n);
	}
	if (n_rows)
		printf("}}}\n");
	free(rows);
}

static void dump(struct kvmtrace *skel, const struct config *c, int seq)
{
	__typeof__(skel->maps) *m = &skel->maps;
	/* The order of harness/trace/program.py's RESULT_MAPS. */
	print_phases(skel, c);
	print_counter_map("markers", bpf_map__fd(m->markers), 2, 0, 0);
	print_counter_map("marker_ns", bpf_map__fd(m->marker_ns), 2, 0, 0);
	print_counter_map("gdur", bpf_map__fd(m->gdur), 2, 0, 0);
	print_counter_map("hmarks", bpf_map__fd(m->hmarks), 2, 0, 0);
	print_counter_map("hmark_ns", bpf_map__fd(m->hmark_ns), 2, 0, 0);
	print_counter_map("hdur", bpf_map__fd(m->hdur), 2, 0, 0);
	print_evt(skel, c);
	if (c->n_stacks)
		print_stacks("stk", bpf_map__fd(m->stk), bpf_map__fd(m->stackmap), c->stack_depth);
	if (c->n_rates) {
		print_stacks("stkw", bpf_map__fd(m->stkw), bpf_map__fd(m->stackmap), c->stack_depth);
		print_stacks("stkw2", bpf_map__fd(m->stkw2), bpf_map__fd(m->stackmap),
			     c->stack_depth);
	}
	print_counter_map("exits", bpf_map__fd(m->exits), 5, 0, 1);
	print_counter_map("pf", bpf_map__fd(m->pf), 5, 1, 1);
	print_counter_map("crw", bpf_map__fd(m->crw), 4, 0, 1);
	print_counter_map("getpage", bpf_map__fd(m->getpage), 4, 0, 1);
	print_lat(bpf_map__fd(m->lat));
	if (seq >= 0)
		printf("{\"type\": \"map\", \"data\": {\"@dump_done\": %d}}\n", seq);
	fflush(stdout);
}

struct dump_ctx { struct kvmtrace *skel; const struct config *c; };

static int on_dump_request(void *ctx, void *data, size_t size)
{
	struct dump_ctx *d = ctx;
	__u64 seq;
	if (size < sizeof(seq))
		return 0;
	memcpy(&seq, data, sizeof(seq));
	dump(d->skel, d->c, (int)seq);
	return 0;
}

int main(int argc, char **argv)
{
	struct config c;
	struct kvmtrace *skel;
	struct bpf_program *prog;
	int err, n_attached = 0;

	if (argc != 2)
		die("usage: kvmtrace CONFIG");
	read_config(argv[1], &c);
	setvbuf(stdout, NULL, _IOLBF, 0);
	libbpf_set_print(libbpf_print);
	nr_cpus = libbpf_num_possible_cpus();
	if (nr_cpus <= 0)
		die("cannot count possible CPUs: %s", strerror(-nr_cpus));
	signal(SIGINT, on_signal);
	signal(SIGTERM, on_signal);
	signal(SIGPIPE, SIG_IGN);

	LIBBPF_OPTS(bpf_object_open_opts, opts, .btf_custom_path = c.btf[0] ? c.btf : NULL);
	if (c.btf[0] && access(c.btf, R_OK))
		die("kernel BTF %s: %s", c.btf, strerror(errno));
	skel = kvmtrace__open_opts(&opts);
	if (!skel)
		die("cannot open the BPF object: %s", strerror(errno));

	for (unsigned i = 0; i < c.n_probes; i++) {
		if (probe_id_of(c.probes[i]) < 0 || !program_of(skel->obj, c.probes[i]))
			die("probe %s: not in this build's BPF object", c.probes[i]);
		if (!strcmp(c.probes[i], "kvm_exit"))
			skel->rodata->exit_traced = 1;
	}
	for (unsigned i = 0; i < c.n_stacks; i++) {
		int id = probe_id_of(c.stacks[i]);
		if (id < 0 || id >= KVMT_MAX_PROBES)
			die("stack %s: unknown probe", c.stacks[i]);
		skel->rodata->stack_period[id] = c.stack_rate[i]
			? KVMT_RATE_TARGET | (1000000000u + c.stack_rate[i] / 2) / c.stack_rate[i]
			: c.stack_period[i];
	}
	skel->rodata->n_targets = c.n_targets;
	for (unsigned i = 0; i < c.n_targets; i++) {
		skel->rodata->target_pid[i] = c.pid[i];
		skel->rodata->target_token[i] = c.token[i];
	}
	skel->rodata->session = c.session;
	skel->rodata->owner_pid = c.owner;
	skel->rodata->lat_exit_on = c.lat[0];
	skel->rodata->lat_pf_on = c.lat[1];
	skel->rodata->bench_stage = c.bench_stage;
	{
		struct btf *vmlinux = c.btf[0] ? btf__parse(c.btf, NULL) : btf__load_vmlinux_btf();
		int n = vmlinux ? raw_tp_args(vmlinux, "kvm_page_fault") : -1;
		/* kvm built as a module: its tracepoints are in the module's BTF. */
		if (n < 0 && vmlinux) {
			struct btf *kvm = btf__load_module_btf("kvm", vmlinux);
			if (kvm) {
				n = raw_tp_args(kvm, "kvm_page_fault");
				btf__free(kvm);
			}
		}
		skel->rodata->pf_vcpu_arg = n != 2;
		btf__free(vmlinux);
	}
	bpf_map__set_value_size(skel->maps.stackmap, c.stack_depth * sizeof(__u64));
	bpf_map__set_max_entries(skel->maps.slots, c.n_targets * KVMT_MAX_PROBES);
	if (!c.n_stacks)
		bpf_map__set_max_entries(skel->maps.stackmap, 1);
	bpf_object__for_each_program(prog, skel->obj)
		bpf_program__set_autoload(prog, wanted(&c, bpf_program__name(prog)));

	err = kvmtrace__load(skel);
	if (err)
		die("cannot load the BPF programs: %s", strerror(-err));
	bpf_object__for_each_program(prog, skel->obj) {
		if (!bpf_program__autoload(prog))
			continue;
		struct bpf_link *link = bpf_program__attach(prog);
		if (!link)
			die("cannot attach %s (%s): %s", bpf_program__name(prog),
			    bpf_program__section_name(prog), strerror(errno));
		n_attached++;
	}
	if (c.n_stacks)
		load_ksyms();

	struct dump_ctx dctx = { skel, &c };
	struct ring_buffer *rb = ring_buffer__new(bpf_map__fd(skel->maps.dumpreq),
						  on_dump_request, &dctx, NULL);
	if (!rb)
		die("cannot open the dump-request ring buffer: %s", strerror(errno));

	printf("{\"type\": \"attached_probes\", \"data\": {\"probes\": %d}}\n", n_attached);
	printf("{\"type\": \"printf\", \"data\": \"%s %u\\n\"}\n", READY_MESSAGE, c.session);
	fflush(stdout);
	while (!stop) {
		err = ring_buffer__poll(rb, 200);
		if (err < 0 && err != -EINTR)
			die("ring buffer poll: %s", strerror(-err));
		if (ferror(stdout))
			break;
	}
	/* Like bpftrace at exit: every map once more. */
	dump(skel, &c, -1);
	ring_buffer__free(rb);
	kvmtrace__destroy(skel);
	return 0;
}
