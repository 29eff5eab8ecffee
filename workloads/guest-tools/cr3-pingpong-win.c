/*
 * cr3-pingpong-win --rounds N
 *
 * Two processes hand a token back and forth N times through two auto-reset
 * events: every hand-over is a switch to the other process's address space
 * (a CR3 write; two with KVA shadow), the path Windows drives hard and the
 * one that costs most under shadow paging.
 *   cr3-pingpong-win rounds=10000 switches=20000 seconds=0.5 switches_per_s=40000.0
 *
 * Exit status: 0 on success, 1 on a runtime failure, 2 on a usage error.
 * Build: x86_64-w64-mingw32-gcc -O2 -static -o cr3-pingpong-win.exe cr3-pingpong-win.c
 */
#include <windows.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define WAIT_MS 30000

static int child(HANDLE ping, HANDLE pong, long rounds)
{
	long i;

	for (i = 0; i < rounds; i++) {
		if (WaitForSingleObject(ping, WAIT_MS) != WAIT_OBJECT_0)
			return 1;
		SetEvent(pong);
	}
	return 0;
}

int main(int argc, char **argv)
{
	long rounds = 0, i;
	SECURITY_ATTRIBUTES sa = {sizeof(sa), NULL, TRUE}; /* inheritable handles */
	HANDLE ping, pong;
	char self[MAX_PATH], cmd[MAX_PATH + 96];
	STARTUPINFOA si;
	PROCESS_INFORMATION pi;
	LARGE_INTEGER f, t0, t1;
	DWORD code = 1;
	double s;

	if (argc == 5 && strcmp(argv[1], "--child") == 0)
		return child((HANDLE)(INT_PTR)_strtoi64(argv[2], NULL, 10),
			     (HANDLE)(INT_PTR)_strtoi64(argv[3], NULL, 10), strtol(argv[4], NULL, 10));
	if (argc != 3 || strcmp(argv[1], "--rounds") != 0 ||
	    (rounds = strtol(argv[2], NULL, 10)) < 1 || rounds > 100000000) {
		fprintf(stderr, "usage: cr3-pingpong-win --rounds N (1..100000000)\n");
		return 2;
	}
	ping = CreateEventA(&sa, FALSE, FALSE, NULL);
	pong = CreateEventA(&sa, FALSE, FALSE, NULL);
	if (ping == NULL || pong == NULL || GetModuleFileNameA(NULL, self, sizeof(self)) == 0) {
		fprintf(stderr, "cr3-pingpong-win: setup failed (%lu)\n", GetLastError());
		return 1;
	}
	snprintf(cmd, sizeof(cmd), "\"%s\" --child %lld %lld %ld", self,
		 (long long)(INT_PTR)ping, (long long)(INT_PTR)pong, rounds);
	memset(&si, 0, sizeof(si));
	si.cb = sizeof(si);
	if (!CreateProcessA(self, cmd, NULL, NULL, TRUE, 0, NULL, NULL, &si, &pi)) {
		fprintf(stderr, "cr3-pingpong-win: CreateProcess failed (%lu)\n", GetLastError());
		return 1;
	}
	QueryPerformanceFrequency(&f);
	QueryPerformanceCounter(&t0);
	for (i = 0; i < rounds; i++) {
		SetEvent(ping);
		if (WaitForSingleObject(pong, WAIT_MS) != WAIT_OBJECT_0) {
			fprintf(stderr, "cr3-pingpong-win: no answer in round %ld\n", i);
			TerminateProcess(pi.hProcess, 1);
			return 1;
		}
	}
	QueryPerformanceCounter(&t1);
	WaitForSingleObject(pi.hProcess, WAIT_MS);
	GetExitCodeProcess(pi.hProcess, &code);
	if (code != 0) {
		fprintf(stderr, "cr3-pingpong-win: the child exited %lu\n", code);
		return 1;
	}
	s = (double)(t1.QuadPart - t0.QuadPart) / (double)f.QuadPart;
	printf("cr3-pingpong-win rounds=%ld switches=%ld seconds=%.6f switches_per_s=%.1f\n", rounds,
	       2 * rounds, s, s > 0 ? 2.0 * (double)rounds / s : 0.0);
	return 0;
}
