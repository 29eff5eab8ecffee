"""What differs between the two sides of a comparison, and whether that is fair.

Two kinds of provenance field:

* **what changed** (the subject of an A/B): the guest kernel (release and
  package version, or the booted file's digest), its command line and the
  guest OS release; host kernel and command line, KVM module parameters, MMU
  mode, QEMU / libvirt / bpftrace versions, CPU microcode. These are expected
  to differ; they lead the output.
* **fairness** (must be equal, or the numbers are not comparable): the guest
  image, accelerator, vCPUs and memory, the probes attached and the tracer
  program, the result schema, host THP mode and CPU model. A difference here
  makes the comparison unfair: exit status 2 unless ``--allow-mismatch``.

Every field must also be uniform within a side: pooling runs of two kernels
into one side would average away the very change being looked for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from harness.host.load import BUSY_SHARE
from harness.results import GuestIdentity, RunResult, VmRecord

Values = Callable[[RunResult], Iterable[tuple[str, str]]]


def _host(attr: str) -> Values:
    return lambda r: [(f"host.{attr}", _s(getattr(r.host, attr)))]


def _kvm_params(r: RunResult) -> Iterable[tuple[str, str]]:
    for module, params in r.host.kvm_params.items():
        for name, value in params.items():
            yield f"{module}.{name}", value


def _per_vm(attr: str, get: Callable[..., object]) -> Values:
    # One entry per VM name: a suite's VMs are compared VM by VM.
    return lambda r: [(f"vm {vm.name}: {attr}", _s(get(vm))) for vm in r.vms]


def _images(r: RunResult) -> Iterable[tuple[str, str]]:
    """The image of each VM, per work it booted for.

    The micro and paging guests build a ROM per work item (its phases and
    parameters are the ROM), so one suite boots several images of one VM on
    purpose: their images are compared per workload and parameters, never
    pooled as a "mixed" side. A VM whose boots all ran the same work (Linux)
    has one image entry, as before.
    """
    work: dict[str, set[str]] = {}
    for run in r.runs:
        if run.boot is not None:
            params = ",".join(f"{k}={v}" for k, v in sorted(run.params.items()))
            work.setdefault(run.boot, set()).add(f"{run.workload}[{params}]")
    for vm in r.vms:
        image = _s(vm.image_recipe or vm.image_digest)
        items = work.get(vm.boot) if vm.boot is not None else None
        per_item = vm.image in ("micro", "paging") and items is not None
        label = f" for {', '.join(sorted(items))}" if per_item and items else ""
        yield f"vm {vm.name}: image{label}", image


def _selection(vm: VmRecord) -> str:
    """The probes a run asked for: attached or not (availability is the kernel's business)."""
    if vm.trace is None:
        return ""
    names = set(vm.trace.probes_attached) | {p.probe for p in vm.trace.probes_not_attached}
    return ",".join(sorted(names))


def _s(value: object) -> str:
    if value is None:
        return "(unknown)"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _guest(attr: str, get: Callable[[GuestIdentity], str | None]) -> Values:
    """Per VM, a fact of the guest as it booted (only VMs that recorded their identity)."""
    return lambda r: [(f"vm {vm.name}: {attr}", _s(get(vm.guest_identity)))
                      for vm in r.vms if vm.guest_identity is not None]


#: Fields whose difference is what an A/B comparison is about.
CHANGES: list[tuple[Values, str]] = [
    # The guest kernel under test (release and package version, or the file's digest) and
    # the guest OS: the subject of a guest-kernel A/B, never unfair. The image check below
    # compares the root file system's recipe, which a kernel under test does not change.
    (_guest("guest kernel", lambda g: g.kernel_label()), "guest kernel"),
    (_guest("guest kernel command line", lambda g: g.kernel_cmdline), "guest kernel command line"),
    (_guest("guest OS", lambda g: g.os_label()), "guest OS release"),
    (_host("kernel_release"), "host kernel"),
    (_host("kernel_cmdline"), "host kernel command line"),
    (_kvm_params, "KVM module parameter"),
    (_host("mmu_mode"), "KVM MMU mode"),
    (_host("tdp_mmu"), "KVM TDP MMU"),
    (_host("qemu_version"), "QEMU version"),
    (_host("libvirt_version"), "libvirt version"),
    (_host("bpftrace_version"), "bpftrace version"),
    (_host("microcode"), "CPU microcode"),
    (
        lambda r: [("host.cpu_governor", _s(r.host_load.cpu_governor if r.host_load else None))],
        "CPU frequency governor",
    ),
    (
        lambda r: [("host config", r.host_config.name if r.host_config else "(none applied)")],
        "host MMU configuration applied by the harness ([[host_configs]])",
    ),
    (
        _per_vm("probes attached", lambda v: ",".join(sorted(v.trace.probes_attached))
                if v.trace else ""),
        "probes that attach differ (a function renamed, inlined or gone in one kernel): "
        "their figures are listed as measured on one side only",
    ),
]

#: Fields that must be equal for the comparison to be fair, with why.
FAIRNESS: list[tuple[Values, str]] = [
    (lambda r: [("schema_version", str(r.schema_version))], "result schema version"),
    (_host("cpu_model"), "a different CPU measures the CPU, not the change"),
    (_host("thp_enabled"), "host THP mode changes how guest memory is backed"),
    (
        lambda r: [("host.thp_defrag", _s(r.host_load.thp_defrag if r.host_load else None))],
        "host THP defrag mode changes how fast huge pages back guest memory",
    ),
    (_images, "guest image differs"),
    (_per_vm("accelerator", lambda v: v.accelerator), "KVM against TCG is not a kernel change"),
    (_per_vm("vcpus", lambda v: v.vcpus), "vCPU count differs"),
    (_per_vm("memory_mib", lambda v: v.memory_mib), "guest memory differs"),
    (
        _per_vm("probe selection", _selection),
        "a different probe selection: tracing overhead and trace figures differ",
    ),
    (
        _per_vm(
            "tracer program",
            lambda v: (v.trace.program_template_sha256 if v.trace else None) or "(not recorded)",
        ),
        "the same probes traced by a different program may count differently",
    ),
    (
        # Results from before the libbpf backend recorded none: they ran bpftrace.
        _per_vm("tracer backend", lambda v: (v.trace.backend if v.trace else None) or "bpftrace"),
        "bpftrace and libbpf cost the guest differently per event: timings are not comparable",
    ),
]


@dataclass(frozen=True)
class FieldDiff:
    """One provenance field and its values on each side."""

    field: str
    base: tuple[str, ...]
    candidate: tuple[str, ...]
    meaning: str
    fair: bool  # False: the comparison is unfair because of this field

    def describe(self) -> str:
        """``field: a -> b`` (or the sets of values where a side is mixed)."""
        b = " | ".join(self.base) or "(absent)"
        c = " | ".join(self.candidate) or "(absent)"
        return f"{self.field}: {b} -> {c}"


def _collect(results: Iterable[RunResult], values: Values) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for r in results:
        for name, value in values(r):
            out.setdefault(name, set()).add(value)
    return out


def _configured_apart(base: list[RunResult], candidate: list[RunResult]) -> bool:
    """Both sides ran under one applied host configuration each, and not the same one."""
    names = [{r.host_config.name if r.host_config else None for r in side}
             for side in (base, candidate)]
    return all(len(n) == 1 and None not in n for n in names) and names[0] != names[1]


def differences(base: list[RunResult], candidate: list[RunResult]) -> list[FieldDiff]:
    """Every provenance field that differs between the sides or within one of them.

    Changes are fair unless a side is mixed; fairness fields are unfair on any
    difference. A field absent on one side (e.g. a VM only one side ran) is
    left to phase matching, which reports unmatched phases itself.
    """
    out: list[FieldDiff] = []
    for table, is_change in ((CHANGES, True), (FAIRNESS, False)):
        for values, meaning in table:
            b, c = _collect(base, values), _collect(candidate, values)
            for name in sorted(set(b) | set(c)):
                bv, cv = b.get(name, set()), c.get(name, set())
                if not bv or not cv:
                    if is_change:  # e.g. a KVM parameter that exists on one kernel only
                        out.append(FieldDiff(name, tuple(sorted(bv)), tuple(sorted(cv)),
                                             meaning, True))
                    continue
                mixed = len(bv) > 1 or len(cv) > 1
                if bv == cv and not mixed:
                    continue
                why = meaning
                if mixed:
                    side = "base" if len(bv) > 1 else "candidate"
                    why = f"{meaning}; the {side} side mixes values, so its runs cannot be pooled"
                out.append(FieldDiff(name, tuple(sorted(bv)), tuple(sorted(cv)), why,
                                     is_change and not mixed))
    # A host setting that differs because the sides ran under different [[host_configs]]
    # (the MMU matrix: THP mode, say) is the subject of the comparison, not a flaw in it.
    if _configured_apart(base, candidate):
        out = [
            FieldDiff(d.field, d.base, d.candidate,
                      f"{d.meaning}; set apart on purpose by the host configurations", True)
            if d.field.startswith("host.") and not d.fair and "mixes" not in d.meaning
            else d
            for d in out
        ]
    # Other attached probes make another program by construction; that is the kernel's
    # doing (reported above), not a different tracer.
    attached_differ = {d.field.removesuffix("probes attached") for d in out
                       if d.field.endswith("probes attached") and d.fair}
    return [d for d in out if not (d.field.endswith("tracer program")
                                   and d.field.removesuffix("tracer program") in attached_differ)]


def busy_warnings(base: list[RunResult], candidate: list[RunResult]) -> list[str]:
    """Warnings for sides measured on a busy host, or beside other VMs.

    Not unfair (the same kernel on a busy host is still the same kernel), but
    its timings carry the other load: counts stay trustworthy, times do not.
    """
    out = []
    for label, side in (("base", base), ("candidate", candidate)):
        loads = [r.host_load for r in side if r.host_load is not None]
        busy = [x for x in loads if x.busy]
        if busy:
            worst = max(x.other_cpu_share or 0.0 for x in busy)
            out.append(
                f"{label}: {len(busy)} of {len(side)} run(s) measured on a busy host (other "
                f"processes used up to {worst * 100:.0f}% of its CPU time; busy means "
                f">= {BUSY_SHARE * 100:.0f}%): time figures carry that load, counts do not"
            )
        crowded = [x for x in loads if x.other_vms]
        if crowded:
            n = max(len(x.other_vms) for x in crowded)
            out.append(f"{label}: {len(crowded)} run(s) started beside up to {n} other VM(s)")
    return out
