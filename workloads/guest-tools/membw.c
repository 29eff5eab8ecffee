/*
 * membw --mib N [--times T]
 *
 * STREAM-style memory bandwidth (after McCalpin's STREAM, written here):
 * three arrays of doubles, N MiB each, and the four kernels
 *   copy  c = a          scale b = 3c          add  c = a + b     triad a = b + 3c
 * each run T times (default 5); the best time of runs 2..T gives MB/s
 * (10^6 bytes/s, STREAM's unit) with STREAM's byte counts: 2 arrays moved
 * by copy and scale, 3 by add and triad. The arrays are first-touched before
 * run 1, and run 1 is a warm-up.
 *
 * Output, one line per kernel, then a validation line:
 *   membw kernel=copy mib=64 bytes=134217728 best_s=0.012345 mb_per_s=10872.1
 *   membw check=ok a=... expected_a=...
 * The check recomputes the arrays' final values in closed form (every
 * element is equal) and compares: the kernels did the work they claim.
 *
 * Exit status: 0 on success, 1 on a failed check or allocation, 2 on usage.
 * Build: gcc -O2 -static -o membw membw.c
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int usage(const char *why)
{
	fprintf(stderr,
		"membw: %s\n"
		"usage: membw --mib N [--times T]\n"
		"  --mib N    MiB per array (three arrays), integer 1..65536\n"
		"  --times T  runs of each kernel, integer 2..1000 (default 5)\n",
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

static double rel_err(double got, double want)
{
	double d = got - want;

	return (d < 0 ? -d : d) / (want < 0 ? -want : want);
}

int main(int argc, char **argv)
{
	static const char *names[4] = { "copy", "scale", "add", "triad" };
	static const double moved[4] = { 2, 2, 3, 3 };
	long mib = 0, times = 5;
	double best[4] = { 1e30, 1e30, 1e30, 1e30 };
	double *a, *b, *c, scalar = 3.0, ea = 1.0, eb = 2.0, ec = 0.0;
	size_t n, i;

	for (int k = 1; k < argc; k++) {
		const char *val = k + 1 < argc ? argv[k + 1] : NULL;

		if (strcmp(argv[k], "--mib") == 0 && parse(val, 1, 65536, &mib) == 0)
			k++;
		else if (strcmp(argv[k], "--times") == 0 && parse(val, 2, 1000, &times) == 0)
			k++;
		else
			return usage("bad or unknown argument");
	}
	if (mib == 0)
		return usage("--mib is required");
	n = ((size_t)mib << 20) / sizeof(double);
	a = malloc(n * sizeof(double));
	b = malloc(n * sizeof(double));
	c = malloc(n * sizeof(double));
	if (a == NULL || b == NULL || c == NULL) {
		fprintf(stderr, "membw: cannot allocate 3 x %ld MiB\n", mib);
		return 1;
	}
	for (i = 0; i < n; i++) {
		a[i] = 1.0;
		b[i] = 2.0;
		c[i] = 0.0;
	}
	for (long t = 0; t < times; t++) {
		double t0, dt[4];

		t0 = now();
		for (i = 0; i < n; i++)
			c[i] = a[i];
		dt[0] = now() - t0;
		t0 = now();
		for (i = 0; i < n; i++)
			b[i] = scalar * c[i];
		dt[1] = now() - t0;
		t0 = now();
		for (i = 0; i < n; i++)
			c[i] = a[i] + b[i];
		dt[2] = now() - t0;
		t0 = now();
		for (i = 0; i < n; i++)
			a[i] = b[i] + scalar * c[i];
		dt[3] = now() - t0;
		/* The same recurrence on one element: the expected final values. */
		ec = ea;
		eb = scalar * ec;
		ec = ea + eb;
		ea = eb + scalar * ec;
		for (int k = 0; k < 4 && t > 0; k++)
			best[k] = dt[k] < best[k] ? dt[k] : best[k];
	}
	for (int k = 0; k < 4; k++) {
		double bytes = moved[k] * (double)n * sizeof(double);

		printf("membw kernel=%s mib=%ld bytes=%.0f best_s=%.6f mb_per_s=%.1f\n", names[k], mib,
		       bytes, best[k], best[k] > 0 ? bytes / best[k] / 1e6 : 0.0);
	}
	for (i = 0; i < n; i += n / 1024 + 1) {
		if (rel_err(a[i], ea) > 1e-13 || rel_err(b[i], eb) > 1e-13 ||
		    rel_err(c[i], ec) > 1e-13) {
			printf("membw check=failed index=%zu a=%.17g b=%.17g c=%.17g expected_a=%.17g\n",
			       i, a[i], b[i], c[i], ea);
			return 1;
		}
	}
	printf("membw check=ok elements=%zu a=%.17g expected_a=%.17g\n", n, a[0], ea);
	return 0;
}
