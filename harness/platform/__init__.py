"""Guest platforms, one module per kind of guest, found by the suite's ``image`` value.

Adding a kind (Windows, a paging micro guest) means one module and one line
in :data:`PLATFORMS`; the orchestrator does not change.
"""

from __future__ import annotations

from harness.platform.base import Platform
from harness.platform.cloud import CloudPlatform
from harness.platform.linux import LinuxPlatform
from harness.platform.micro import MicroPlatform
from harness.platform.paging import PagingPlatform
from harness.platform.windows import WindowsPlatform

#: Image kind -> the platform that boots it.
PLATFORMS: dict[str, Platform] = {
    p.kind: p
    for p in (LinuxPlatform(), MicroPlatform(), PagingPlatform(), WindowsPlatform(),
              CloudPlatform())
}


def platform_for(image: str) -> Platform:
    """The platform of a VM's ``image``; spec validation guarantees one exists."""
    try:
        return PLATFORMS[image]
    except KeyError:
        raise KeyError(
            f"no platform for image {image!r} (known: {', '.join(sorted(PLATFORMS))})"
        ) from None
