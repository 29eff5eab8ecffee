"""`harness vm xml`: the domain XML a suite would start, without starting anything."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from typing import Literal
from xml.sax.saxutils import quoteattr

from harness.paths import cache_dir
from harness.platform import platform_for
from harness.spec import Suite
from harness.vm import lifecycle
from harness.vm.domain import domain_xml

RUN_ID = "RUNID"  # stands for the run id a real run generates
#: The first placeholder SSH forward port; each VM that forwards one gets the next, as the
#: VMs of a group do in a real run (which picks free ports at boot).
PREVIEW_SSH_PORT = 2222


def preview_domains(
    suite: Suite,
    accelerator: Callable[[Literal["auto", "kvm", "tcg"]], Literal["kvm", "tcg"]],
) -> Iterator[tuple[str, str]]:
    """(VM name, domain XML) for every VM of ``suite``, with this host's accelerator choice.

    Paths inside the run directory and the SSH ports are placeholders (one
    port per VM, none shared); image paths are real once the image is built
    (an XML comment says when not).
    """
    run_dir = cache_dir() / "runs" / RUN_ID
    port = PREVIEW_SSH_PORT
    for vm in suite.spec.vms:
        cfg, note = platform_for(vm.image).preview_config(
            vm, lifecycle.domain_name(RUN_ID, vm.name), run_dir, accelerator
        )
        if cfg.ssh_port is not None:
            cfg = dataclasses.replace(cfg, ssh_port=port)
            port += 1
        yield vm.name, note + domain_xml(cfg)


def preview_document(
    suite: Suite, domains: Iterable[tuple[str, str]], only: str | None = None
) -> str:
    """The text `harness vm xml` prints: one well-formed XML document.

    One domain (or ``only``): the <domain> itself, as `virsh define` takes it.
    Several: a <domains> wrapper with a comment naming each VM before its
    <domain>, so the whole parses and each part is easy to cut out.
    """
    chosen = [(name, xml) for name, xml in domains if only in (None, name)]
    if len(chosen) == 1:
        return chosen[0][1]
    parts = [
        # No "--vm" here: XML comments may not contain a double hyphen.
        f"<!-- {len(chosen)} domains of suite {_safe(suite.spec.name)}; virsh define takes "
        "one <domain> at a time: cut it out, or print it alone with the option vm NAME -->\n",
        f"<domains suite={quoteattr(suite.spec.name)}>\n",
    ]
    for name, xml in chosen:
        parts.append(f"<!-- VM {_safe(name)} -->\n{xml}")
    parts.append("</domains>\n")
    return "".join(parts)


def _safe(text: str) -> str:
    """``text`` fit for an XML comment, which may not contain "--"."""
    while "--" in text:
        text = text.replace("--", "- -")
    return text
