"""The per-boot cloud-init seed, read back from the ISO the way a guest would see it."""

from __future__ import annotations

import json
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML  # a YAML parser the test extras have (through check-jsonschema)

from harness.image.cloudinit import (
    POLICY_RC_D,
    CloudSeed,
    new_key_pair,
    user_data,
    write_seed,
)


def load_yaml(text: str) -> Any:
    """``text`` parsed as YAML (cloud-init reads user-data with a YAML safe loader)."""
    return YAML(typ="safe", pure=True).load(text)


def make(tmp_path: Path, packages: list[str] | None = None) -> CloudSeed:
    return write_seed(tmp_path / "seed", user="bench", hostname="cloud-bios",
                      instance_id="kvmh-run-cloud-bios-1a2b", packages=packages or [])


def read_iso(iso: Path, dest: Path) -> dict[str, str]:
    subprocess.run(["xorriso", "-osirrox", "on", "-indev", str(iso), "-extract", "/", str(dest)],
                   check=True, capture_output=True)
    return {p.name: p.read_text() for p in dest.iterdir()}


def volume_id(iso: Path) -> str:
    out = subprocess.run(["xorriso", "-indev", str(iso), "-pvd_info"], check=True,
                         capture_output=True, text=True).stdout
    return next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if "Volume Id" in ln)


def test_the_seed_is_a_cidata_volume_with_the_three_nocloud_files(tmp_path: Path) -> None:
    seed = make(tmp_path)
    assert volume_id(seed.iso) == "cidata"
    files = read_iso(seed.iso, tmp_path / "out")
    assert sorted(files) == ["meta-data", "network-config", "user-data"]
    meta = load_yaml(files["meta-data"])
    assert meta == {"instance-id": "kvmh-run-cloud-bios-1a2b", "local-hostname": "cloud-bios"}
    net = load_yaml(files["network-config"])
    assert net["version"] == 2
    (nic,) = net["ethernets"].values()
    assert nic["match"] == {"macaddress": seed.mac} and nic["dhcp4"] is True


def test_user_data_is_cloud_config_with_the_user_keys_and_no_way_in_but_the_key(
    tmp_path: Path,
) -> None:
    seed = make(tmp_path)
    text = read_iso(seed.iso, tmp_path / "out")["user-data"]
    assert text.startswith("#cloud-config\n")
    config = load_yaml(text)
    (user,) = config["users"]
    client_public = subprocess.run(
        ["ssh-keygen", "-y", "-f", str(seed.client_key)], check=True, capture_output=True,
        text=True,
    ).stdout.split()[:2]
    assert user["name"] == "bench" and user["sudo"] == "ALL=(ALL) NOPASSWD:ALL"
    assert user["lock_passwd"] is True
    assert [k.split()[:2] for k in user["ssh_authorized_keys"]] == [client_public]
    assert config["ssh_pwauth"] is False and config["disable_root"] is True
    assert config["manage_etc_hosts"] is True  # sudo resolves the hostname without DNS
    assert config["package_upgrade"] is False and config["package_update"] is False
    assert "packages" not in config
    assert config["ssh_deletekeys"] is True and config["ssh_genkeytypes"] == []
    keys = config["ssh_keys"]
    assert keys["ed25519_public"] == seed.host_key
    # The host key pair is a pair: the public key is derived from the private one.
    host_private = tmp_path / "host_key"
    host_private.write_text(keys["ed25519_private"])
    host_private.chmod(0o600)
    derived = subprocess.run(["ssh-keygen", "-y", "-f", str(host_private)], check=True,
                             capture_output=True, text=True).stdout.split()[:2]
    assert " ".join(derived) == seed.host_key
    # The client's private key is nowhere in the seed.
    client_secret = seed.client_key.read_text()
    body = "".join(client_secret.splitlines()[1:-1])
    assert body not in text.replace("\\n", "")
    assert client_secret not in text


def test_packages_are_installed_only_when_asked(tmp_path: Path) -> None:
    seed = make(tmp_path, ["redis-server", "redis-tools"])
    config = load_yaml(read_iso(seed.iso, tmp_path / "out")["user-data"])
    assert config["packages"] == ["redis-server", "redis-tools"]
    assert config["package_update"] is True and config["package_upgrade"] is False
    # Installed, not started: Debian's policy-rc.d written at boot, before the packages.
    assert config["bootcmd"] == [["sh", "-c", POLICY_RC_D]]
    assert "bootcmd" not in load_yaml(user_data("u", "ssh-ed25519 AAAA", new_key_pair(), []))


def test_keys_and_seed_are_private_fresh_per_boot_and_removed(tmp_path: Path) -> None:
    one = make(tmp_path)
    other = write_seed(tmp_path / "other", user="bench", hostname="h", instance_id="i",
                       packages=[])
    assert one.host_key != other.host_key and one.mac != other.mac
    assert one.client_key.read_text() != other.client_key.read_text()
    for f in (one.client_key, one.iso):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
    assert not stat.S_IMODE(one.directory.stat().st_mode) & 0o007
    assert sorted(p.name for p in one.directory.iterdir()) == ["id_ed25519", "seed.iso"]
    one.remove()
    assert not one.directory.exists()


def test_a_failed_seed_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import harness.image.cloudinit as cloudinit

    def broken(files: Path, iso: Path) -> None:
        raise cloudinit.SeedError("xorriso broke")

    monkeypatch.setattr(cloudinit, "_make_iso", broken)
    with pytest.raises(cloudinit.SeedError):
        make(tmp_path)
    assert not (tmp_path / "seed").exists()


def test_user_data_is_json_too() -> None:
    from harness.image.cloudinit import new_key_pair, user_data

    doc = user_data("u", "ssh-ed25519 AAAA", new_key_pair(), [])
    assert json.loads(doc.split("\n", 1)[1])["users"][0]["name"] == "u"
