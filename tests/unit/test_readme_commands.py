"""The README's command summary is what the CLI does: every command and option it
lists exists (as `harness ... --help` shows it), documented choices are the CLI's
choices, and the documented exit codes hold for cheap cases (no VMs)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from harness.cli import main
from harness.results import write_atomic
from tests.unit.synthetic_results import STEADY, result, side

README = Path(__file__).resolve().parents[2] / "README.md"


@dataclass(frozen=True)
class Documented:
    """One `harness ...` line of the summary (continuation lines joined), comment cut."""

    text: str
    path: tuple[str, ...]  # the command words, e.g. ("host", "plan")
    command: click.Command
    rest: str  # what follows the command words: arguments and options


def summary_block(readme: str) -> list[str]:
    """The indented lines of the first code block under "## Using it"."""
    section = readme.split("\n## Using it", 1)[1].split("\n## ", 1)[0]
    lines = section.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("    harness "))
    block: list[str] = []
    for ln in lines[start:]:
        if ln.strip() and not ln.startswith("    "):
            break
        block.append(ln)
    return block


def documented_commands(readme: str) -> list[Documented]:
    """Every command line of the summary, resolved against the click CLI."""
    joined: list[str] = []
    for ln in summary_block(readme):
        code = ln.split(" #", 1)[0].strip()
        if not code:
            continue
        if code.startswith("harness "):
            joined.append(code)
        else:  # a continuation of the line above
            joined[-1] += " " + code
    out = []
    for text in joined:
        words = text.split()[1:]
        cmd: click.Command = main
        path: list[str] = []
        while isinstance(cmd, click.Group) and words and words[0] in cmd.commands:
            path.append(words[0])
            cmd = cmd.commands[words.pop(0)]
        assert path, f"README: {text!r} names no harness command"
        out.append(Documented(text, tuple(path), cmd, " ".join(words)))
    return out


COMMANDS = documented_commands(README.read_text())


def ids(d: Documented) -> str:
    return " ".join(d.path)


def test_the_summary_is_found_and_covers_the_main_commands() -> None:
    paths = {d.path for d in COMMANDS}
    for expected in [("run",), ("compare",), ("validate",), ("stacks",), ("vm", "xml"),
                     ("probes",), ("doctor",), ("cache", "prune"), ("host", "plan")]:
        assert expected in paths, f"README's command summary lacks harness {' '.join(expected)}"


@pytest.mark.parametrize("doc", COMMANDS, ids=ids)
def test_every_documented_option_exists(doc: Documented) -> None:
    help_text = CliRunner().invoke(main, [*doc.path, "--help"]).output
    opts = {o for p in doc.command.params if isinstance(p, click.Option) for o in p.opts}
    documented = re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", doc.rest)
    for opt in documented:
        assert opt in opts, f"README: `{doc.text}`: {opt} is no option of harness {ids(doc)}"
        assert re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", help_text), (
            f"{opt} is not shown by harness {ids(doc)} --help"
        )


@pytest.mark.parametrize("doc", COMMANDS, ids=ids)
def test_every_option_of_a_documented_command_is_in_the_readme(doc: Documented) -> None:
    """The other way round: an option the CLI offers is named in the summary or the text."""
    readme = README.read_text()
    for param in doc.command.params:
        if not isinstance(param, click.Option) or param.hidden:
            continue
        longest = max(param.opts, key=len)
        if longest == "--help":
            continue
        assert re.search(rf"(?<![\w-]){re.escape(longest)}(?![\w-])", readme), (
            f"harness {ids(doc)} {longest} is not in README.md (add it to the command summary)"
        )


@pytest.mark.parametrize("doc", COMMANDS, ids=ids)
def test_documented_arguments_and_choices_are_the_clis(doc: Documented) -> None:
    args = [p for p in doc.command.params if isinstance(p, click.Argument)]
    names = {a.name.upper() for a in args if a.name}
    # Placeholders in capitals name the command's arguments (SUITE, BASE, RESULT, ...).
    for word in re.findall(r"(?<![-\w=.])\[?([A-Z][A-Z_]+)\]?(?![\w=.])", doc.rest):
        before = doc.rest.split(word)[0].rstrip(" [")
        if re.search(r"--?[\w-]+$", before):
            continue  # an option's value (--output FILE)
        assert word in names, f"README: `{doc.text}`: {word} is no argument of {ids(doc)}"
    # A literal argument value (image build linux) must be one the CLI takes.
    leading = doc.rest.split("[", 1)[0].split()
    for word in leading:
        if word.isupper() or word.startswith("-"):
            continue
        choices = [c for a in args if isinstance(a.type, click.Choice) for c in a.type.choices]
        assert word in choices, f"README: `{doc.text}`: {word!r} is not accepted"
    # `--opt a|b|c` lists exactly the option's choices.
    for opt, alts in re.findall(r"(--[\w-]+) ([\w-]+(?:\|[\w-]+)+)", doc.rest):
        param = next(p for p in doc.command.params if opt in getattr(p, "opts", []))
        assert isinstance(param.type, click.Choice), f"{opt} takes no fixed choices"
        assert set(alts.split("|")) == set(param.type.choices), (
            f"README: {opt} {alts} but the CLI takes {'|'.join(param.type.choices)}"
        )


@pytest.mark.parametrize("doc", COMMANDS, ids=ids)
def test_documented_option_values_are_accepted(doc: Documented) -> None:
    """A concrete value the summary shows (--threshold 5%) passes the option's own parsing."""
    for opt, value in re.findall(r"(--[\w-]+) ([0-9][^\]\s]*)", doc.rest):
        param = next(p for p in doc.command.params if opt in getattr(p, "opts", []))
        ctx = click.Context(doc.command)
        param.process_value(ctx, value)  # raises click.BadParameter if refused


