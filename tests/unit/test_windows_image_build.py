"""`harness image build windows` around Windows Setup: inputs, answer file, answer CD, manifest.

Windows Setup itself needs a Windows ISO, which these machines cannot have;
it is replaced by INSTALL_DOUBLE (named as a double), which reads the real
answer CD the build made. The ISOs are real ISO 9660 images made here with
xorriso; the certificate, autounattend.xml and tools are the build's own.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from harness.cli import main
from harness.image.windows import (
    PASSWORD_ENV,
    PASSWORD_FILE_ENV,
    WindowsImageError,
    cached_windows_image,
)
from harness.image.windows_build import (
    SETTINGS_OFF,
    SETUP_SCRIPT,
    BuildInputs,
    build_windows_image,
    check_inputs,
    render_autounattend,
)

pytestmark = [pytest.mark.requires(tools=["xorriso", "qemu-img", "x86_64-w64-mingw32-gcc"]),
              pytest.mark.timeout(180)]

PASSWORD = "S3cret<&\"'pw-4711"
UNATTEND_NS = {"u": "urn:schemas-microsoft-com:unattend"}


def make_iso(path: Path, label: str) -> Path:
    src = path.with_suffix(".d")
    src.mkdir()
    (src / "README.TXT").write_text(label)
    subprocess.run(["xorriso", "-as", "mkisofs", "-quiet", "-V", label, "-o", str(path),
                    str(src)], check=True)
    return path


@pytest.fixture
def isos(tmp_path: Path) -> tuple[Path, Path]:
    return make_iso(tmp_path / "win.iso", "WIN"), make_iso(tmp_path / "virtio.iso", "VIRTIO")


def secret_forms(password: str) -> list[bytes]:
    """The password as text, UTF-16LE and in Windows Setup's base64 encodings."""
    forms = [password.encode(), password.encode("utf-16-le")]
    for suffix in ("AdministratorPassword", "Password"):
        forms.append(base64.b64encode((password + suffix).encode("utf-16-le")))
    return forms


def inputs(isos: tuple[Path, Path], **kw: str) -> BuildInputs:
    return check_inputs(isos[0], isos[1], kw.get("edition", "Windows 11 Pro"),
                        env={PASSWORD_ENV: PASSWORD})


# -- inputs, before anything boots ------------------------------------------------------


def test_missing_iso_names_the_option_and_a_fix(tmp_path: Path, isos: tuple[Path, Path]) -> None:
    with pytest.raises(WindowsImageError, match=r"--iso .*no such file.*fix:"):
        check_inputs(tmp_path / "nope.iso", isos[1], "Windows 11 Pro", env={PASSWORD_ENV: "x"})
    with pytest.raises(WindowsImageError, match=r"--virtio-iso is required"):
        check_inputs(isos[0], None, "Windows 11 Pro", env={PASSWORD_ENV: "x"})


def test_not_an_iso_is_refused(tmp_path: Path, isos: tuple[Path, Path]) -> None:
    fake = tmp_path / "fake.iso"
    fake.write_bytes(b"\0" * 70000)
    with pytest.raises(WindowsImageError, match="not an ISO 9660 image"):
        check_inputs(fake, isos[1], "Windows 11 Pro", env={PASSWORD_ENV: "x"})


def test_wrong_iso_digest_is_refused(isos: tuple[Path, Path]) -> None:
    with pytest.raises(WindowsImageError, match="expected 00000") as info:
        check_inputs(isos[0], isos[1], "Windows 11 Pro", iso_sha256="0" * 64,
                     env={PASSWORD_ENV: PASSWORD})
    assert PASSWORD not in str(info.value)
    good = hashlib.sha256(isos[0].read_bytes()).hexdigest()
    assert check_inputs(isos[0], isos[1], "Windows 11 Pro", iso_sha256=good.upper(),
                        env={PASSWORD_ENV: PASSWORD}).iso_sha256 == good


def test_no_password_names_both_ways_to_give_one(isos: tuple[Path, Path]) -> None:
    with pytest.raises(WindowsImageError) as info:
        check_inputs(isos[0], isos[1], "Windows 11 Pro", env={})
    assert PASSWORD_ENV in str(info.value) and PASSWORD_FILE_ENV in str(info.value)


def test_password_file_must_be_private(tmp_path: Path, isos: tuple[Path, Path]) -> None:
    pw = tmp_path / "pw"
    pw.write_text(PASSWORD + "\n")
    pw.chmod(0o644)
    with pytest.raises(WindowsImageError, match="chmod 600") as info:
        check_inputs(isos[0], isos[1], "Windows 11 Pro", env={PASSWORD_FILE_ENV: str(pw)})
    assert PASSWORD not in str(info.value)
    pw.chmod(0o600)
    got = check_inputs(isos[0], isos[1], "Windows 11 Pro", env={PASSWORD_FILE_ENV: str(pw)})
    assert got.password == PASSWORD and PASSWORD not in repr(got)


def test_edition_with_markup_is_refused(isos: tuple[Path, Path]) -> None:
    with pytest.raises(WindowsImageError, match="--edition"):
        check_inputs(isos[0], isos[1], "Pro</Value><x>", env={PASSWORD_ENV: "x"})


# -- the answer file ---------------------------------------------------------------------


