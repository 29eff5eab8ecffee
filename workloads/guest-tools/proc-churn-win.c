/*
 * proc-churn-win --count N
 *
 * A CreateProcess/exit storm: N times, start this program again as a child
 * that exits at once, and wait for it. Each child is a new address space
 * built and torn down (page tables, a new CR3, the KVA shadow's user copy),
 * the path that makes Windows guests costly under shadow paging.
 *   proc-churn-win processes=200 seconds=1.234567 per_s=162.0
 *
 * Exit status: 0 on success, 1 on a runtime failure, 2 on a usage error.
 * Build: x86_64-w64-mingw32-gcc -O2 -static -o proc-churn-win.exe proc-churn-win.c
 */
#include <windows.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv)
{
	long count = 0, i;
	char self[MAX_PATH], cmd[MAX_PATH + 16];
	LARGE_INTEGER f, t0, t1;
	double s;

	if (argc == 2 && strcmp(argv[1], "--child") == 0)
		return 0;
	if (argc != 3 || strcmp(argv[1], "--count") != 0 ||
	    (count = strtol(argv[2], NULL, 10)) < 1 || count > 1000000) {
		fprintf(stderr, "usage: proc-churn-win --count N (1..1000000)\n");
		return 2;
	}
	if (GetModuleFileNameA(NULL, self, sizeof(self)) == 0) {
		fprintf(stderr, "proc-churn-win: GetModuleFileName failed (%lu)\n", GetLastError());
		return 1;
	}
	QueryPerformanceFrequency(&f);
	QueryPerformanceCounter(&t0);
	for (i = 0; i < count; i++) {
		STARTUPINFOA si;
		PROCESS_INFORMATION pi;
		DWORD code = 1;

		memset(&si, 0, sizeof(si));
		si.cb = sizeof(si);
		snprintf(cmd, sizeof(cmd), "\"%s\" --child", self);
		if (!CreateProcessA(self, cmd, NULL, NULL, FALSE, 0, NULL, NULL, &si, &pi)) {
			fprintf(stderr, "proc-churn-win: CreateProcess %ld failed (%lu)\n", i,
				GetLastError());
			return 1;
		}
		WaitForSingleObject(pi.hProcess, INFINITE);
		GetExitCodeProcess(pi.hProcess, &code);
		CloseHandle(pi.hThread);
		CloseHandle(pi.hProcess);
		if (code != 0) {
			fprintf(stderr, "proc-churn-win: child %ld exited %lu\n", i, code);
			return 1;
		}
	}
	QueryPerformanceCounter(&t1);
	s = (double)(t1.QuadPart - t0.QuadPart) / (double)f.QuadPart;
	printf("proc-churn-win processes=%ld seconds=%.6f per_s=%.1f\n", count, s,
	       s > 0 ? (double)count / s : 0.0);
	return 0;
}
