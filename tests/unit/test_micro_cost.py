"""The micro guest's exact per-phase cost, derived from micro.asm (harness/image/micro.py)."""

from __future__ import annotations

import pytest

from harness.image.micro import (
    INSNS_TO_HALT,
    MicroImageError,
    MicroPhase,
    expected_emulated_insns,
    expected_loop_insns,
)
from tests.unit.test_trace_parse import REAL_RUN


def test_matches_the_stored_real_capture() -> None:
    """The capture in test_trace_parse.py: 16 pages x 4, 32 x 4, 16 x 8, bpftrace, PVM host.

    Its ``@ev`` keys are (pid, guest phase, host phase, probe); probe 6 is
    kvm_emulate_insn. Every count is the derivation's, to the instruction.
    """
    assert '"6999,1,1,6": 393760' in REAL_RUN
    assert '"6999,2,1,6": 787488' in REAL_RUN
    assert '"6999,3,1,6": 787503' in REAL_RUN
    phases = [MicroPhase("a", 16, 4), MicroPhase("b", 32, 4), MicroPhase("c", 16, 8)]
    expected = expected_emulated_insns(phases)
    assert {k: expected[k] for k in (1, 2, 3)} == {1: 393_760, 2: 787_488, 3: 787_503}


def test_per_pass_and_last_phase_terms() -> None:
    # loop + 4 x repeat + 16; the last phase's closing marker 0 has no `or cx, si`.
    one = [MicroPhase("only", 1, 1)]
    assert expected_emulated_insns(one) == {0: 30, 1: 6152 + 4 + 15}
    two = [MicroPhase("a", 2, 3), MicroPhase("b", 2, 3)]
    loop = expected_loop_insns(two[0])
    assert expected_emulated_insns(two) == {0: 30, 1: loop + 12 + 16, 2: loop + 12 + 15}


@pytest.mark.parametrize("repeat", [13, 100, 0xFFFF])
def test_large_repeats_leave_the_old_band(repeat: int) -> None:
    """From repeat 13 on the exact cost exceeds loop + 64, which a band once required."""
    ph = MicroPhase("many", 1, repeat)
    cost = expected_emulated_insns([ph])[1]
    assert cost == expected_loop_insns(ph) + 4 * repeat + 15
    assert cost > expected_loop_insns(ph) + 64


def test_bad_phases_are_refused() -> None:
    with pytest.raises(MicroImageError, match="pages"):
        expected_emulated_insns([MicroPhase("x", 0, 1)])


def test_a_rom_boot_to_the_halt_in_all() -> None:
    """What QEMU's own insn_emulation counter showed for 1 x 1 and 2 x 1 pages, halted."""
    phases = [MicroPhase("a", 1, 1), MicroPhase("b", 2, 1)]
    assert sum(expected_emulated_insns(phases).values()) + INSNS_TO_HALT == 18_527
