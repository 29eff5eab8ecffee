"""Benchmarks boot real guests: they share the integration tests' image fixture."""

from tests.integration.conftest import linux_image, nothing_left_behind

__all__ = ["linux_image", "nothing_left_behind"]
