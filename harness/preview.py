"""`harness vm xml`: the domain XML a suite would start, without starting anything."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Literal

from harness.image import cache as image_cache
from harness.image.linux import IMAGE_NAME, cached_linux_image, load_recipe, recipe_digest
from harness.paths import cache_dir
from harness.spec import Suite
from harness.vm import configs, lifecycle
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
        name = lifecycle.domain_name(RUN_ID, vm.name)
        if vm.image == "micro":
            cfg = configs.micro_config(
                name=name,
                memory_mib=vm.memory_mib,
                rom=run_dir / f"{vm.name}-1" / "micro.rom",
                console_log=run_dir / f"{vm.name}-1" / "console.log",
            )
            yield vm.name, domain_xml(cfg)
            continue
        image = cached_linux_image()
        if image is not None:
            kernel, initrd, cmdline, note = image.kernel, image.initrd, image.cmdline, ""
        else:
            where = image_cache.entry_dir(IMAGE_NAME, recipe_digest())
            kernel, initrd, cmdline = (
                where / "vmlinuz",
                where / "initrd.cpio",
                load_recipe().cmdline,
            )
            note = "<!-- image not built yet: `harness image build linux` creates these paths -->\n"
        cfg = configs.linux_config(
            name=name,
            accelerator=accelerator(vm.accelerator),
            memory_mib=vm.memory_mib,
            vcpus=vm.vcpus,
            kernel=kernel,
            initrd=initrd,
            cmdline=cmdline,
            overlay=run_dir / f"{vm.name}.qcow2",
            console_log=run_dir / f"{vm.name}.console.log",
            ssh_port=2222,
        )
        yield vm.name, note + domain_xml(cfg)
