"""Cloud VMs in a suite: every bad input names the file, the field and a fix, before any boot.

Disks are real files checked with the real qemu-img (tiny ones, made here).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

import harness.spec as spec_module
from harness.image.cloud_disk import (
    BOOT_SIGNATURE,
    BOOT_SIGNATURE_AT,
    DiskError,
    check_disk,
    disk_sha256,
)
from harness.spec import SpecError, load_suite

WORKLOAD = """\
name = "touch"
guest = "linux"
needs = ["page-touch"]
[[phases]]
name = "run"
command = "page-touch --mib 8"
"""


def suite(tmp_path: Path, vm: str) -> Path:
    path = tmp_path / "suites" / "s.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(
        f'name = "s"\n[[vms]]\nname = "g"\n{vm}\n[[runs]]\nworkload = "touch"\nvm = "g"\n'
    )
    return path


@pytest.fixture(autouse=True)
def catalogue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "touch.toml").write_text(WORKLOAD)
    monkeypatch.setattr(spec_module, "WORKLOADS_DIR", tmp_path)


def qcow2(path: Path, backing: Path | None = None) -> Path:
    argv = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing is not None:
        argv += ["-F", "qcow2", "-b", str(backing)]
    subprocess.run([*argv, str(path), "1M"], check=True)
    return path


def raw_disk(path: Path) -> Path:
    data = bytearray(1 << 20)
    data[BOOT_SIGNATURE_AT:BOOT_SIGNATURE_AT + 2] = BOOT_SIGNATURE
    path.write_bytes(bytes(data))
    return path


def problem(path: Path) -> SpecError:
    with pytest.raises(SpecError) as info:
        load_suite(path)
    return info.value


def test_a_cloud_vm_loads_with_its_disk_read_from_the_suite_directory(tmp_path: Path) -> None:
    (tmp_path / "suites").mkdir()
    qcow2(tmp_path / "suites" / "img.qcow2")
    path = suite(tmp_path, 'image = "cloud"\ndisk = "img.qcow2"\nos_user = "bench"\n'
                 'firmware = "uefi"')
    vm = load_suite(path).spec.vms[0]
    assert vm.disk == tmp_path / "suites" / "img.qcow2"
    assert (vm.firmware, vm.network, vm.packages) == ("uefi", False, [])


def test_a_raw_disk_with_a_partition_table_is_a_disk(tmp_path: Path) -> None:
    info = check_disk(raw_disk(tmp_path / "d.img"))
    assert (info.format, info.virtual_size) == ("raw", 1 << 20)


@pytest.mark.parametrize(
    ("vm", "field", "reason", "fix"),
    [
        ('image = "cloud"\nos_user = "bench"', "vms[0].disk", "boots a disk image it names",
         'disk = "PATH'),
        ('image = "cloud"\ndisk = "x.qcow2"', "vms[0].os_user", "needs the user", "os_user ="),
        ('image = "cloud"\ndisk = "x.qcow2"\nos_user = "Bob Smith"', "vms[0].os_user",
         "not a Unix user name", "lower-case"),
        ('image = "cloud"\ndisk = "x.qcow2"\nos_user = "root"', "vms[0].os_user",
         "root login stays disabled", "name another user"),
        ('image = "cloud"\ndisk = "x.qcow2"\nos_user = "bench"\npackages = ["redis-server"]',
         "vms[0].packages", "has none", "network = true"),
        ('image = "linux"\ndisk = "x.qcow2"', "vms[0].disk", 'image = "cloud" only',
         "drop disk"),
        ('image = "linux"\nnetwork = true', "vms[0].network", 'image = "cloud" only',
         "drop network"),
        ('image = "linux"\nfirmware = "uefi"', "vms[0].firmware", 'image = "cloud" only',
         "drop firmware"),
        ('image = "cloud"\ndisk = "x.qcow2"\nos_user = "bench"\nfirmware = "coreboot"',
         "vms[0].firmware", "'bios' or 'uefi'", ""),
    ],
)
def test_bad_cloud_fields_name_file_field_and_fix(
    tmp_path: Path, vm: str, field: str, reason: str, fix: str
) -> None:
    qcow2(tmp_path / "x.qcow2")
    err = problem(suite(tmp_path, vm))
    assert err.path.name == "s.toml"
    assert any(p.field == field and reason in p.reason and fix in str(p) for p in err.problems), (
        str(err)
    )


def disk_problem(tmp_path: Path, disk: Path) -> SpecError:
    err = problem(suite(tmp_path, f'image = "cloud"\ndisk = "{disk}"\nos_user = "bench"'))
    assert err.field == "vms[0].disk", str(err)
    assert err.path.name == "s.toml"
    assert ":" in str(err).split(" vms[0].disk")[0]  # file:line
    return err


def test_a_missing_disk_is_refused_before_booting(tmp_path: Path) -> None:
    err = disk_problem(tmp_path, tmp_path / "nope.qcow2")
    assert "does not exist" in err.reason and "relative paths" in err.fix


def test_an_unreadable_disk_is_refused(tmp_path: Path) -> None:
    (tmp_path / "dir.qcow2").mkdir()
    err = disk_problem(tmp_path, tmp_path / "dir.qcow2")
    assert "not a regular file" in err.reason


def test_a_file_that_is_no_disk_image_is_refused(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a disk\n" * 100)
    err = disk_problem(tmp_path, text)
    assert "not a disk image" in err.reason and "boot signature" in err.reason
    assert "cloud image" in err.fix


def test_another_image_format_is_refused_with_the_conversion(tmp_path: Path) -> None:
    vmdk = tmp_path / "d.vmdk"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", str(vmdk), "1M"], check=True)
    err = disk_problem(tmp_path, vmdk)
    assert "vmdk image" in err.reason and "qemu-img convert -O qcow2" in err.fix


def test_a_qcow2_with_a_backing_file_is_refused_with_how_to_flatten_it(tmp_path: Path) -> None:
    base = qcow2(tmp_path / "base.qcow2")
    err = disk_problem(tmp_path, qcow2(tmp_path / "top.qcow2", base))
    assert "overlay on" in err.reason and str(base) in err.reason
    assert "flatten it: qemu-img convert -O qcow2" in err.fix


def test_every_problem_of_the_file_is_reported_at_once(tmp_path: Path) -> None:
    path = suite(tmp_path, 'image = "cloud"\ndisk = "gone.qcow2"\nos_user = "root"\n'
                 'packages = ["stress-ng"]')
    fields = sorted(p.field for p in problem(path).problems)
    assert fields == ["vms[0].os_user", "vms[0].packages"]  # the disk once the VM is valid


def test_disk_digest_is_cached_until_the_file_changes(tmp_path: Path) -> None:
    disk = raw_disk(tmp_path / "d.img")
    cache = tmp_path / "cache"
    first = disk_sha256(disk, cache)
    (entry,) = (cache / "disk-digests").iterdir()
    # A cached digest is served without reading the disk: prove it with a planted value.
    entry.write_text(entry.read_text().replace(first, "0" * 64))
    assert disk_sha256(disk, cache) == "0" * 64
    disk.write_bytes(disk.read_bytes()[:-1] + b"x")  # size the same, mtime moves
    assert disk_sha256(disk, cache) not in (first, "0" * 64)


def test_disk_error_carries_reason_and_fix() -> None:
    err = DiskError("r", "f")
    assert (err.reason, err.fix, str(err)) == ("r", "f", "r (fix: f)")


# A guest kernel under test on a cloud disk (direct kernel boot, no bootloader).
def test_a_cloud_vm_takes_a_kernel_initrd_and_cmdline(tmp_path: Path) -> None:
    from tests.unit.test_guest_kernel import bzimage

    (tmp_path / "suites").mkdir()
    qcow2(tmp_path / "suites" / "img.qcow2")
    bzimage(tmp_path / "suites" / "vmlinuz")
    (tmp_path / "suites" / "initrd.img").write_bytes(b"070701" + b"\0" * 200)
    path = suite(tmp_path, 'image = "cloud"\ndisk = "img.qcow2"\nos_user = "bench"\n'
                 'kernel = "vmlinuz"\ninitrd = "initrd.img"\n'
                 'cmdline = "root=LABEL=cloudimg-rootfs ro console=ttyS0"')
    vm = load_suite(path).spec.vms[0]
    assert (vm.kernel, vm.initrd) == (tmp_path / "suites" / "vmlinuz",
                                      tmp_path / "suites" / "initrd.img")


@pytest.mark.parametrize(
    ("lines", "reason", "fix"),
    [
        ('kernel = "vmlinuz"', "needs the cmdline that finds its disk's root", "cmdline = "),
        ('kernel_package = "linux-image-amd64"', "not a cloud disk", "give the kernel file"),
    ],
)
def test_a_cloud_kernel_needs_its_cmdline_and_no_kernel_variant(
    tmp_path: Path, lines: str, reason: str, fix: str
) -> None:
    from tests.unit.test_guest_kernel import bzimage

    qcow2(tmp_path / "x.qcow2")
    (tmp_path / "suites").mkdir()
    bzimage(tmp_path / "suites" / "vmlinuz")
    err = problem(suite(tmp_path, f'image = "cloud"\ndisk = "../x.qcow2"\nos_user = "bench"\n'
                                  f"{lines}"))
    assert any(reason in p.reason and fix in str(p) for p in err.problems), str(err)
