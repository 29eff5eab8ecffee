/*
 * membw-win --mib N [--times T]
 *
 * The Windows membw: STREAM-style copy, scale, add and triad over three
 * arrays of N MiB (VirtualAlloc'd, touched once before timing), each kernel
 * run T times (default 5), the best of runs 2..T reported, then every element
 * checked against the closed-form answer. Lines as the Linux membw prints:
 *   membw-win kernel=copy mib=64 bytes=134217728 best_s=0.012345 mb_per_s=10872.3
 *   membw-win check=ok elements=8388608 a=... expected_a=...
 *
 * Exit status: 0 on success, 1 on a runtime failure or a failed check, 2 on a usage error.
 * Build: x86_64-w64-mingw32-gcc -O2 -static -o membw-win.exe membw-win.c
 */
#include <windows.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static double now(void)
{
	static LARGE_INTEGER f;
	LARGE_INTEGER t;

	if (f.QuadPart == 0)
		QueryPerformanceFrequency(&f);
	QueryPerformanceCounter(&t);
	return (double)t.QuadPart / (double)f.QuadPart;
}

int main(int argc, char **argv)
{
	long mib = 0, times = 5, r;
	int i, k;
	size_t n, j;
	double *a, *b, *c, best[4], scalar = 3.0, ea = 1.0, eb = 2.0, ec = 0.0;
	const char *names[4] = {"copy", "scale", "add", "triad"};
	const double words[4] = {2, 2, 3, 3};

	for (i = 1; i < argc; i++) {
		if (strcmp(argv[i], "--mib") == 0 && i + 1 < argc)
			mib = strtol(argv[++i], NULL, 10);
		else if (strcmp(argv[i], "--times") == 0 && i + 1 < argc)
			times = strtol(argv[++i], NULL, 10);
		else {
			fprintf(stderr, "usage: membw-win --mib N [--times T]\n");
			return 2;
		}
	}
	if (mib < 1 || mib > 16384 || times < 2 || times > 1000) {
		fprintf(stderr, "membw-win: --mib 1..16384 and --times 2..1000\n");
		return 2;
	}
	n = (size_t)mib * 1048576 / sizeof(double);
	a = VirtualAlloc(NULL, n * sizeof(double), MEM_RESERVE | MEM_COMMIT, PAGE_READWRITE);
	b = VirtualAlloc(NULL, n * sizeof(double), MEM_RESERVE | MEM_COMMIT, PAGE_READWRITE);
	c = VirtualAlloc(NULL, n * sizeof(double), MEM_RESERVE | MEM_COMMIT, PAGE_READWRITE);
	if (a == NULL || b == NULL || c == NULL) {
		fprintf(stderr, "membw-win: cannot allocate 3 x %ld MiB\n", mib);
		return 1;
	}
	for (j = 0; j < n; j++) {
		a[j] = 1.0;
		b[j] = 2.0;
		c[j] = 0.0;
	}
	for (k = 0; k < 4; k++)
		best[k] = 1e30;
	for (r = 1; r <= times; r++) {
		double t[4];

		t[0] = now();
		for (j = 0; j < n; j++)
			c[j] = a[j];
		t[0] = now() - t[0];
		t[1] = now();
		for (j = 0; j < n; j++)
			b[j] = scalar * c[j];
		t[1] = now() - t[1];
		t[2] = now();
		for (j = 0; j < n; j++)
			c[j] = a[j] + b[j];
		t[2] = now() - t[2];
		t[3] = now();
		for (j = 0; j < n; j++)
			a[j] = b[j] + scalar * c[j];
		t[3] = now() - t[3];
		ec = ea;
		eb = scalar * ec;
		ec = ea + eb;
		ea = eb + scalar * ec;
		for (k = 0; r > 1 && k < 4; k++)
			if (t[k] < best[k])
				best[k] = t[k];
	}
	for (k = 0; k < 4; k++) {
		double bytes = words[k] * (double)n * sizeof(double);

		printf("membw-win kernel=%s mib=%ld bytes=%.0f best_s=%.6f mb_per_s=%.1f\n", names[k],
		       mib, bytes, best[k], best[k] > 0 ? bytes / best[k] / 1e6 : 0.0);
	}
	for (j = 0; j < n; j++) {
		if (a[j] != ea || b[j] != eb || c[j] != ec) {
			printf("membw-win check=failed index=%zu a=%.17g expected_a=%.17g\n", j, a[j], ea);
			return 1;
		}
	}
	printf("membw-win check=ok elements=%zu a=%.17g expected_a=%.17g\n", n, a[0], ea);
	return 0;
}
