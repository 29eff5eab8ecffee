/*
 * page-touch-win --mib N [--passes P] [--pages small|large]
 *
 * The Windows page-touch: VirtualAlloc(MEM_RESERVE | MEM_COMMIT) N MiB and
 * write one byte in every 4 KiB page, P times (default 2). Pass 1 is the
 * first touch: every page demand-faults (a zero page from the guest kernel,
 * and on a TDP host an EPT violation / NPF as the host backs it). Passes
 * 2..P retouch resident pages: the baseline. --pages large asks for MEM_LARGE_PAGES
 * (2 MiB pages, committed at allocation: needs SeLockMemoryPrivilege).
 *
 * One line per pass, in the Linux page-touch's style; "faults" is this
 * process's PageFaultCount delta across the pass (GetProcessMemoryInfo):
 *   page-touch-win pass=1 kind=first-touch mib=256 pages=65536 bytes=268435456
 *     seconds=0.123456 mib_per_s=2074.51 faults=65536
 *
 * Exit status: 0 on success, 1 on a runtime failure, 2 on a usage error.
 * Build: x86_64-w64-mingw32-gcc -O2 -static -o page-touch-win.exe page-touch-win.c -lpsapi
 */
#include <windows.h>
#include <psapi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PAGE 4096ULL
#define MAX_MIB (1ULL << 22)

static int usage(const char *why)
{
	fprintf(stderr, "page-touch-win: %s\n"
		"usage: page-touch-win --mib N [--passes P] [--pages small|large]\n", why);
	return 2;
}

static int parse(const char *s, unsigned long long lo, unsigned long long hi,
		 unsigned long long *out)
{
	char *end;
	unsigned long long v;

	if (s == NULL || s[0] < '0' || s[0] > '9')
		return -1;
	v = strtoull(s, &end, 10);
	if (*end != '\0' || v < lo || v > hi)
		return -1;
	*out = v;
	return 0;
}

static unsigned long long faults(void)
{
	PROCESS_MEMORY_COUNTERS c;

	if (!GetProcessMemoryInfo(GetCurrentProcess(), &c, sizeof(c)))
		return 0;
	return c.PageFaultCount;
}

static int enable_lock_memory(void)
{
	HANDLE token;
	TOKEN_PRIVILEGES tp;
	int ok;

	if (!OpenProcessToken(GetCurrentProcess(), TOKEN_ADJUST_PRIVILEGES | TOKEN_QUERY, &token))
		return 0;
	tp.PrivilegeCount = 1;
	tp.Privileges[0].Attributes = SE_PRIVILEGE_ENABLED;
	ok = LookupPrivilegeValueA(NULL, "SeLockMemoryPrivilege", &tp.Privileges[0].Luid) &&
	     AdjustTokenPrivileges(token, FALSE, &tp, 0, NULL, NULL) &&
	     GetLastError() == ERROR_SUCCESS;
	CloseHandle(token);
	return ok;
}

int main(int argc, char **argv)
{
	unsigned long long mib = 0, passes = 2, pages, p, pass, f0;
	int large = 0, i;
	LARGE_INTEGER freq, t0, t1;
	volatile unsigned char *mem;
	DWORD flags = MEM_RESERVE | MEM_COMMIT;

	for (i = 1; i < argc; i++) {
		if (strcmp(argv[i], "--mib") == 0 && i + 1 < argc) {
			if (parse(argv[++i], 1, MAX_MIB, &mib))
				return usage("--mib wants an integer 1..4194304");
		} else if (strcmp(argv[i], "--passes") == 0 && i + 1 < argc) {
			if (parse(argv[++i], 1, 1000000, &passes))
				return usage("--passes wants an integer >= 1");
		} else if (strcmp(argv[i], "--pages") == 0 && i + 1 < argc) {
			i++;
			if (strcmp(argv[i], "large") == 0)
				large = 1;
			else if (strcmp(argv[i], "small") != 0)
				return usage("--pages wants small or large");
		} else {
			return usage("unknown argument");
		}
	}
	if (mib == 0)
		return usage("--mib is required");
	if (large) {
		SIZE_T lp = GetLargePageMinimum();

		if (lp == 0 || !enable_lock_memory()) {
			fprintf(stderr, "page-touch-win: large pages need SeLockMemoryPrivilege "
				"(Local Security Policy: Lock pages in memory) and a CPU with them\n");
			return 1;
		}
		if ((mib << 20) % lp != 0)
			return usage("--pages large wants --mib a multiple of the large page size");
		flags |= MEM_LARGE_PAGES;
	}
	mem = VirtualAlloc(NULL, (SIZE_T)(mib << 20), flags, PAGE_READWRITE);
	if (mem == NULL) {
		fprintf(stderr, "page-touch-win: VirtualAlloc of %llu MiB failed (error %lu)\n", mib,
			GetLastError());
		return 1;
	}
	pages = (mib << 20) / PAGE;
	QueryPerformanceFrequency(&freq);
	for (pass = 1; pass <= passes; pass++) {
		unsigned long long touched = 0;
		double s;

		f0 = faults();
		QueryPerformanceCounter(&t0);
		for (p = 0; p < pages; p++) {
			mem[p * PAGE] = (unsigned char)(pass + p);
			touched += PAGE;
		}
		QueryPerformanceCounter(&t1);
		s = (double)(t1.QuadPart - t0.QuadPart) / (double)freq.QuadPart;
		printf("page-touch-win pass=%llu kind=%s mib=%llu pages=%llu bytes=%llu seconds=%.6f "
		       "mib_per_s=%.2f faults=%llu\n",
		       pass, pass == 1 ? "first-touch" : "retouch", mib, pages, touched, s,
		       s > 0 ? (double)mib / s : 0.0, faults() - f0);
		fflush(stdout);
	}
	VirtualFree((void *)mem, 0, MEM_RELEASE);
	return 0;
}
