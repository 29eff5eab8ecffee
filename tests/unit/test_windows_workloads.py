"""The Windows workload programs, cross-built with mingw-w64 and run under Wine (wine64).

Wine runs them on real Windows API semantics (VirtualAlloc, CreateProcess,
events, GetProcessMemoryInfo), short of a VM: their real output goes through
each workload's own metric regexes, as a run would parse it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import metrics
from harness.image.windows import (
    CROSS_CC,
    WORKLOAD_PROGRAMS,
    build_phase_exe,
    build_workload_exes,
)
from harness.paths import WORKLOADS_DIR
from harness.spec import load_workload
from tests.conftest import prerequisite_missing

WINE = "/usr/lib/wine/wine64"  # Debian's wine64 package; not on PATH without the wine wrapper

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def wine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    if shutil.which(CROSS_CC) is None:
        prerequisite_missing(f"{CROSS_CC} is not installed")
    if not os.access(WINE, os.X_OK):
        prerequisite_missing("wine64 is not installed")
    prefix = tmp_path_factory.mktemp("wineprefix")
    env = {**os.environ, "WINEPREFIX": str(prefix), "WINEDEBUG": "-all", "DISPLAY": ""}
    # One wineserver and one set of Wine's own services for the module: otherwise each
    # program starts them anew (about 2 s each). Started with no pipe of a test's, since
    # the services outlive the program that started them.
    subprocess.run(["/usr/lib/wine/wineserver64", "-p"], env=env, check=True, timeout=60)
    subprocess.run([WINE, "wineboot", "--init"], env=env, check=True, timeout=120,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    yield env
    subprocess.run(["/usr/lib/wine/wineserver64", "-k"], env=env, check=False)


@pytest.fixture(scope="module")
def exes(tmp_path_factory: pytest.TempPathFactory, wine: dict[str, str]) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("exes")
    return {p.stem: p for p in build_workload_exes(out)}


def run_phase(
    name: str, params: dict[str, str | int | float], exes: dict[str, Path], env: dict[str, str]
) -> tuple[subprocess.CompletedProcess[str], metrics.Extraction]:
    """The workload's only phase, its Windows path swapped for the built exe, under Wine."""
    spec = load_workload(WORKLOADS_DIR / f"{name}.toml")
    phase = spec.phases[0]
    command = spec.render(phase, {**spec.defaults(), **params})
    prefix = f"C:\\kvm-harness\\{name}.exe "
    assert command.startswith(prefix), command
    argv = [WINE, str(exes[name]), *command[len(prefix):].split()]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    return proc, metrics.extract_checked(phase, proc.stdout + "\n" + proc.stderr)


def test_every_workload_has_a_program() -> None:
    for name in WORKLOAD_PROGRAMS:
        assert (WORKLOADS_DIR / f"{name}.toml").is_file()
        assert load_workload(WORKLOADS_DIR / f"{name}.toml").guest == "windows"


@pytest.mark.parametrize("mib", [1, 24])
def test_page_touch_win_touches_what_it_was_asked(
    mib: int, exes: dict[str, Path], wine: dict[str, str]
) -> None:
    proc, got = run_phase("page-touch-win", {"mib": mib, "passes": 2}, exes, wine)
    assert proc.returncode == 0, proc.stderr
    assert got.problems == {} and got.missing == []
    assert got.values["touched_bytes"] == mib * 1024 * 1024
    assert got.values["first_touch_mib_per_s"] > 0 and got.values["retouch_mib_per_s"] > 0


def test_page_touch_win_large_pages_without_the_privilege_fail_clearly(
    exes: dict[str, Path], wine: dict[str, str]
) -> None:
    proc, got = run_phase("page-touch-win", {"mib": 2, "pages": "large"}, exes, wine)
    assert proc.returncode == 1 and "SeLockMemoryPrivilege" in proc.stderr
    assert "touched_bytes" in got.missing


