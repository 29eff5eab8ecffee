/*
 * kvm-marker TOKEN PHASE: emit one phase marker from inside a guest.
 *
 * Executes cpuid with EAX=0x4B564D00 ("KVM\0") and ECX=(TOKEN << 16) | PHASE.
 * cpuid is used because it always traps to the hypervisor (it is
 * unconditionally intercepted under VMX and SVM), so the host sees the marker
 * in tracepoint:kvm:kvm_cpuid on the very vCPU thread that ran it, ordered with
 * every other event of that vCPU: no guest/host clock has to be aligned. It is
 * unprivileged, so no kernel module or root is needed, and on bare metal or
 * under TCG it is harmless (the leaf is simply unknown).
 *
 * TOKEN is the run token (1..65535), PHASE the phase number (0..65535; 0 means
 * "outside any phase"). Exit status 0 on success, 2 on a usage error.
 *
 * Build: gcc -O2 -static -o kvm-marker kvm-marker.c
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#define MARKER_LEAF 0x4B564D00u

static int usage(const char *why)
{
	fprintf(stderr,
		"kvm-marker: %s\n"
		"usage: kvm-marker TOKEN PHASE\n"
		"  TOKEN  run token, integer 1..65535\n"
		"  PHASE  phase number, integer 0..65535 (0 = outside any phase)\n",
		why);
	return 2;
}

/* Parse a decimal integer in [lo, hi]; returns 0 on success. */
static int parse_u16(const char *s, unsigned long lo, unsigned long hi, uint32_t *out)
{
	char *end;
	unsigned long v;

	if (s[0] < '0' || s[0] > '9')
		return -1;
	errno = 0;
	v = strtoul(s, &end, 10);
	if (errno != 0 || *end != '\0' || v < lo || v > hi)
		return -1;
	*out = (uint32_t)v;
	return 0;
}

int main(int argc, char **argv)
{
	uint32_t token, phase;
	uint32_t eax = MARKER_LEAF, ebx, ecx, edx;

	if (argc != 3)
		return usage("expected exactly two arguments");
	if (parse_u16(argv[1], 1, 65535, &token) != 0)
		return usage("TOKEN must be an integer in 1..65535");
	if (parse_u16(argv[2], 0, 65535, &phase) != 0)
		return usage("PHASE must be an integer in 0..65535");

	ecx = (token << 16) | phase;
	/* volatile: the result is unused, but the trap itself is the point. */
	__asm__ volatile("cpuid"
			 : "+a"(eax), "=b"(ebx), "+c"(ecx), "=d"(edx)
			 :
			 : "memory");
	(void)ebx;
	(void)edx;
	return 0;
}
