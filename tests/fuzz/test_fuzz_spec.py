"""Fuzz the spec doors: suite TOML, workload TOML (through the real loader) and ``--set``.

Property: a valid Suite, or a SpecError naming the file (the CLI prints it and exits 2);
never another exception, a hang or a file read outside the catalogue.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from harness.spec import SpecError, Suite, load_suite, load_workload
from harness.trace.probes import MAX_STACK_PERIOD, MAX_STACK_RATE, split_stack_entry
from tests.fuzz.strategies import NASTY_TEXT, TOML_VALUES, tally, toml_document

pytestmark = pytest.mark.timeout(120)

SUITE: dict[str, Any] = {
    "name": "s",
    "repetitions": 1,
    "workload_dirs": ["wl"],
    "vms": [{"name": "g", "image": "linux", "vcpus": 1, "memory_mib": 512}],
    "runs": [{"workload": "w", "vm": "g", "params": {"mib": 32}}],
    "trace": {"probes": ["default"], "stacks": []},
}
WORKLOAD: dict[str, Any] = {
    "name": "w",
    "guest": "linux",
    "params": {"mib": {"type": "int", "default": 64, "min": 1, "max": 1024},
               "label": "x"},
    "phases": [{"name": "run", "command": "page-touch --mib {mib} --label {label}",
                "timeout_s": 30,
                "metrics": [{"name": "rate", "regex": r"rate=([\d.]+)", "unit": "MiB/s"}]}],
}


def paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key/index path in ``doc`` (iteratively)."""
    out: list[tuple[Any, ...]] = []
    todo = [(prefix, doc)]
    while todo:
        at, value = todo.pop()
        items = value.items() if isinstance(value, dict) else (
            enumerate(value) if isinstance(value, list) else ())
        for k, v in items:
            out.append((*at, k))
            todo.append(((*at, k), v))
    return sorted(out, key=str)


def mutate(doc: dict[str, Any], data: st.DataObject, rounds: int = 3) -> dict[str, Any]:
    """``doc`` with up to ``rounds`` values replaced, deleted or keys added."""
    doc = copy.deepcopy(doc)
    for _ in range(data.draw(st.integers(0, rounds))):
        where = data.draw(st.sampled_from(paths(doc)))
        parent: Any = doc
        for k in where[:-1]:
            parent = parent[k]
        op = data.draw(st.sampled_from(["replace", "delete", "add"]))
        if op == "replace":
            parent[where[-1]] = data.draw(TOML_VALUES)
        elif op == "delete" and isinstance(parent, dict):
            del parent[where[-1]]
        elif isinstance(parent, dict):
            parent[data.draw(NASTY_TEXT)] = data.draw(TOML_VALUES)
    return doc


@contextmanager
def tree(suite_text: str, workload_text: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="fuzz-spec-") as d:
        root = Path(d)
        (root / "wl").mkdir()
        (root / "wl" / "w.toml").write_text(workload_text)
        (root / "s.toml").write_text(suite_text)
        yield root / "s.toml"


def load_or_spec_error(path: Path, overrides: tuple[str, ...] = ()) -> Suite | SpecError:
    try:
        suite = load_suite(path, overrides)
    except SpecError as exc:
        assert str(exc).startswith(str(path.parent)), str(exc)  # names the file
        tally(f"SpecError: {exc.problems[0].field or exc.problems[0].reason[:20]}")
        return exc
    tally("loaded")
    return suite


def test_the_unmutated_documents_load() -> None:
    with tree(toml_document(SUITE), toml_document(WORKLOAD)) as path:
        suite = load_suite(path, ("w.mib=64",))
    assert suite.spec.runs[0].params["mib"] == 64


@settings(max_examples=150)
@given(st.data())
def test_suite_toml(data: st.DataObject) -> None:
    with tree(toml_document(mutate(SUITE, data)), toml_document(WORKLOAD)) as path:
        load_or_spec_error(path)


@settings(max_examples=150)
@given(st.data())
def test_workload_toml_through_the_suite(data: st.DataObject) -> None:
    with tree(toml_document(SUITE), toml_document(mutate(WORKLOAD, data))) as path:
        got = load_or_spec_error(path)
        if isinstance(got, SpecError):
            with suppress(SpecError):  # the workload file on its own: no other exception
                load_workload(path.parent / "wl" / "w.toml")


