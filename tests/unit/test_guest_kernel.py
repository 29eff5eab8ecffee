"""Guest kernels under test: VM fields, kernel files checked before booting, --set of VM
fields, kernel variants' module dependencies, and compare's "what changed"."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner

import harness.spec as spec_module
from harness.analysis.provenance import differences
from harness.cli import main
from harness.guest.identity import GuestIdentity
from harness.image.kernel import (
    KernelFileError,
    check_initrd,
    kernel_release,
    looks_like,
    present,
    write_modules_dep,
)
from harness.image.linux import resolve_modules
from harness.results import RunResult
from harness.spec import SpecError, load_suite
from tests.unit.synthetic_results import result, write_atomic

WORKLOAD = """\
name = "touch"
guest = "linux"
[params]
mib = 64
[[phases]]
name = "run"
command = "page-touch --mib {mib}"
"""


def bzimage(path: Path, version: str = "6.12.0-mine (me@host) #1 SMP") -> Path:
    """A file with the x86 boot header: HdrS at 0x202, the version string's pointer at 0x20e."""
    data = bytearray(0x1000)
    data[0x1FE:0x200] = b"\x55\xaa"
    data[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", data, 0x206, 0x20F)
    struct.pack_into("<H", data, 0x20E, 0x800 - 0x200)
    data[0x800:0x800 + len(version) + 1] = version.encode() + b"\0"
    path.write_bytes(bytes(data))
    return path


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "touch.toml").write_text(WORKLOAD)
    monkeypatch.setattr(spec_module, "WORKLOADS_DIR", tmp_path)
    return tmp_path


def suite(tree: Path, vm_lines: str = "", extra_vm: str = "") -> Path:
    path = tree / "suites" / "s.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(f'name = "s"\n[[vms]]\nname = "g"\n{vm_lines}\n{extra_vm}'
                    '[[runs]]\nworkload = "touch"\nvm = "g"\n')
    return path


# --------------------------------------------------------------------------- kernel files


def test_a_bzimage_is_accepted_and_its_release_read(tmp_path: Path) -> None:
    assert kernel_release(bzimage(tmp_path / "k")) == "6.12.0-mine"


@pytest.mark.parametrize(("content", "looks"), [
    (b"\x7fELF\x02\x01\x01" + b"\0" * 2000, "an ELF file (an uncompressed vmlinux?"),
    (gzip.compress(b"x" * 3000), "a gzip file"),
    (b"070701" + b"0" * 2000, "a cpio archive"),
    (b"", "an empty file"),
    (b"hello kernel\n" * 100, "a text file"),
    (b"MZ" + b"\1" * 2000, "a PE/EFI executable"),
])
def test_a_file_that_is_not_a_kernel_says_what_it_looks_like(
    tmp_path: Path, content: bytes, looks: str
) -> None:
    path = tmp_path / "vmlinux"
    path.write_bytes(content)
    with pytest.raises(KernelFileError) as err:
        kernel_release(path)
    assert "not an x86 bzImage" in err.value.reason and looks in err.value.reason
    assert "bzImage" in err.value.fix


def test_missing_kernel_and_initrd_files(tmp_path: Path) -> None:
    with pytest.raises(KernelFileError, match="does not exist"):
        kernel_release(tmp_path / "nope")
    with pytest.raises(KernelFileError, match="is a directory"):
        kernel_release(tmp_path)
    with pytest.raises(KernelFileError, match="does not exist"):
        check_initrd(tmp_path / "nope")
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(KernelFileError, match="is empty"):
        check_initrd(tmp_path / "empty")
    assert looks_like(b"\xfd7zXZ\x00rest") == "an xz file"
    with pytest.raises(KernelFileError, match="not a usable path"):
        kernel_release(tmp_path / "a\0b")
    with pytest.raises(KernelFileError, match="not a usable path"):
        check_initrd(tmp_path / "a\0b")


# --------------------------------------------------------------------------- VM fields


