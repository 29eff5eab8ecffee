"""KVM exit-reason names and page-fault error-code bits, as the kernel prints them.

Sources (Linux v6.18, the kernel this harness was developed on; the tables are
append-only across releases, so older kernels print a subset):

* ``arch/x86/include/uapi/asm/vmx.h``: ``EXIT_REASON_*`` and the
  ``VMX_EXIT_REASONS`` table that ``kvm:kvm_exit`` passes to
  ``__print_symbolic`` when ``isa == 1`` (``KVM_ISA_VMX``).  The tracepoint
  prints ``exit_reason & 0xffff`` (the *basic* exit reason) and appends
  ``FAILED_VMENTRY`` when bit 31 (``VMX_EXIT_REASONS_FAILED_VMENTRY``) is set.
* ``arch/x86/include/uapi/asm/svm.h``: ``SVM_EXIT_*`` / ``SVM_VMGEXIT_*`` and
  the ``SVM_EXIT_REASONS`` table used when ``isa == 2`` (``KVM_ISA_SVM``);
  ``SVM_EXIT_ERR`` (-1) is the 32-bit field value 0xffffffff.
* ``arch/x86/include/asm/kvm_host.h``: ``PFERR_*_MASK`` bits of the error code
  that ``kvm:kvm_page_fault`` and ``kvm_mmu_page_fault()`` carry.

The tables were cross-checked against the live tracepoint format
(``/sys/kernel/tracing/events/kvm/kvm_exit/format``, "print fmt") of a 6.18
kernel; ``tests/unit/test_exit_reasons.py`` repeats that check on any host whose
format file is readable.  Codes a header defines but the print table omits
(e.g. SVM ``RDPRU``) are printed by the kernel as bare numbers; we decode them
as ``VMX_UNKNOWN_0x..`` / ``SVM_UNKNOWN_0x..`` the same way.
"""

from __future__ import annotations

from typing import Final

#: ``kvm_exit.isa`` values (``KVM_ISA_VMX`` / ``KVM_ISA_SVM`` in arch/x86/kvm/trace.h).
ISA_VMX: Final = 1
ISA_SVM: Final = 2

#: Bit 31 of the VMX exit-reason field: VM entry failed (SDM 26.8 / vmx.h).
VMX_FAILED_VMENTRY: Final = 0x80000000
#: Mask of the VMX *basic* exit reason, the part the name tables index.
VMX_BASIC_MASK: Final = 0xFFFF

#: VMX basic exit reason -> name (``VMX_EXIT_REASONS``, uapi/asm/vmx.h, v6.18).
VMX_EXIT_REASONS: Final[dict[int, str]] = {
    0: "EXCEPTION_NMI",
    1: "EXTERNAL_INTERRUPT",
    2: "TRIPLE_FAULT",
    3: "INIT_SIGNAL",
    4: "SIPI_SIGNAL",
    7: "INTERRUPT_WINDOW",
    8: "NMI_WINDOW",
    9: "TASK_SWITCH",
    10: "CPUID",
    12: "HLT",
    13: "INVD",
    14: "INVLPG",
    15: "RDPMC",
    16: "RDTSC",
    18: "VMCALL",
    19: "VMCLEAR",
    20: "VMLAUNCH",
    21: "VMPTRLD",
    22: "VMPTRST",
    23: "VMREAD",
    24: "VMRESUME",
    25: "VMWRITE",
    26: "VMOFF",
    27: "VMON",
    28: "CR_ACCESS",
    29: "DR_ACCESS",
    30: "IO_INSTRUCTION",
    31: "MSR_READ",
    32: "MSR_WRITE",
    33: "INVALID_STATE",
    34: "MSR_LOAD_FAIL",
    36: "MWAIT_INSTRUCTION",
    37: "MONITOR_TRAP_FLAG",
    39: "MONITOR_INSTRUCTION",
    40: "PAUSE_INSTRUCTION",
    41: "MCE_DURING_VMENTRY",
    43: "TPR_BELOW_THRESHOLD",
    44: "APIC_ACCESS",
    45: "EOI_INDUCED",
    46: "GDTR_IDTR",
    47: "LDTR_TR",
    48: "EPT_VIOLATION",
    49: "EPT_MISCONFIG",
    50: "INVEPT",
    51: "RDTSCP",
    52: "PREEMPTION_TIMER",
    53: "INVVPID",
    54: "WBINVD",
    55: "XSETBV",
    56: "APIC_WRITE",
    57: "RDRAND",
    58: "INVPCID",
    59: "VMFUNC",
    60: "ENCLS",
    61: "RDSEED",
    62: "PML_FULL",
    63: "XSAVES",
    64: "XRSTORS",
    67: "UMWAIT",
    68: "TPAUSE",
    74: "BUS_LOCK",
    75: "NOTIFY",
    77: "TDCALL",
    84: "MSR_READ_IMM",
    85: "MSR_WRITE_IMM",
}

