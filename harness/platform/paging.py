"""The paging micro guest: long mode, K address spaces, marker-bounded MMU phases.

Same life as the micro guest (harness/platform/micro.py: one boot per
repetition, started paused, self-driven, phases read back from the tracer's
final maps); only the ROM and what a phase's numbers mean differ. The ROM is
``vm-images/micro/paging.asm`` built by harness/image/paging.py with the
workload's ``address_spaces`` and each phase's ``kind`` and ``count``.
"""

from __future__ import annotations

from pathlib import Path

from harness.image.paging import build_paging_image, recipe_digest
from harness.platform.base import BootPlan, ChooseAccelerator, RunContext, with_pinning
from harness.platform.micro import BuiltRom, MicroPlatform, MicroSession
from harness.spec import PhaseSpec, VmSpec
from harness.vm import configs
from harness.vm.domain import DomainConfig


class PagingPlatform(MicroPlatform):
    """Self-driven paging micro guests under KVM."""

    kind = "paging"

    def session(self, ctx: RunContext, plan: BootPlan) -> PagingSession:
        """A not yet booted session for ``plan``'s one work item."""
        return PagingSession(ctx, plan)

    def preview_config(
        self, vm: VmSpec, domain: str, run_dir: Path, accelerator: ChooseAccelerator
    ) -> tuple[DomainConfig, str]:
        """The paging domain of the first boot (its ROM is built per run)."""
        first = run_dir / f"{vm.name}-1"
        cfg = configs.micro_config(
            name=domain, memory_mib=vm.memory_mib, rom=first / "paging.rom",
            console_log=first / "console.log",
        )
        return with_pinning(cfg, vm), ""


class PagingSession(MicroSession):
    """One boot of the paging guest running one repetition of one workload."""

    image_kind = "paging"

    def _build(self, out_dir: Path, token: int) -> BuiltRom:
        k, phases = self.item.workload.paging_phases(self.item.run.params)
        img = build_paging_image(out_dir, k, phases, token)
        return BuiltRom(img.rom_path, img.digest, recipe_digest(k, phases))

    def _phase_metrics(self, spec: PhaseSpec, duration_s: float) -> dict[str, float]:
        """What the guest did in the phase, from its own program (not from the tracer)."""
        _, phases = self.item.workload.paging_phases(self.item.run.params)
        ph = next(p for p in phases if p.name == spec.name)
        what = {"cr3": "cr3_writes", "touch": "pages_touched", "pte": "ptes_edited"}[ph.kind]
        return {what: float(ph.count), f"{what}_per_s": ph.count / max(duration_s, 1e-9)}