def test_kernel_paths_resolve_against_the_suite_directory(tree: Path) -> None:
    (tree / "suites").mkdir()
    bzimage(tree / "suites" / "bzImage")
    (tree / "suites" / "initrd.img").write_bytes(b"070701")
    loaded = load_suite(suite(tree, 'kernel = "bzImage"\ninitrd = "initrd.img"\n'
                                    'cmdline = "root=/dev/vda rw console=ttyS0"'))
    vm = loaded.spec.vms[0]
    assert vm.kernel == tree / "suites" / "bzImage"
    assert vm.initrd == tree / "suites" / "initrd.img"
    assert vm.cmdline == "root=/dev/vda rw console=ttyS0"


def test_a_suite_kernel_that_is_not_a_kernel_fails_before_booting(tree: Path) -> None:
    (tree / "suites").mkdir()
    (tree / "suites" / "vmlinux").write_bytes(b"\x7fELF" + b"\0" * 1000)
    with pytest.raises(SpecError) as err:
        load_suite(suite(tree, 'kernel = "vmlinux"\ninitrd = "gone.img"'))
    text = str(err.value)
    assert "vms[0].kernel" in text and "looks like an ELF file" in text and "fix:" in text
    assert "vms[0].initrd" in text and "gone.img does not exist" in text


@pytest.mark.parametrize(("lines", "extra", "says"), [
    ('kernel_package = "Linux_Image"', "", "is not a Debian package name"),
    ('kernel = "k"\nkernel_package = "linux-image-amd64"', "", "not both"),
    ('initrd = "i"', "", "an initrd goes with the kernel"),
    ('cmdline = "a\\nb"', "", "one line of printable text"),
    ("", '[[vms]]\nname = "m"\nimage = "micro"\nkernel = "k"\n',
     "applies to Linux VMs booted by the harness"),
    ("", '[[vms]]\nname = "w"\nimage = "paging"\nkernel_package = "linux-image-amd64"\n',
     "not 'paging'"),
])
def test_bad_guest_kernel_fields_are_refused_with_a_fix(
    tree: Path, lines: str, extra: str, says: str
) -> None:
    (tree / "suites").mkdir()
    bzimage(tree / "suites" / "k")
    with pytest.raises(SpecError) as err:
        load_suite(suite(tree, lines, extra))
    assert says in str(err.value) and "fix:" in str(err.value)


# --------------------------------------------------------------------------- --set


