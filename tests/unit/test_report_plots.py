"""The report's plots: each draws a real PNG with matplotlib (decoded here with Pillow).

The browser tests cover plots of real results; these cover the kinds this host
cannot produce from a real run (latency histograms, changes with intervals).
"""

from __future__ import annotations

import io

import pytest
from PIL import Image

from harness.report import plots
from harness.trace.model import HistBucketModel, ProbeStacks, StackCount

BUCKETS = [HistBucketModel(low=256, high=511, count=40), HistBucketModel(low=512, high=1023,
                                                                         count=7),
           HistBucketModel(low=None, high=0, count=1)]


def size(p: plots.Plot) -> tuple[int, int]:
    with Image.open(io.BytesIO(p.png)) as im:
        im.load()
        return im.size


@pytest.mark.parametrize("make", [
    lambda: plots.stacked_bars("x", "exits", ["a", "b"], {"EPT": [3, 0], "IO": [1, 2]}, "n"),
    lambda: plots.histograms("h", "latency", {"touch": BUCKETS, "retouch": BUCKETS[:1]}),
    lambda: plots.histogram_overlay("o", "moved", BUCKETS, BUCKETS[1:]),
    lambda: plots.repetitions("m", "metrics", {"rate": {"p1": [1.0, 2.0], "p2": [3.0]},
                                               "n": {"p1": [4.0]}}),
    lambda: plots.forest("f", "changes", [("a", 0.2, 0.1, 0.3, "regression"),
                                          ("b", -0.1, None, None, "improvement")]),
    lambda: plots.icicle("i", "paths", ProbeStacks(
        events=5, stacked=5, truncated=0, depth=3,
        stacks=[StackCount(frames=["ioctl", "kvm_mmu_load", "get_page"], count=4),
                StackCount(frames=["ioctl", "reset"], count=1)])),
])
def test_every_plot_kind_is_a_non_empty_png(make: object) -> None:
    p = make()  # type: ignore[operator]
    assert p.png[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = size(p)
    assert w > 100 and h > 100


def test_plot_names_are_file_safe() -> None:
    assert plots.slug("micro/touch-16 [mib=2]: kvm_mmu_get_page") == \
        "micro-touch-16-mib-2-kvm-mmu-get-page"
    assert plots.slug("///") == "plot"
