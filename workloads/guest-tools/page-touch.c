/*
 * page-touch --mib N [--passes P] [--thp system|never|always]
 *
 * Maps N MiB of anonymous private memory and writes one byte in every 4 KiB
 * page, P times (default 2). Pass 1 is the first touch: every page faults in
 * the guest (and, on a host with TDP, causes EPT violations / NPFs as the host
 * backs guest memory). Passes 2..P retouch memory that is already mapped, the
 * baseline against which the first-touch cost is read.
 *
 * One line per pass on stdout, e.g.
 *   page-touch pass=1 kind=first-touch mib=256 pages=65536 seconds=0.123456 mib_per_s=2074.51
 *
 * --thp: "system" leaves the kernel's transparent huge page policy alone;
 * "never"/"always" apply MADV_NOHUGEPAGE/MADV_HUGEPAGE to the mapping, so a
 * workload can ask for one fault per 4 KiB page (never) whatever the guest's
 * default is.
 *
 * Exit status: 0 on success, 1 on a runtime failure (mmap), 2 on a usage error.
 * Build: gcc -O2 -static -o page-touch page-touch.c
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#define PAGE 4096UL
#define MAX_MIB (1UL << 22) /* 4 TiB: far above any guest, keeps sizes in range */

static int usage(const char *why)
{
	fprintf(stderr,
		"page-touch: %s\n"
		"usage: page-touch --mib N [--passes P] [--thp system|never|always]\n"
		"  --mib N      MiB to map and touch, integer 1..%lu\n"
		"  --passes P   passes over the memory, integer >= 1 (default 2);\n"
		"               pass 1 is first-touch, later passes retouch\n"
		"  --thp MODE   system (default: leave THP policy alone), never, always\n",
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

int main(int argc, char **argv)
{
	unsigned long mib = 0, passes = 2, pages, pass, i;
	const char *thp = "system";
	volatile unsigned char *mem;
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
		} else {
			return usage("unknown argument");
		}
	}
	if (mib == 0)
		return usage("--mib is required");

	len = (size_t)mib << 20;
	pages = len / PAGE;
	p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED) {
		fprintf(stderr, "page-touch: mmap of %lu MiB failed: %s\n", mib, strerror(errno));
		return 1;
	}
	if (strcmp(thp, "system") != 0 &&
	    madvise(p, len, strcmp(thp, "never") == 0 ? MADV_NOHUGEPAGE : MADV_HUGEPAGE) != 0) {
		fprintf(stderr, "page-touch: madvise(--thp %s) failed: %s\n", thp, strerror(errno));
		munmap(p, len);
		return 1;
	}
	mem = p;

	for (pass = 1; pass <= passes; pass++) {
		double t0, dt;

		t0 = now();
		/* volatile stores: each one must reach memory, one per 4 KiB page. */
		for (i = 0; i < pages; i++)
			mem[i * PAGE] = (unsigned char)pass;
		dt = now() - t0;
		printf("page-touch pass=%lu kind=%s mib=%lu pages=%lu seconds=%.6f mib_per_s=%.2f\n", pass,
		       pass == 1 ? "first-touch" : "retouch", mib, pages, dt,
		       dt > 0 ? (double)mib / dt : 0.0);
		fflush(stdout);
	}
	munmap(p, len);
	return 0;
}