def test_set_switches_the_kernel_of_the_only_vm(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = suite(tree, 'kernel_package = "linux-image-amd64"')
    monkeypatch.chdir(tree)
    bzimage(tree / "mine")
    vm = load_suite(path, ["vm.kernel=mine"]).spec.vms[0]
    assert vm.kernel == tree / "mine" and vm.kernel_package is None  # relative to the cwd
    vm = load_suite(path, ["vm.g.kernel_package=linux-image-rt-amd64"]).spec.vms[0]
    assert vm.kernel_package == "linux-image-rt-amd64"
    vm = load_suite(path, ["vm.kernel_package="]).spec.vms[0]
    assert vm.kernel_package is None  # the image's own kernel again
    vm = load_suite(path, ["vm.cmdline=root=/dev/vda rw quiet"]).spec.vms[0]
    assert vm.cmdline == "root=/dev/vda rw quiet"


@pytest.mark.parametrize(("override", "says"), [
    ("vm.kernel=x", "the suite has 2 VMs (g, m): say which"),
    ("vm.m.kernel=x", "VM 'm' boots the micro image"),
    ("vm.h.kernel=x", "the suite has no VM 'h'"),
    ("vm.g.kernal=x", "did you mean 'kernel'?"),
    ("vm.g.memory_mib=2", "not a VM field --set can change"),
    ("vm.g.kernel=notthere", "notthere does not exist"),
    ("vm.g.kernel_package=Bad", "is not a Debian package name"),
    ("vm.g", "expected vm.FIELD=VALUE or vm.NAME.FIELD=VALUE"),
])
def test_set_of_a_vm_field_names_what_is_wrong(
    tree: Path, monkeypatch: pytest.MonkeyPatch, override: str, says: str
) -> None:
    path = suite(tree, extra_vm='[[vms]]\nname = "m"\nimage = "micro"\n')
    monkeypatch.chdir(tree)
    with pytest.raises(SpecError) as err:
        load_suite(path, [override])
    assert says in str(err.value), str(err.value)
    assert err.value.field == f"--set {override}"  # the problem names the --set, not the file


def test_validate_with_a_kernel_on_a_micro_vm_exits_2(tree: Path) -> None:
    path = suite(tree, extra_vm='[[vms]]\nname = "m"\nimage = "micro"\n')
    out = CliRunner().invoke(main, ["validate", str(path), "--set", "vm.m.kernel=/k"])
    assert out.exit_code == 2
    assert "VM 'm' boots the micro image" in out.output


# --------------------------------------------------------------------------- variants


def ko(path: Path, depends: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x7fELF junk\0license=GPL\0depends=" + depends.encode() + b"\0name=x\0")


def test_module_dependencies_come_from_modinfo(tmp_path: Path) -> None:
    ko(tmp_path / "kernel/fs/ext4/ext4.ko", "jbd2,mbcache,crc16")
    ko(tmp_path / "kernel/fs/jbd2/jbd2.ko", "")
    ko(tmp_path / "kernel/fs/mbcache.ko", "")
    ko(tmp_path / "kernel/lib/crc16.ko", "")
    ko(tmp_path / "kernel/drivers/virtio/virtio_pci.ko", "virtio_pci_modern_dev")
    ko(tmp_path / "kernel/drivers/virtio/virtio_pci_modern_dev.ko", "")
    (tmp_path / "modules.builtin").write_text("kernel/crypto/crc32c_generic.ko\n")
    write_modules_dep(tmp_path)
    order = resolve_modules(tmp_path, ["virtio_pci", "ext4"])
    assert order.index("kernel/fs/jbd2/jbd2.ko") < order.index("kernel/fs/ext4/ext4.ko")
    assert order[0] == "kernel/drivers/virtio/virtio_pci_modern_dev.ko"
    assert present(tmp_path, ("crc32c_generic", "ext4")) == ["ext4"]


# --------------------------------------------------------------------------- compare


def with_kernel(run_id: str, value: float, release: str, package: str, version: str,
                os_name: str = "Debian GNU/Linux 12 (bookworm)") -> RunResult:
    r = result(run_id, value)
    r.vms[0].guest_identity = GuestIdentity(
        os_id="debian", os_version_id="12", os_pretty_name=os_name, kernel_release=release,
        kernel_cmdline="root=/dev/vda rw", kernel_package=package,
        kernel_package_version=version, kernel_sha256="ab" * 32)
    return r


CLOUD = ("6.1.0-50-cloud-amd64", "linux-image-cloud-amd64", "6.1.176-1")
GENERIC = ("6.1.0-57-amd64", "linux-image-amd64", "6.1.192-3")


def test_a_guest_kernel_change_is_what_changed_never_unfair() -> None:
    base = [with_kernel(f"a{i}", 1000.0, *CLOUD) for i in range(3)]
    cand = [with_kernel(f"b{i}", 1000.0, *GENERIC) for i in range(3)]
    diffs = differences(base, cand)
    assert [d.field for d in diffs] == ["vm vm1: guest kernel"]
    (d,) = diffs
    assert d.fair
    assert d.describe() == ("vm vm1: guest kernel: 6.1.0-50-cloud-amd64 (linux-image-cloud-amd64 "
                            "6.1.176-1) -> 6.1.0-57-amd64 (linux-image-amd64 6.1.192-3)")


def test_guest_os_and_a_kernel_file_are_named_too() -> None:
    base = [with_kernel("a", 1.0, *CLOUD)]
    cand = [with_kernel("b", 1.0, "6.12.0-mine", "", "", os_name="Debian GNU/Linux trixie")]
    fields = {d.field: d for d in differences(base, cand)}
    assert fields["vm vm1: guest OS"].fair
    assert "(sha256 abababababab)" in fields["vm vm1: guest kernel"].describe()


def test_a_side_mixing_guest_kernels_is_unfair() -> None:
    base = [with_kernel("a0", 1.0, *CLOUD), with_kernel("a1", 1.0, *GENERIC)]
    cand = [with_kernel("b0", 1.0, *GENERIC)]
    (d,) = differences(base, cand)
    assert not d.fair and "mixes values" in d.meaning


def test_results_without_identity_compare_as_before() -> None:
    assert differences([result("a", 1.0)], [result("b", 1.0)]) == []


def test_compare_cli_names_the_guest_kernel_and_exits_0_or_1(tmp_path: Path) -> None:
    for folder, kernel, values in (("a", CLOUD, [1000.0, 1010.0, 990.0, 1005.0, 995.0]),
                                   ("b", GENERIC, [1002.0, 1008.0, 992.0, 1003.0, 997.0])):
        (tmp_path / folder).mkdir()
        for i, v in enumerate(values):
            write_atomic(with_kernel(f"{folder}{i}", v, *kernel),
                         tmp_path / folder / f"{folder}{i}.json")
    out = CliRunner().invoke(main, ["compare", str(tmp_path / "a"), str(tmp_path / "b")])
    assert out.exit_code in (0, 1), out.output
    assert "guest kernel" in out.output and "6.1.0-57-amd64" in out.output
    assert "UNFAIR" not in out.output and "NOT COMPARABLE" not in out.output


# --------------------------------------------------------------------------- booting


def test_a_users_kernel_is_copied_and_gets_the_images_initramfs_only_if_it_fits(
    tmp_path: Path,
) -> None:
    from harness.image.linux import LinuxImage
    from harness.platform.linux import user_kernel

    image = LinuxImage(
        name="linux", digest="d" * 64, directory=tmp_path, disk=tmp_path / "disk.qcow2",
        kernel=tmp_path / "vmlinuz", initrd=tmp_path / "initrd.cpio", cmdline="root=/dev/vda",
        ssh_user="root", ssh_private_key=tmp_path / "id", host_key="k", guest_tools={},
        kernel_release="6.1.0-50-cloud-amd64",
    )
    mine = bzimage(tmp_path / "bzImage")
    foreign = user_kernel(mine, None, None, image, tmp_path / "run1")
    assert foreign.kernel == tmp_path / "run1" / "vmlinuz" and foreign.kernel.read_bytes() == \
        mine.read_bytes()
    assert foreign.initrd is None and foreign.no_initrd and foreign.cmdline == "root=/dev/vda"
    assert foreign.release == "6.12.0-mine" and foreign.sha256 is not None
    same = user_kernel(bzimage(tmp_path / "same", "6.1.0-50-cloud-amd64 (x) #1"), None,
                       "quiet", image, tmp_path / "run2")
    assert same.initrd == image.initrd and not same.no_initrd and same.cmdline == "quiet"
    (tmp_path / "my-initrd").write_bytes(b"070701")
    own = user_kernel(mine, tmp_path / "my-initrd", None, image, tmp_path / "run3")
    assert own.initrd == tmp_path / "run3" / "initrd" and own.copied == tmp_path / "run3"


def test_a_kernel_package_apt_does_not_know_is_bad_input_before_booting(tree: Path) -> None:
    path = suite(tree)
    out = CliRunner().invoke(main, ["validate", str(path), "--set",
                                    "vm.kernel_package=linux-image-no-such-flavour-zz"])
    assert out.exit_code == 2, out.output
    assert "vms[0].kernel_package" in out.output