@settings(max_examples=100)
@given(st.one_of(st.text(max_size=300), st.binary(max_size=300).map(
    lambda b: b.decode("latin-1"))))
@example("\x00")
@example('name = "s"\nx = ' + "[" * 5000 + "]" * 5000)  # RecursionError in tomllib
@example('name = "s"\nx = ' + "{a = " * 3000 + "1" + "}" * 3000)
def test_any_text_as_a_suite(text: str) -> None:
    with tree(text, toml_document(WORKLOAD)) as path:
        load_or_spec_error(path)


@settings(max_examples=50)
@given(st.binary(max_size=200))
@example(b"\xff\xfe name")  # UnicodeDecodeError before the fix
def test_bytes_that_are_not_utf8(raw: bytes) -> None:
    with tree("", toml_document(WORKLOAD)) as path:
        path.write_bytes(raw)
        load_or_spec_error(path)


@settings(max_examples=150)
@given(st.lists(st.one_of(
    NASTY_TEXT,
    st.builds(lambda p, v: f"w.{p}={v}", st.sampled_from(["mib", "label", "x", ""]), NASTY_TEXT),
    # VM fields (guest kernels): paths, command lines and package names from anywhere.
    st.builds(lambda p, v: f"vm.{p}={v}", st.sampled_from(
        ["kernel", "initrd", "cmdline", "kernel_package", "g.kernel", "h.kernel", "x", ""]),
        NASTY_TEXT),
), max_size=4))
@example(["w.mib=" + "9" * 5000])
@example(["vm.kernel=\x00", "vm.initrd=" + "a" * 5000, "vm.cmdline=\x1b[2J"])
@example(["w.mib=1e999", "w.label=\x1b[2J"])
def test_set_values(overrides: list[str]) -> None:
    with tree(toml_document(SUITE), toml_document(WORKLOAD)) as path:
        got = load_or_spec_error(path, tuple(overrides))
        if isinstance(got, Suite):
            mib = got.spec.runs[0].params["mib"]
            assert isinstance(mib, int) and 1 <= mib <= 1024


#: `[trace] stacks` entries: a probe or group, then nothing, a period (`/N`) or a
#: rate target (`@Rhz`), built from pieces near the valid forms and from anywhere.
STACK_ENTRY = st.one_of(
    NASTY_TEXT,
    st.builds(lambda name, sep, n, unit: f"{name}{sep}{n}{unit}",
              st.sampled_from(["kvm_emulate_insn", "kvm_cpuid", "stacks", "nope", ""]),
              st.sampled_from(["/", "@", "/@", "@/", "", " @ "]),
              st.one_of(st.integers(-5, (1 << 21) + 5).map(str), NASTY_TEXT),
              st.sampled_from(["hz", "Hz", "HZ", "", "khz", " hz", "hz\x00"])),
)


@settings(max_examples=150)
@given(st.lists(STACK_ENTRY, max_size=4))
@example(["kvm_emulate_insn@100001hz"])
@example(["kvm_emulate_insn@0hz", "kvm_emulate_insn/0"])
@example(["kvm_emulate_insn/8@100hz"])
@example(["kvm_emulate_insn@1000hz", "kvm_emulate_insn/61"])
@example(["kvm_emulate_insn@\u0663hz"])  # a non-ASCII digit
def test_stack_entries(entries: list[str]) -> None:
    doc = copy.deepcopy(SUITE)
    doc["trace"] = {"probes": ["all"], "stacks": entries}
    with tree(toml_document(doc), toml_document(WORKLOAD)) as path:
        got = load_or_spec_error(path)
    for entry in entries:
        try:
            parsed = split_stack_entry(entry)
        except ValueError:
            assert not isinstance(got, Suite), f"{entry!r} is refused alone but loaded"
            continue
        assert 1 <= parsed.period <= MAX_STACK_PERIOD
        assert parsed.rate_hz is None or 1 <= parsed.rate_hz <= MAX_STACK_RATE
