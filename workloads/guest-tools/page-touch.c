/*
 * page-touch --mib N [--passes P] [--thp system|never|always]
 *            [--backing anon|tmpfs|hugetlbfs] [--hold DIR]
 * page-touch --resume DIR
 *
 * Maps N MiB and writes one byte in every 4 KiB page, P times (default 2).
 * Pass 1 is the first touch: every page faults in the guest (and, on a host
 * with TDP, causes EPT violations / NPFs as the host backs guest memory).
 * Passes 2..P retouch memory that is already mapped, the baseline against
 * which the first-touch cost is read.
 *
 * --backing: anon (private anonymous, default), tmpfs (a shared memfd, i.e.
 * shmem: one fault per 4 KiB page), hugetlbfs (a MFD_HUGETLB memfd: one fault
 * per 2 MiB page; vm.nr_hugepages is raised as needed, so run as root).
 * --thp: "system" leaves the kernel's transparent huge page policy alone;
 * "never"/"always" apply MADV_NOHUGEPAGE/MADV_HUGEPAGE to an anon mapping,
 * which is 2 MiB aligned so that "always" gives exactly N/2 huge pages.
 *
 * Every pass line carries the guest's own /proc/vmstat deltas across the
 * pass (pgfault, thp_fault_alloc, thp_fault_fallback) and the hugetlb pages
 * in use after it (/proc/meminfo), so the known answer (N*256 faults for
 * 4 KiB pages, N/2 for 2 MiB pages, about 0 on retouch) can be checked.
 * pgfault counts every process of the guest; minflt is this process's own
 * minor faults in the pass (getrusage), free of that noise:
 *   page-touch pass=1 kind=first-touch mib=256 pages=65536 seconds=0.123456
 *     mib_per_s=2074.51 pgfault=65540 thp_fault_alloc=0 thp_fault_fallback=0 huge_used=0
 *     minflt=65536
 *
 * --hold DIR splits first touch and retouch into two commands (two harness
 * phases): after pass 1 the memory is kept by a detached process, and
 * `page-touch --resume DIR` makes it run passes 2..P, prints their lines
 * and ends it. A holder nobody resumes exits after 10 minutes; a new --hold
 * on the same DIR takes the directory over.
 *
 * Exit status: 0 on success, 1 on a runtime failure, 2 on a usage error.
 * Build: gcc -O2 -static -o page-touch page-touch.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
#define HUGE (2UL << 20)
#define MAX_MIB (1UL << 22) /* 4 TiB: far above any guest, keeps sizes in range */
#define HOLD_TIMEOUT_S 600

static int usage(const char *why)
{
	fprintf(stderr,
		"page-touch: %s\n"
		"usage: page-touch --mib N [--passes P] [--thp system|never|always]\n"
		"                  [--backing anon|tmpfs|hugetlbfs] [--hold DIR]\n"
		"       page-touch --resume DIR\n"
		"  --mib N      MiB to map and touch, integer 1..%lu (even for hugetlbfs)\n"
		"  --passes P   passes over the memory, integer >= 1 (default 2);\n"
		"               pass 1 is first-touch, later passes retouch\n"
		"  --thp MODE   system (default: leave THP policy alone), never, always\n"
		"  --backing B  anon (default), tmpfs (shared memfd), hugetlbfs (2 MiB pages)\n"
		"  --hold DIR   after pass 1 keep the memory in a detached process\n"
		"  --resume DIR run the held memory's remaining passes and end it\n",
		why, MAX_MIB);
	return 2;
}