def test_page_touch_win_bad_input_exits_2(exes: dict[str, Path], wine: dict[str, str]) -> None:
    proc = subprocess.run([WINE, str(exes["page-touch-win"]), "--mib", "0"], env=wine,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--mib" in proc.stderr


def test_membw_win_checks_its_answer(exes: dict[str, Path], wine: dict[str, str]) -> None:
    proc, got = run_phase("membw-win", {"mib": 2, "times": 2}, exes, wine)
    assert proc.returncode == 0, proc.stderr
    assert got.problems == {}
    assert got.values["checked_elements"] == 2 * 1024 * 1024 // 8
    assert all(got.values[f"{k}_mb_per_s"] > 0 for k in ("copy", "scale", "add", "triad"))


def test_proc_churn_win_counts_its_children(exes: dict[str, Path], wine: dict[str, str]) -> None:
    proc, got = run_phase("proc-churn-win", {"count": 5}, exes, wine)
    assert proc.returncode == 0, proc.stderr
    assert got.problems == {} and got.values["processes"] == 5
    assert got.values["processes_per_s"] > 0


def test_cr3_pingpong_win_switches_twice_per_round(
    exes: dict[str, Path], wine: dict[str, str]
) -> None:
    proc, got = run_phase("cr3-pingpong-win", {"rounds": 500}, exes, wine)
    assert proc.returncode == 0, proc.stderr
    assert got.problems == {} and got.values["switches"] == 1000
    assert got.values["switches_per_s"] > 0


# -- the phase wrapper on Windows command-line semantics (Wine's cmd.exe) -------------------

#: Starts "cmd.exe /c <text of a file>" with CreateProcess, as WinRS starts a command.
WINRS_LAUNCH_C = r"""
#include <windows.h>
#include <stdio.h>
int main(int argc, char **argv) {
	static char line[32768] = "cmd.exe /c ";
	FILE *f = fopen(argv[1], "rb");
	size_t n = fread(line + 11, 1, sizeof(line) - 12, f);
	STARTUPINFOA si = {sizeof(si)};
	PROCESS_INFORMATION pi;
	DWORD code = 255;
	(void)argc;
	line[11 + n] = 0;
	if (!CreateProcessA(NULL, line, NULL, NULL, FALSE, 0, NULL, NULL, &si, &pi)) return 254;
	WaitForSingleObject(pi.hProcess, INFINITE);
	GetExitCodeProcess(pi.hProcess, &code);
	return (int)code;
}
"""
#: MARKER DOUBLE: stands for kvm-marker.exe (whose cpuid only a hypervisor sees); it
#: appends its arguments to C:\kvm-harness\markers.log, so their order can be read.
MARKER_DOUBLE_C = r"""
#include <stdio.h>
int main(int argc, char **argv) {
	FILE *f = fopen("C:\\kvm-harness\\markers.log", "a");
	if (f == NULL || argc != 3) return 2;
	fprintf(f, "%s %s\n", argv[1], argv[2]);
	return fclose(f) != 0;
}
"""


def _cross(src: str, exe: Path) -> Path:
    c = exe.with_suffix(".c")
    c.write_text(src)
    subprocess.run([CROSS_CC, "-O2", "-static", "-o", str(exe), str(c)], check=True)
    return exe


@pytest.fixture(scope="module")
def launch(tmp_path_factory: pytest.TempPathFactory, wine: dict[str, str]) -> Path:
    """The WinRS stand-in; the marker double and the phase wrapper in C:\\kvm-harness."""
    tools = Path(wine["WINEPREFIX"]) / "drive_c" / "kvm-harness"
    tools.mkdir(parents=True, exist_ok=True)
    _cross(MARKER_DOUBLE_C, tools / "kvm-marker.exe")
    build_phase_exe(tools)
    return _cross(WINRS_LAUNCH_C, tmp_path_factory.mktemp("winrs") / "winrs-launch.exe")


@pytest.mark.parametrize(("command", "status"), [
    ("echo in-phase & exit /b 3", 3),  # the closing marker runs all the same
    ("echo in-phase", 0),
    ('echo "in-phase & <quoted>" & echo ^%x^% 100%% & exit 4', 4),  # nothing escapes early
])
def test_phase_command_marks_around_and_keeps_the_exit_status(
    tmp_path: Path, wine: dict[str, str], launch: Path, command: str, status: int
) -> None:
    from harness.guest.winrm import Secret, WinrmGuest, WinrmTarget

    tools = Path(wine["WINEPREFIX"]) / "drive_c" / "kvm-harness"
    (tools / "markers.log").unlink(missing_ok=True)
    guest = WinrmGuest(WinrmTarget("127.0.0.1", 1, "u", Secret("p"), "ab" * 32))
    line = tmp_path / "line.txt"
    line.write_text(guest.phase_command(command, 17, 2))
    proc = subprocess.run([WINE, str(launch), "Z:" + str(line).replace("/", "\\")], env=wine,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == status, proc.stdout + proc.stderr
    assert "in-phase" in proc.stdout
    assert (tools / "markers.log").read_text().split("\n") == ["17 2", "17 0", ""]
