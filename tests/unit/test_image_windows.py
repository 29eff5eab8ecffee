"""The Windows phase-marker tool cross-builds from the shared source."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest

from harness.image.windows import CROSS_CC, CrossBuildError, build_marker_exe

IMAGE_FILE_MACHINE_AMD64 = 0x8664


@pytest.mark.skipif(
    shutil.which(CROSS_CC) is None,
    reason="needs apt-get install gcc-mingw-w64-x86-64-win32 (./bootstrap does)",
)
def test_marker_builds_as_x86_64_windows_console_program(tmp_path: Path) -> None:
    exe = build_marker_exe(tmp_path)
    data = exe.read_bytes()
    assert data[:2] == b"MZ"
    pe = struct.unpack_from("<I", data, 0x3C)[0]
    assert data[pe : pe + 4] == b"PE\0\0"
    assert struct.unpack_from("<H", data, pe + 4)[0] == IMAGE_FILE_MACHINE_AMD64
    optional = pe + 24
    subsystem = struct.unpack_from("<H", data, optional + 68)[0]
    assert subsystem == 3  # IMAGE_SUBSYSTEM_WINDOWS_CUI: a console program WinRM can run


def test_missing_cross_compiler_says_what_to_install(tmp_path: Path) -> None:
    with pytest.raises(CrossBuildError, match="apt-get install gcc-mingw-w64-x86-64-win32"):
        build_marker_exe(tmp_path, cc="no-such-mingw-gcc")