static int parse_ulong(const char *s, unsigned long lo, unsigned long hi, unsigned long *out)
{
	char *end;
	unsigned long v;

	if (s == NULL || s[0] < '0' || s[0] > '9')
		return -1;
	errno = 0;
	v = strtoul(s, &end, 10);
	if (errno != 0 || *end != '\0' || v < lo || v > hi)
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

/* Read a whole small /proc file into buf (static: reading must not fault pages in). */
static char procbuf[1 << 16];

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

/* Value of "name value" / "name: value" in text; 0 when absent. */
static unsigned long field(const char *text, const char *name)
{
	size_t len = strlen(name);
	const char *p = text;

	while ((p = strstr(p, name)) != NULL) {
		if ((p == text || p[-1] == '\n') && (p[len] == ' ' || p[len] == ':')) {
			p += len + 1;
			while (*p == ' ')
				p++;
			return strtoul(p, NULL, 10);
		}
		p += len;
	}
	return 0;
}

struct counters {
	unsigned long pgfault, thp_alloc, thp_fallback;
};

static void read_counters(struct counters *c)
{
	const char *v = slurp("/proc/vmstat");

	c->pgfault = field(v, "pgfault");
	c->thp_alloc = field(v, "thp_fault_alloc");
	c->thp_fallback = field(v, "thp_fault_fallback");
}

static unsigned long huge_used(void)
{
	const char *m = slurp("/proc/meminfo");

	return field(m, "HugePages_Total") - field(m, "HugePages_Free");
}

static unsigned long mib, passes = 2, pages;
static volatile unsigned char *mem;

static long minor_faults(void)
{
	struct rusage ru;

	getrusage(RUSAGE_SELF, &ru);
	return ru.ru_minflt;
}

static void touch_pass(unsigned long pass)
{
	struct counters before, after;
	long minflt;
	double t0, dt;
	unsigned long i;

	read_counters(&before);
	minflt = minor_faults();
	t0 = now();
	/* volatile stores: each one must reach memory, one per 4 KiB page. */
	for (i = 0; i < pages; i++)
		mem[i * PAGE] = (unsigned char)pass;
	dt = now() - t0;
	minflt = minor_faults() - minflt;
	read_counters(&after);
	printf("page-touch pass=%lu kind=%s mib=%lu pages=%lu seconds=%.6f mib_per_s=%.2f "
	       "pgfault=%lu thp_fault_alloc=%lu thp_fault_fallback=%lu huge_used=%lu minflt=%ld\n",
	       pass, pass == 1 ? "first-touch" : "retouch", mib, pages, dt,
	       dt > 0 ? (double)mib / dt : 0.0, after.pgfault - before.pgfault,
	       after.thp_alloc - before.thp_alloc, after.thp_fallback - before.thp_fallback,
	       huge_used(), minflt);
	fflush(stdout);
}

/* Make sure `need` 2 MiB hugetlb pages are free, raising vm.nr_hugepages. */
static int reserve_huge(unsigned long need)
{
	const char *m = slurp("/proc/meminfo");
	unsigned long total = field(m, "HugePages_Total"), free_ = field(m, "HugePages_Free");
	char text[32];
	int fd, len;

	if (free_ >= need)
		return 0;
	len = snprintf(text, sizeof(text), "%lu\n", total + need - free_);
	fd = open("/proc/sys/vm/nr_hugepages", O_WRONLY);
	if (fd < 0 || write(fd, text, (size_t)len) != len) {
		if (fd >= 0)
			close(fd);
		return -1;
	}
	close(fd);
	return field(slurp("/proc/meminfo"), "HugePages_Free") >= need ? 0 : -1;
}

static void *map_memory(const char *backing, const char *thp, size_t len)
{
	void *p;

	if (strcmp(backing, "anon") == 0) {
		/* Over-map and trim so the region is 2 MiB aligned (huge pages fit exactly). */
		size_t extra = HUGE;
		uintptr_t a, aligned;

		p = mmap(NULL, len + extra, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (p == MAP_FAILED)
			return p;
		a = (uintptr_t)p;
		aligned = (a + HUGE - 1) & ~(HUGE - 1);
		if (aligned > a)
			munmap(p, aligned - a);
		if (aligned + len < a + len + extra)
			munmap((void *)(aligned + len), a + len + extra - (aligned + len));
		p = (void *)aligned;
		if (strcmp(thp, "system") != 0 &&
		    madvise(p, len, strcmp(thp, "never") == 0 ? MADV_NOHUGEPAGE : MADV_HUGEPAGE) != 0) {
			fprintf(stderr, "page-touch: madvise(--thp %s) failed: %s\n", thp,
				strerror(errno));
			return MAP_FAILED;
		}
		return p;
	}
	int huge = strcmp(backing, "hugetlbfs") == 0;
	int fd;

	if (huge && reserve_huge(len / HUGE) != 0) {
		fprintf(stderr, "page-touch: cannot reserve %zu hugetlb pages (vm.nr_hugepages)\n",
			len / HUGE);
		return MAP_FAILED;
	}
	fd = memfd_create("page-touch", huge ? MFD_HUGETLB : 0);
	if (fd < 0 || ftruncate(fd, (off_t)len) != 0) {
		fprintf(stderr, "page-touch: memfd of %zu bytes failed: %s\n", len, strerror(errno));
		return MAP_FAILED;
	}
	p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	close(fd);
	return p;
}

static int path_in(char *out, size_t size, const char *dir, const char *name)
{
	return snprintf(out, size, "%s/%s", dir, name) < (int)size ? 0 : -1;
}

/* Ask the holder in `dir` to run its remaining passes; copy its output. */
static int resume(const char *dir)
{
	char ctl[4096], out[4096], buf[4096];
	int fd, seen = 0;
	ssize_t n;

	if (path_in(ctl, sizeof(ctl), dir, "ctl") || path_in(out, sizeof(out), dir, "out"))
		return usage("--resume path too long");
	/* ENXIO: the holder has not reached its open() yet (it just printed pass 1). */
	for (int tries = 0; (fd = open(ctl, O_WRONLY | O_NONBLOCK)) < 0 && errno == ENXIO &&
			    tries < 100; tries++)
		usleep(50000);
	if (fd < 0) {
		fprintf(stderr, "page-touch: no holder waiting in %s: %s\n", dir, strerror(errno));
		return 1;
	}
	if (write(fd, "go\n", 3) != 3) {
		fprintf(stderr, "page-touch: cannot signal the holder: %s\n", strerror(errno));
		return 1;
	}
	close(fd);
	fd = open(out, O_RDONLY);
	if (fd < 0) {
		fprintf(stderr, "page-touch: cannot read %s: %s\n", out, strerror(errno));
		return 1;
	}
	while ((n = read(fd, buf, sizeof(buf))) > 0) {
		fwrite(buf, 1, (size_t)n, stdout);
		seen = seen || memmem(buf, (size_t)n, "pass=", 5) != NULL;
	}
	close(fd);
	unlink(ctl);
	unlink(out);
	rmdir(dir);
	if (!seen) {
		fprintf(stderr, "page-touch: the holder printed no pass\n");
		return 1;
	}
	return 0;
}

/* Fork a detached holder that runs pass 1 and waits; print its pass-1 line. */
static int hold(const char *dir, const char *backing, const char *thp, size_t len)
{
	char ctl[4096], out[4096], buf[4096];
	int pipefd[2], devnull, fd, seen = 0;
	unsigned long pass;
	ssize_t n;
	pid_t pid;
	void *p;

	if (path_in(ctl, sizeof(ctl), dir, "ctl") || path_in(out, sizeof(out), dir, "out"))
		return usage("--hold path too long");
	/* A directory left by a holder nobody resumed (a failed run): take it over. */
	unlink(ctl);
	unlink(out);
	rmdir(dir);
	if (mkdir(dir, 0700) != 0 || mkfifo(ctl, 0600) != 0 || mkfifo(out, 0600) != 0) {
		fprintf(stderr, "page-touch: cannot make %s : %s\n", dir,
			strerror(errno));
		return 1;
	}
	if (pipe(pipefd) != 0)
		return 1;
	fflush(stdout);
	pid = fork();
	if (pid < 0)
		return 1;
	if (pid > 0) {
		/* Parent: relay pass 1, then leave; the holder is not our child to wait on. */
		close(pipefd[1]);
		while ((n = read(pipefd[0], buf, sizeof(buf))) > 0) {
			fwrite(buf, 1, (size_t)n, stdout);
			seen = seen || memmem(buf, (size_t)n, "pass=1", 6) != NULL;
		}
		return seen ? 0 : 1;
	}
	/* Holder: off the SSH session's fds, so the phase command can end. */
	setsid();
	devnull = open("/dev/null", O_RDWR);
	dup2(devnull, 0);
	dup2(pipefd[1], 1);
	dup2(pipefd[1], 2);
	close(pipefd[0]);
	close(pipefd[1]);
	p = map_memory(backing, thp, len);
	if (p == MAP_FAILED)
		_exit(1);
	mem = p;
	touch_pass(1);
	dup2(devnull, 1);
	dup2(devnull, 2);
	alarm(HOLD_TIMEOUT_S);
	fd = open(ctl, O_RDONLY); /* blocks until --resume opens it */
	if (fd < 0 || read(fd, buf, sizeof(buf)) <= 0)
		_exit(1);
	close(fd);
	fd = open(out, O_WRONLY);
	if (fd < 0)
		_exit(1);
	alarm(0);
	dup2(fd, 1);
	close(fd);
	for (pass = 2; pass <= passes; pass++)
		touch_pass(pass);
	_exit(0);
}

int main(int argc, char **argv)
{
	const char *thp = "system", *backing = "anon", *hold_dir = NULL;
	unsigned long pass;
	size_t len;
	void *p;

	for (int a = 1; a < argc; a++) {
		const char *arg = argv[a];
		const char *val = (a + 1 < argc) ? argv[a + 1] : NULL;

		if (strcmp(arg, "--mib") == 0) {
			if (parse_ulong(val, 1, MAX_MIB, &mib) != 0)
				return usage("--mib needs an integer in range");
			a++;
		} else if (strcmp(arg, "--passes") == 0) {
			if (parse_ulong(val, 1, 1000000, &passes) != 0)
				return usage("--passes needs an integer >= 1");
			a++;
		} else if (strcmp(arg, "--thp") == 0) {
			if (val == NULL || (strcmp(val, "system") != 0 && strcmp(val, "never") != 0 &&
					    strcmp(val, "always") != 0))
				return usage("--thp needs one of system, never, always");
			thp = val;
			a++;
		} else if (strcmp(arg, "--backing") == 0) {
			if (val == NULL || (strcmp(val, "anon") != 0 && strcmp(val, "tmpfs") != 0 &&
					    strcmp(val, "hugetlbfs") != 0))
				return usage("--backing needs one of anon, tmpfs, hugetlbfs");
			backing = val;
			a++;
		} else if (strcmp(arg, "--hold") == 0) {
			if (val == NULL)
				return usage("--hold needs a directory");
			hold_dir = val;
			a++;
		} else if (strcmp(arg, "--resume") == 0) {
			if (val == NULL)
				return usage("--resume needs a directory");
			return resume(val);
		} else {
			return usage("unknown argument");
		}
	}
	if (mib == 0)
		return usage("--mib is required");
	if (strcmp(backing, "hugetlbfs") == 0 && mib % 2 != 0)
		return usage("--backing hugetlbfs needs an even --mib (2 MiB pages)");

	len = (size_t)mib << 20;
	pages = len / PAGE;
	if (hold_dir != NULL)
		return hold(hold_dir, backing, thp, len);
	p = map_memory(backing, thp, len);
	if (p == MAP_FAILED) {
		fprintf(stderr, "page-touch: mmap of %lu MiB failed (%s backing): %s\n", mib, backing,
			strerror(errno));
		return 1;
	}
	mem = p;
	for (pass = 1; pass <= passes; pass++)
		touch_pass(pass);
	munmap(p, len);
	return 0;
}
