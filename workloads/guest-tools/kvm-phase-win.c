/*
 * kvm-phase TAG TOKEN PHASE COMMAND_BASE64
 *
 * Runs one harness phase in a Windows guest: marks PHASE (kvm-marker.exe TOKEN PHASE,
 * beside this program), runs COMMAND (UTF-8, base64-encoded so that no cmd.exe on the
 * way, WinRS's own included, interprets any of it) as "cmd.exe /d /c COMMAND", marks
 * phase 0 once it has ended, whatever it did ("exit /b 3" included), and exits with
 * the command's own exit status. TAG (kvmh-TOKEN-PHASE) names the phase in this
 * process's command line: the harness finds the phase's process tree by it to end it.
 *
 * Exit status: the command's; 125 if this program could not run it, 2 on a usage error.
 * Build: x86_64-w64-mingw32-gcc -O2 -static -municode -o kvm-phase.exe kvm-phase-win.c
 */
#include <windows.h>
#include <stdio.h>
#include <string.h>

static int b64(char c)
{
	if (c >= 'A' && c <= 'Z') return c - 'A';
	if (c >= 'a' && c <= 'z') return c - 'a' + 26;
	if (c >= '0' && c <= '9') return c - '0' + 52;
	if (c == '+') return 62;
	if (c == '/') return 63;
	return -1;
}

/* Decodes base64 text into out (NUL-terminated); -1 on bad input. */
static int decode(const char *in, char *out, size_t cap)
{
	size_t n = 0;
	unsigned acc = 0;
	int bits = 0, v;

	for (; *in && *in != '='; in++) {
		if ((v = b64(*in)) < 0)
			return -1;
		acc = (acc << 6) | (unsigned)v;
		bits += 6;
		if (bits >= 8) {
			bits -= 8;
			if (n + 1 >= cap)
				return -1;
			out[n++] = (char)((acc >> bits) & 0xff);
		}
	}
	out[n] = '\0';
	return 0;
}

static DWORD run(wchar_t *line)
{
	STARTUPINFOW si;
	PROCESS_INFORMATION pi;
	DWORD code = 125;

	memset(&si, 0, sizeof(si));
	si.cb = sizeof(si);
	if (!CreateProcessW(NULL, line, NULL, NULL, TRUE, 0, NULL, NULL, &si, &pi)) {
		fwprintf(stderr, L"kvm-phase: cannot start %ls (error %lu)\n", line, GetLastError());
		return 125;
	}
	WaitForSingleObject(pi.hProcess, INFINITE);
	GetExitCodeProcess(pi.hProcess, &code);
	CloseHandle(pi.hThread);
	CloseHandle(pi.hProcess);
	return code;
}

static int mark(const wchar_t *dir, const wchar_t *token, const wchar_t *phase)
{
	static wchar_t line[MAX_PATH + 64];

	_snwprintf(line, sizeof(line) / sizeof(line[0]), L"\"%lskvm-marker.exe\" %ls %ls", dir,
		   token, phase);
	return run(line) == 0 ? 0 : -1;
}

int wmain(int argc, wchar_t **argv)
{
	static char utf8[32768], b64text[65536];
	static wchar_t wide[32768], line[32800], dir[MAX_PATH];
	wchar_t *slash;
	DWORD code;

	if (argc != 5 || wcsncmp(argv[1], L"kvmh-", 5) != 0) {
		fwprintf(stderr, L"usage: kvm-phase TAG TOKEN PHASE COMMAND_BASE64\n");
		return 2;
	}
	if (!WideCharToMultiByte(CP_UTF8, 0, argv[4], -1, b64text, sizeof(b64text), NULL, NULL) ||
	    decode(b64text, utf8, sizeof(utf8)) != 0 ||
	    !MultiByteToWideChar(CP_UTF8, 0, utf8, -1, wide, sizeof(wide) / sizeof(wide[0]))) {
		fwprintf(stderr, L"kvm-phase: COMMAND_BASE64 is not base64 of UTF-8 text\n");
		return 2;
	}
	GetModuleFileNameW(NULL, dir, MAX_PATH);
	slash = wcsrchr(dir, L'\\');
	if (slash != NULL)
		slash[1] = L'\0';
	if (mark(dir, argv[2], argv[3]) != 0)
		return 125;
	fflush(stdout);
	_snwprintf(line, sizeof(line) / sizeof(line[0]), L"cmd.exe /d /c %ls", wide);
	code = run(line);
	if (mark(dir, argv[2], L"0") != 0 && code == 0)
		code = 125;
	return (int)code;
}