# --- the documented exit codes, on cheap cases ----------------------------------------


def test_compare_exit_codes_are_the_documented_ones(tmp_path: Path) -> None:
    """README: 0 no regression, 1 a regression, 2 unfair comparison or bad input."""
    base = side(tmp_path / "a", STEADY)
    slower = side(tmp_path / "b", [v * 0.8 for v in STEADY])
    other_image = tmp_path / "c"
    other_image.mkdir()
    for i, v in enumerate(STEADY):
        r = result(f"c-{i}", v)
        r.vms[0].image_digest = "b" * 64
        write_atomic(r, other_image / f"c-{i}.json")

    def status(*args: str) -> int:
        return CliRunner().invoke(main, ["compare", *args]).exit_code

    assert status(str(base), str(base)) == 0
    assert status(str(base), str(slower)) == 1
    assert status(str(base), str(other_image)) == 2  # another guest image: unfair
    assert status(str(base), str(tmp_path / "missing.json")) == 2
    assert status(str(base), str(base), "--format", "pdf") == 2


def test_bad_input_exits_2(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text('name = "x"\n[[vms]]\nname = "g"\nvcpus = 0\n')
    host_changing = tmp_path / "host.toml"
    host_changing.write_text('name = "h"\n[[vms]]\nname = "g"\n[[runs]]\nworkload = "page-touch"\n'
                             'vm = "g"\n[[host_configs]]\nname = "thp"\nthp = "never"\n')
    bad_result = tmp_path / "bad.json"
    bad_result.write_text("{not json")
    cases = [
        ["validate", str(broken)],
        ["validate", str(tmp_path / "nope.toml")],
        ["validate", "--set", "page-touch.mib=0"],
        ["vm", "xml", str(broken)],
        ["vm", "xml", "--vm", "nope"],
        ["host", "plan", str(broken)],
        ["run", str(broken)],
        ["run", "--stacks", "nope"],
        ["run", str(host_changing)],  # without --allow-host-changes
        ["stacks", str(bad_result)],
        ["compare", str(bad_result), str(bad_result)],
        ["compare", "--threshold", "5", str(bad_result), str(bad_result)],
    ]
    for args in cases:
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 2, f"harness {' '.join(args)}: {res.exit_code}\n{res.output}"
        assert "Traceback" not in res.output


def test_validate_of_a_good_suite_exits_0() -> None:
    assert CliRunner().invoke(main, ["validate"]).exit_code == 0


def test_tracked_files_do_not_include_tox_state() -> None:
    """tox rewrites `.venv` (a redirect to its env) on every run: it must be ignored, not
    tracked, or every tox run leaves the checkout dirty."""
    import subprocess

    root = README.parent
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "-C", str(root), "ls-files", "--", ".venv", ".tox"],
                             capture_output=True, text=True, check=True).stdout
    assert tracked == ""
    ignored = subprocess.run(["git", "-C", str(root), "check-ignore", "-q", "--no-index",
                              ".venv"], check=False)
    assert ignored.returncode == 0, ".venv is not in .gitignore"