#: SVM exit code -> name (``SVM_EXIT_REASONS``, uapi/asm/svm.h, v6.18).
SVM_EXIT_REASONS: Final[dict[int, str]] = {
    0x000: "read_cr0",
    0x002: "read_cr2",
    0x003: "read_cr3",
    0x004: "read_cr4",
    0x008: "read_cr8",
    0x010: "write_cr0",
    0x012: "write_cr2",
    0x013: "write_cr3",
    0x014: "write_cr4",
    0x018: "write_cr8",
    0x020: "read_dr0",
    0x021: "read_dr1",
    0x022: "read_dr2",
    0x023: "read_dr3",
    0x024: "read_dr4",
    0x025: "read_dr5",
    0x026: "read_dr6",
    0x027: "read_dr7",
    0x030: "write_dr0",
    0x031: "write_dr1",
    0x032: "write_dr2",
    0x033: "write_dr3",
    0x034: "write_dr4",
    0x035: "write_dr5",
    0x036: "write_dr6",
    0x037: "write_dr7",
    0x040: "DE excp",
    0x041: "DB excp",
    0x043: "BP excp",
    0x044: "OF excp",
    0x045: "BR excp",
    0x046: "UD excp",
    0x047: "NM excp",
    0x048: "DF excp",
    0x04A: "TS excp",
    0x04B: "NP excp",
    0x04C: "SS excp",
    0x04D: "GP excp",
    0x04E: "PF excp",
    0x050: "MF excp",
    0x051: "AC excp",
    0x052: "MC excp",
    0x053: "XF excp",
    0x060: "interrupt",
    0x061: "nmi",
    0x062: "smi",
    0x063: "init",
    0x064: "vintr",
    0x065: "cr0_sel_write",
    0x066: "read_idtr",
    0x067: "read_gdtr",
    0x068: "read_ldtr",
    0x069: "read_rt",
    0x06A: "write_idtr",
    0x06B: "write_gdtr",
    0x06C: "write_ldtr",
    0x06D: "write_rt",
    0x06E: "rdtsc",
    0x06F: "rdpmc",
    0x070: "pushf",
    0x071: "popf",
    0x072: "cpuid",
    0x073: "rsm",
    0x074: "iret",
    0x075: "swint",
    0x076: "invd",
    0x077: "pause",
    0x078: "hlt",
    0x079: "invlpg",
    0x07A: "invlpga",
    0x07B: "io",
    0x07C: "msr",
    0x07D: "task_switch",
    0x07E: "ferr_freeze",
    0x07F: "shutdown",
    0x080: "vmrun",
    0x081: "hypercall",
    0x082: "vmload",
    0x083: "vmsave",
    0x084: "stgi",
    0x085: "clgi",
    0x086: "skinit",
    0x087: "rdtscp",
    0x088: "icebp",
    0x089: "wbinvd",
    0x08A: "monitor",
    0x08B: "mwait",
    0x08D: "xsetbv",
    0x08F: "write_efer_trap",
    0x090: "write_cr0_trap",
    0x094: "write_cr4_trap",
    0x098: "write_cr8_trap",
    0x0A2: "invpcid",
    0x0A5: "buslock",
    0x0A6: "idle-halt",
    0x400: "npf",
    0x401: "avic_incomplete_ipi",
    0x402: "avic_unaccelerated_access",
    0x403: "vmgexit",
    0x80000001: "vmgexit_mmio_read",
    0x80000002: "vmgexit_mmio_write",
    0x80000003: "vmgexit_nmi_complete",
    0x80000004: "vmgexit_ap_hlt_loop",
    0x80000005: "vmgexit_ap_jump_table",
    0x80000010: "vmgexit_page_state_change",
    0x80000011: "vmgexit_guest_request",
    0x80000012: "vmgexit_ext_guest_request",
    0x80000013: "vmgexit_ap_creation",
    0x8000FFFD: "vmgexit_hypervisor_feature",
    0xFFFFFFFF: "invalid_guest_state",
}