def test_autounattend_is_well_formed_and_has_the_settings(isos: tuple[Path, Path]) -> None:
    xml = render_autounattend(inputs(isos))
    root = ET.fromstring(xml)
    passes = {s.get("pass") for s in root.findall("u:settings", UNATTEND_NS)}
    assert passes == {"windowsPE", "specialize", "oobeSystem"}
    assert root.findtext(".//u:MetaData/u:Value", namespaces=UNATTEND_NS) == "Windows 11 Pro"
    drivers = [p.text or "" for p in root.iterfind(".//u:PathAndCredentials/u:Path", UNATTEND_NS)]
    assert any("viostor" in d for d in drivers) and any("NetKVM" in d for d in drivers)
    admin = root.find(".//u:AdministratorPassword", UNATTEND_NS)
    assert admin is not None and admin.findtext("u:PlainText", namespaces=UNATTEND_NS) == "false"
    value = admin.findtext("u:Value", namespaces=UNATTEND_NS) or ""
    assert base64.b64decode(value).decode("utf-16-le") == PASSWORD + "AdministratorPassword"
    assert PASSWORD not in xml and "<Type>EFI</Type>" in xml
    cmd = root.findtext(".//u:FirstLogonCommands//u:CommandLine", namespaces=UNATTEND_NS) or ""
    assert "setup-winrm.ps1" in cmd and "kvm-harness-answer.txt" in cmd


def test_setup_script_sets_up_winrm_https_and_turns_off_what_is_recorded() -> None:
    script = SETUP_SCRIPT.read_text()
    assert "-Transport HTTPS" in script and "-LocalPort 5986" in script
    assert "Transport=HTTP'" in script  # the plain-HTTP listener is removed
    assert "AllowUnencrypted $false" in script
    for setting in SETTINGS_OFF:  # each change is tagged with its manifest name
        assert f"# {setting}" in script, setting


# -- the whole build around Windows Setup ------------------------------------------------


class InstallDouble:
    """INSTALL_DOUBLE: stands for Windows Setup; reads the real answer CD, writes the disk."""

    def __init__(self, fail: bool = False) -> None:
        self.calls = 0
        self.fail = fail
        self.answer_files: list[str] = []

    def __call__(self, inputs: BuildInputs, staging: Path, disk: Path, answer: Path,
                 fingerprint: str, progress: object) -> str:
        self.calls += 1
        listing = subprocess.run(["xorriso", "-indev", str(answer), "-ls", "/", "/tools"],
                                 capture_output=True, text=True, check=True).stdout
        self.answer_files = sorted(n.strip("'") for n in listing.split())
        out = staging / "extracted.xml"
        subprocess.run(["xorriso", "-osirrox", "on", "-indev", str(answer),
                        "-extract", "/autounattend.xml", str(out)], capture_output=True, check=True)
        ET.parse(out)
        out.unlink()
        if self.fail:
            raise WindowsImageError("Windows Setup failed (double)")
        return "10.0.22631.2861"


def test_build_writes_a_manifest_with_the_pinned_fingerprint_and_no_secret(
    tmp_path: Path, isos: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    said: list[str] = []
    double = InstallDouble()
    cache = tmp_path / "cache"
    image = build_windows_image(inputs(isos), double, progress=said.append, cache=cache)
    assert double.calls == 1
    assert {"autounattend.xml", "setup-winrm.ps1", "listener.pfx", "kvm-harness-answer.txt",
            "kvm-marker.exe", "kvm-phase.exe", "page-touch-win.exe", "cr3-pingpong-win.exe"} <= set(
                double.answer_files)
    manifest = json.loads((image.directory / "manifest.json").read_text())
    cert = x509.load_pem_x509_certificate((image.directory / manifest["winrm_cert"]).read_bytes())
    assert manifest["winrm_cert_sha256"] == hashlib.sha256(
        cert.public_bytes(Encoding.DER)).hexdigest() == image.winrm_cert_sha256
    assert manifest["settings"] == list(SETTINGS_OFF) and image.build == "10.0.22631.2861"
    left = sorted(p.name for p in image.directory.iterdir())
    assert left == ["SHA256SUMS", "disk.qcow2", "manifest.json", "winrm-listener.crt"]
    for f in image.directory.iterdir():
        data = f.read_bytes()
        assert not any(form in data for form in secret_forms(PASSWORD)), f
    assert not any(PASSWORD in line for line in said) and PASSWORD not in caplog.text
    assert cached_windows_image(cache) == image
    # cached: Setup does not run again
    assert build_windows_image(inputs(isos), double, progress=said.append, cache=cache) == image
    assert double.calls == 1


def test_failed_install_leaves_nothing(tmp_path: Path, isos: tuple[Path, Path]) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(WindowsImageError, match="double") as info:
        build_windows_image(inputs(isos), InstallDouble(fail=True), progress=lambda s: None,
                            cache=cache)
    assert PASSWORD not in str(info.value)
    assert [p.name for p in (cache / "images").iterdir() if not p.name.endswith(".lock")] == []
    assert cached_windows_image(cache) is None


def test_cli_bad_input_exits_2_before_anything(tmp_path: Path, isos: tuple[Path, Path]) -> None:
    r = CliRunner().invoke(main, ["image", "build", "windows", "--virtio-iso", str(isos[1])],
                           env={PASSWORD_ENV: PASSWORD, "HARNESS_CACHE": str(tmp_path / "c")})
    assert r.exit_code == 2 and "--iso is required" in r.output and PASSWORD not in r.output
    r = CliRunner().invoke(main, ["image", "build", "windows", "--iso", str(isos[0]),
                                  "--virtio-iso", str(isos[1])],
                           env={PASSWORD_ENV: "", PASSWORD_FILE_ENV: "",
                                "HARNESS_CACHE": str(tmp_path / "c")})
    assert r.exit_code == 2 and PASSWORD_ENV in r.output
    assert not (tmp_path / "c").exists()  # nothing made
