"""`harness vm xml`: the domain XML a suite would start, without starting anything."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Literal

from harness.paths import cache_dir
from harness.platform import platform_for
from harness.spec import Suite
from harness.vm import lifecycle
from harness.vm.domain import domain_xml

RUN_ID = "RUNID"  # stands for the run id a real run generates


def preview_domains(
    suite: Suite,
    accelerator: Callable[[Literal["auto", "kvm", "tcg"]], Literal["kvm", "tcg"]],
) -> Iterator[tuple[str, str]]:
    """(VM name, domain XML) for every VM of ``suite``, with this host's accelerator choice.

    Paths inside the run directory and the SSH port are placeholders; image
    paths are real once the image is built (an XML comment says when not).
    """
    run_dir = cache_dir() / "runs" / RUN_ID
    for vm in suite.spec.vms:
        cfg, note = platform_for(vm.image).preview_config(
            vm, lifecycle.domain_name(RUN_ID, vm.name), run_dir, accelerator
        )
        yield vm.name, note + domain_xml(cfg)