#: Exits that are MMU faults, keyed ``(isa, basic exit reason)``; value is a
#: vendor-neutral label the tracer and reports share.
MMU_FAULT_EXITS: Final[dict[tuple[int, int], str]] = {
    (ISA_VMX, 48): "ept_violation",
    (ISA_VMX, 49): "ept_misconfig",
    (ISA_SVM, 0x400): "npf",
}


def decode_exit_reason(isa: int, exit_reason: int) -> str:
    """Name of a ``kvm:kvm_exit`` exit reason, spelled as the kernel prints it.

    ``isa`` is the tracepoint's ``isa`` field (1 = VMX, 2 = SVM).  For VMX only
    the basic reason (low 16 bits) selects the name, and a set bit 31 appends
    ``" FAILED_VMENTRY"`` exactly like the tracepoint's ``__print_flags``.
    Codes outside the tables give ``VMX_UNKNOWN_0x..`` / ``SVM_UNKNOWN_0x..``.
    """
    if isa == ISA_VMX:
        basic = exit_reason & VMX_BASIC_MASK
        name = VMX_EXIT_REASONS.get(basic, f"VMX_UNKNOWN_{basic:#x}")
        if exit_reason & VMX_FAILED_VMENTRY:
            name += " FAILED_VMENTRY"
        return name
    if isa == ISA_SVM:
        # The tracepoint field is a u32, so SVM_EXIT_ERR (-1) arrives as 0xffffffff.
        code = exit_reason & 0xFFFFFFFF
        return SVM_EXIT_REASONS.get(code, f"SVM_UNKNOWN_{code:#x}")
    raise ValueError(
        f"kvm_exit isa={isa} is neither 1 (VMX) nor 2 (SVM); "
        "pass the tracepoint's 'isa' field unchanged"
    )


def mmu_fault_exit(isa: int, exit_reason: int) -> str | None:
    """The :data:`MMU_FAULT_EXITS` label of an exit, or None if it is not an MMU fault."""
    basic = exit_reason & VMX_BASIC_MASK if isa == ISA_VMX else exit_reason & 0xFFFFFFFF
    return MMU_FAULT_EXITS.get((isa, basic))


# --- page-fault error codes -------------------------------------------------

#: ``PFERR_*`` bits of arch/x86/include/asm/kvm_host.h (v6.18), bit -> name.
#: Bits 0-15 are the architectural #PF error code; 31-36 come from AMD's NPF
#: EXITINFO1 (and KVM sets 32/33 itself for EPT violations); 48/49 are
#: KVM-internal ("synthetic") flags that never come from hardware.
PFERR_BITS: Final[dict[int, str]] = {
    0: "present",
    1: "write",
    2: "user",
    3: "rsvd",
    4: "fetch",
    5: "pk",
    6: "ss",
    15: "sgx",
    31: "guest_rmp",
    32: "guest_final",
    33: "guest_page",
    34: "guest_enc",
    35: "guest_sizem",
    36: "guest_vmpl",
    48: "implicit_access",
    49: "private_access",
}

PFERR_PRESENT_MASK: Final = 1 << 0
PFERR_WRITE_MASK: Final = 1 << 1
PFERR_USER_MASK: Final = 1 << 2
PFERR_RSVD_MASK: Final = 1 << 3
PFERR_FETCH_MASK: Final = 1 << 4
PFERR_PK_MASK: Final = 1 << 5
PFERR_SS_MASK: Final = 1 << 6
PFERR_SGX_MASK: Final = 1 << 15
PFERR_GUEST_FINAL_MASK: Final = 1 << 32
PFERR_GUEST_PAGE_MASK: Final = 1 << 33


