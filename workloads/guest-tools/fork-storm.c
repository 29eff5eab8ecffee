/*
 * fork-storm --procs N [--parallel P] [--touch-kib K]
 *
 * Creates N short-lived processes, at most P at a time (default 1): each
 * child writes K KiB (default 64) of its parent's private memory (copy-on-
 * write faults in a fresh address space) and exits; the parent reaps it.
 * Every process is an address space created and torn down: new page tables,
 * CR3 switches, PCID/ASID churn in the guest, and on a host without TDP,
 * shadow page tables built and zapped for each one.
 *
 * Known answer: the guest's own /proc/stat "processes" counter (forks since
 * boot) rises by at least N across the run; the line prints that delta.
 *   fork-storm procs=2000 parallel=2 touch_kib=64 seconds=1.234 procs_per_s=1620.7
 *     forks_counted=2001 failed=0
 *
 * Exit status: 0 when every child exited 0, 1 otherwise, 2 on usage.
 * Build: gcc -O2 -static -o fork-storm fork-storm.c
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static int usage(const char *why)
{
	fprintf(stderr,
		"fork-storm: %s\n"
		"usage: fork-storm --procs N [--parallel P] [--touch-kib K]\n"
		"  --procs N      processes to create, integer 1..10000000\n"
		"  --parallel P   at most P children alive at once, 1..1024 (default 1)\n"
		"  --touch-kib K  KiB each child writes, 0..1048576 (default 64)\n",
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

/* Forks since boot: the "processes" line of /proc/stat. */
static unsigned long forks_since_boot(void)
{
	static char buf[1 << 16];
	int fd = open("/proc/stat", O_RDONLY);
	ssize_t n, got = 0;
	char *p;

	if (fd < 0)
		return 0;
	while ((n = read(fd, buf + got, sizeof(buf) - 1 - (size_t)got)) > 0)
		got += n;
	close(fd);
	buf[got > 0 ? got : 0] = '\0';
	p = strstr(buf, "\nprocesses ");
	return p ? strtoul(p + 11, NULL, 10) : 0;
}

int main(int argc, char **argv)
{
	long procs = 0, parallel = 1, touch_kib = 64, started = 0, alive = 0, failed = 0;
	unsigned long before, after;
	volatile char *mem;
	size_t len;
	double t0, dt;
	int status;

	for (int k = 1; k < argc; k++) {
		const char *val = k + 1 < argc ? argv[k + 1] : NULL;

		if (strcmp(argv[k], "--procs") == 0 && parse(val, 1, 10000000, &procs) == 0)
			k++;
		else if (strcmp(argv[k], "--parallel") == 0 && parse(val, 1, 1024, &parallel) == 0)
			k++;
		else if (strcmp(argv[k], "--touch-kib") == 0 && parse(val, 0, 1048576, &touch_kib) == 0)
			k++;
		else
			return usage("bad or unknown argument");
	}
	if (procs == 0)
		return usage("--procs is required");
	len = (size_t)touch_kib << 10;
	mem = malloc(len + 1);
	if (mem == NULL)
		return 1;
	for (size_t i = 0; i < len; i += 4096)
		mem[i] = 1; /* resident in the parent, so children copy on write */
	before = forks_since_boot();
	t0 = now();
	while (started < procs || alive > 0) {
		if (started < procs && alive < parallel) {
			pid_t pid = fork();

			if (pid == 0) {
				for (size_t i = 0; i < len; i += 4096)
					mem[i] = 2;
				_exit(0);
			}
			if (pid < 0) {
				failed++;
				procs = started; /* out of processes: reap and report */
				continue;
			}
			started++;
			alive++;
			continue;
		}
		if (wait(&status) > 0) {
			alive--;
			if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
				failed++;
		}
	}
	dt = now() - t0;
	after = forks_since_boot();
	printf("fork-storm procs=%ld parallel=%ld touch_kib=%ld seconds=%.6f procs_per_s=%.1f "
	       "forks_counted=%lu failed=%ld\n",
	       started, parallel, touch_kib, dt, dt > 0 ? (double)started / dt : 0.0, after - before,
	       failed);
	return failed ? 1 : 0;
}
