"""KVM's own counters against the traced events over the same host window.

The KVM stats are read right before a phase's opening host marker and right
after its closing one, so the comparable traced quantity is what the tracer
counted under that host-window phase (``@ev[pid, *, h, probe]``), whatever
the guest markers said. A non-zero difference on an exact pair means events
were lost (or counted twice); on an approximate pair it is information.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from harness.trace.parse import TraceSnapshot, select_pid
from harness.trace.probes import CATALOGUE, probe_id


@dataclass(frozen=True)
class Equivalence:
    """KVM counters (summed) that should equal, or track, one probe's event count."""

    stats: tuple[str, ...]
    probe: str
    exact: bool


#: Chosen from harness/trace/kvmstats.py's TRACE_EQUIVALENTS (which cites the
#: kernel source of each pair). Only pairs that name a probe in the catalogue.
EQUIVALENCES: tuple[Equivalence, ...] = (
    # x86_decode_emulated_instruction() bumps insn_emulation next to
    # trace_kvm_emulate_insn_start(); failures bump insn_emulation_fail next to
    # trace_kvm_emulate_insn_failed(): both are kvm_emulate_insn events.
    Equivalence(("insn_emulation", "insn_emulation_fail"), "kvm_emulate_insn", exact=True),
    # Every VMX/SVM exit; fastpath re-entries and PVM exits are counted but not traced.
    Equivalence(("exits",), "kvm_exit", exact=False),
    # kvm_mmu_get_page fires for cache hits too (created=0); mmu_cache_miss only for misses.
    Equivalence(("mmu_cache_miss",), "kvm_mmu_get_page", exact=False),
    Equivalence(("mmu_shadow_zapped",), "kvm_mmu_prepare_zap_page", exact=False),
)

_NAMES: dict[int, str] = {probe_id(p.name): p.name for p in CATALOGUE}


def host_window_counts(snapshot: TraceSnapshot, pid: int, phase: int) -> dict[str, int]:
    """Events per probe of VM ``pid`` between the host markers of ``phase``."""
    out: dict[str, int] = {}
    for (_g, h, ident), n in select_pid(snapshot.counter("ev"), pid).items():
        if h == phase and ident in _NAMES:
            out[_NAMES[ident]] = out.get(_NAMES[ident], 0) + n
    return out


@dataclass(frozen=True)
class Comparison:
    """One counter pair over one phase."""

    kvm_stat: str
    probe: str
    kvm_value: int
    traced_value: int
    exact: bool

    @property
    def difference(self) -> int:
        """KVM minus traced: positive means the tracer saw fewer events than KVM counted."""
        return self.kvm_value - self.traced_value


def compare(
    stats_delta: Mapping[str, int],
    traced: Mapping[str, int],
    attached: Iterable[str],
    equivalences: Iterable[Equivalence] = EQUIVALENCES,
) -> list[Comparison]:
    """Every equivalence whose counters KVM reported and whose probe was attached."""
    live = set(attached)
    out: list[Comparison] = []
    for eq in equivalences:
        if eq.probe not in live or not all(s in stats_delta for s in eq.stats):
            continue
        out.append(
            Comparison(
                kvm_stat="+".join(eq.stats),
                probe=eq.probe,
                kvm_value=sum(stats_delta[s] for s in eq.stats),
                traced_value=traced.get(eq.probe, 0),
                exact=eq.exact,
            )
        )
    return out