def decode_fault_error_code(code: int) -> list[str]:
    """Names of the ``PFERR_*`` bits set in ``code``, lowest bit first.

    Bits KVM does not define come out as ``bitN`` so nothing is silently lost.
    """
    if code < 0:
        raise ValueError(f"page-fault error code must be non-negative, got {code}")
    names: list[str] = []
    bit = 0
    while code >> bit:
        if (code >> bit) & 1:
            names.append(PFERR_BITS.get(bit, f"bit{bit}"))
        bit += 1
    return names


def fault_kind(code: int) -> str:
    """A compact, stable label for a ``PFERR``-format error code.

    Always ``access|privilege`` (access: fetch > write > read; privilege: user
    or kernel), then in this order whichever apply: ``not-present``, ``rsvd``
    (reserved bit: MMIO SPTEs, EPT misconfig-like faults), ``pk``,
    ``shadow-stack``, ``sgx``, ``guest-final`` (fault on the final GPA of a
    guest access) or ``guest-page`` (fault while walking the guest's own page
    tables).  Examples: ``"write|user"``, ``"read|kernel|not-present"``.

    For EPT violations KVM sets ``user`` when the access was a *read*
    (``__vmx_handle_ept_violation``), so on Intel TDP ``user`` does not mean
    CPL 3; convert the tracepoint's exit qualification with
    :func:`ept_qualification_to_error_code` first.
    """
    if code < 0:
        raise ValueError(f"page-fault error code must be non-negative, got {code}")
    if code & PFERR_FETCH_MASK:
        access = "fetch"
    elif code & PFERR_WRITE_MASK:
        access = "write"
    else:
        access = "read"
    parts = [access, "user" if code & PFERR_USER_MASK else "kernel"]
    if not code & PFERR_PRESENT_MASK:
        parts.append("not-present")
    for mask, label in (
        (PFERR_RSVD_MASK, "rsvd"),
        (PFERR_PK_MASK, "pk"),
        (PFERR_SS_MASK, "shadow-stack"),
        (PFERR_SGX_MASK, "sgx"),
        (PFERR_GUEST_FINAL_MASK, "guest-final"),
        (PFERR_GUEST_PAGE_MASK, "guest-page"),
    ):
        if code & mask:
            parts.append(label)
    return "|".join(parts)


# EPT-violation exit qualification bits (arch/x86/include/asm/vmx.h, SDM 28.3.3.2).
EPT_VIOLATION_ACC_READ: Final = 1 << 0
EPT_VIOLATION_ACC_WRITE: Final = 1 << 1
EPT_VIOLATION_ACC_INSTR: Final = 1 << 2
EPT_VIOLATION_PROT_MASK: Final = 0b111 << 3  # GPA readable / writable / executable
EPT_VIOLATION_GVA_TRANSLATED: Final = 1 << 8


def ept_qualification_to_error_code(qualification: int) -> int:
    """Turn an EPT-violation exit qualification into KVM's ``PFERR`` error code.

    On VMX, ``kvm:kvm_page_fault``'s ``error_code`` field is the raw exit
    qualification (``handle_ept_violation`` traces it before converting), while
    on SVM and for shadow-paging #PF intercepts it already is a ``PFERR`` code.
    This mirrors ``__vmx_handle_ept_violation`` (arch/x86/kvm/vmx/common.h,
    v6.18), including its quirk of reporting reads as ``PFERR_USER_MASK``.
    """
    q = qualification
    code = PFERR_USER_MASK if q & EPT_VIOLATION_ACC_READ else 0
    if q & EPT_VIOLATION_ACC_WRITE:
        code |= PFERR_WRITE_MASK
    if q & EPT_VIOLATION_ACC_INSTR:
        code |= PFERR_FETCH_MASK
    if q & EPT_VIOLATION_PROT_MASK:
        code |= PFERR_PRESENT_MASK
    code |= PFERR_GUEST_FINAL_MASK if q & EPT_VIOLATION_GVA_TRANSLATED else PFERR_GUEST_PAGE_MASK
    return code


def page_fault_event_kind(mmu_mode: str, error_code: int) -> str:
    """:func:`fault_kind` of a ``kvm:kvm_page_fault`` event on a host in ``mmu_mode``.

    ``mmu_mode`` is :attr:`harness.host.facts.HostFacts.mmu_mode`; only ``"ept"``
    needs the exit-qualification conversion.
    """
    if mmu_mode == "ept":
        return fault_kind(ept_qualification_to_error_code(error_code))
    return fault_kind(error_code)
