/*
 * mmap-churn --threads T --iterations I [--kib K]
 *
 * T threads of one process, each looping I times over: mmap K KiB (default
 * 64) of anonymous memory, write every page, mprotect it read-only, munmap
 * it. All threads share one address space, so each mprotect and munmap of
 * touched pages must flush the other CPUs' TLBs (shootdown IPIs between the
 * guest's vCPUs). The guest's page-table writes and flushes stay inside the
 * guest with EPT/NPT; on a shadow-paging host each one is trapped. (A guest
 * munmap does not unmap host memory, so it causes no host MMU-notifier
 * invalidation: the freed guest pages stay backed.)
 *
 * Known answer: ops = 3 * T * I system calls (mmap, mprotect, munmap), all
 * of which must succeed, and the guest's own /proc/vmstat pgfault rises by
 * at least T * I * K/4 (one write fault per 4 KiB page of each mapping).
 *   mmap-churn threads=2 iterations=1000 kib=64 ops=6000 seconds=0.5
 *     ops_per_s=12000.0 pgfault=32017 expected_faults=32000 tlb_shootdowns=123
 *
 * tlb_shootdowns is the rise of the TLB line of /proc/interrupts (all CPUs).
 * Exit status: 0 on success, 1 when a call failed, 2 on usage.
 * Build: gcc -O2 -static -o mmap-churn mmap-churn.c
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static long threads, iterations, kib = 64;
static long failures;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static int usage(const char *why)
{
	fprintf(stderr,
		"mmap-churn: %s\n"
		"usage: mmap-churn --threads T --iterations I [--kib K]\n"
		"  --threads T     threads sharing the address space, 1..256\n"
		"  --iterations I  map/touch/protect/unmap loops per thread, 1..100000000\n"
		"  --kib K         KiB per mapping, a multiple of 4 in 4..1048576 (default 64)\n",
		why);
	return 2;
}

static int parse(const char *s, long lo, long hi, long *out)
{
	char *end;
	long v;

	if (s == NULL)
		return -1;
	errno = 0;
	v = strtol(s, &end, 10);
	if (errno != 0 || *end != '\0' || end == s || v < lo || v > hi)
		return -1;
	*out = v;
	return 0;
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static char procbuf[1 << 17];

static const char *slurp(const char *path)
{
	int fd = open(path, O_RDONLY);
	ssize_t n, got = 0;

	procbuf[0] = '\0';
	if (fd < 0)
		return procbuf;
	while ((n = read(fd, procbuf + got, sizeof(procbuf) - 1 - (size_t)got)) > 0)
		got += n;
	close(fd);
	procbuf[got > 0 ? got : 0] = '\0';
	return procbuf;
}

static unsigned long pgfault(void)
{
	const char *p = strstr(slurp("/proc/vmstat"), "\npgfault ");

	return p ? strtoul(p + 9, NULL, 10) : 0;
}

/* Sum of the per-CPU counts on the "TLB:" line of /proc/interrupts (x86). */
static unsigned long tlb_shootdowns(void)
{
	const char *p = strstr(slurp("/proc/interrupts"), "TLB:");
	unsigned long sum = 0;
	char *end;

	if (p == NULL)
		return 0;
	p += 4;
	for (;;) {
		unsigned long v = strtoul(p, &end, 10);

		if (end == p)
			break;
		sum += v;
		p = end;
	}
	return sum;
}

static void *churn(void *arg)
{
	size_t len = (size_t)kib << 10;
	long bad = 0;

	(void)arg;
	for (long i = 0; i < iterations; i++) {
		volatile char *p = mmap(NULL, len, PROT_READ | PROT_WRITE,
					MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

		if (p == MAP_FAILED) {
			bad++;
			continue;
		}
		for (size_t off = 0; off < len; off += 4096)
			p[off] = (char)i;
		if (mprotect((void *)p, len, PROT_READ) != 0)
			bad++;
		if (munmap((void *)p, len) != 0)
			bad++;
	}
	pthread_mutex_lock(&lock);
	failures += bad;
	pthread_mutex_unlock(&lock);
	return NULL;
}

int main(int argc, char **argv)
{
	pthread_t tid[256];
	unsigned long f0, f1, s0, s1;
	double t0, dt;
	long ops;

	for (int k = 1; k < argc; k++) {
		const char *val = k + 1 < argc ? argv[k + 1] : NULL;

		if (strcmp(argv[k], "--threads") == 0 && parse(val, 1, 256, &threads) == 0)
			k++;
		else if (strcmp(argv[k], "--iterations") == 0 &&
			 parse(val, 1, 100000000, &iterations) == 0)
			k++;
		else if (strcmp(argv[k], "--kib") == 0 && parse(val, 4, 1048576, &kib) == 0 &&
			 kib % 4 == 0)
			k++;
		else
			return usage("bad or unknown argument");
	}
	if (threads == 0 || iterations == 0)
		return usage("--threads and --iterations are required");
	f0 = pgfault();
	s0 = tlb_shootdowns();
	t0 = now();
	for (long t = 0; t < threads; t++)
		if (pthread_create(&tid[t], NULL, churn, NULL) != 0) {
			fprintf(stderr, "mmap-churn: cannot start thread %ld\n", t);
			return 1;
		}
	for (long t = 0; t < threads; t++)
		pthread_join(tid[t], NULL);
	dt = now() - t0;
	f1 = pgfault();
	s1 = tlb_shootdowns();
	ops = 3 * threads * iterations;
	printf("mmap-churn threads=%ld iterations=%ld kib=%ld ops=%ld seconds=%.6f ops_per_s=%.1f "
	       "pgfault=%lu expected_faults=%ld tlb_shootdowns=%lu failed=%ld\n",
	       threads, iterations, kib, ops, dt, dt > 0 ? (double)ops / dt : 0.0, f1 - f0,
	       threads * iterations * (kib / 4), s1 - s0, failures);
	return failures ? 1 : 0;
}
