"""A per-boot cloud-init NoCloud seed: the only way in to a cloud VM the harness did not build.

The seed is an ISO 9660 volume labelled ``cidata`` (cloud-init's NoCloud
source looks for that label) holding three files:

* ``meta-data``: a fresh ``instance-id`` (cloud-init runs its once-per-instance
  modules again for every boot, even on a disk that booted before) and the
  ``local-hostname``;
* ``user-data`` (``#cloud-config``): the benchmark user with this boot's SSH
  client public key, passwordless sudo, no password at all, no root login,
  no package upgrade; this boot's ed25519 *host* key pair under ``ssh_keys``
  (with ``ssh_deletekeys`` and no other key types generated), so the harness
  pins the guest's host key it made itself instead of trusting the first key
  that answers; the suite's ``packages`` when the VM has a network;
* ``network-config`` (version 2): DHCP on the virtio NIC, matched by the MAC
  address the domain gives it.

The document is written as JSON, which is YAML too, so no YAML library is
needed to write it exactly. Both key pairs are made here for one boot only;
the directory holding them (and the seed, which carries the host private key)
is private (0710 root:libvirt-qemu, files 0600) and removed after the boot.
The client's private key never enters the seed, the result or a log.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from harness.vm.lifecycle import PRIVATE_FILE_MODE, make_private_dir

VOLUME_ID = "cidata"
#: Debian and Ubuntu start no service a package installs while this says "exit 101".
POLICY_RC_D = (
    "printf '#!/bin/sh\\nexit 101\\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d"
)
#: The guest NIC's name in the network config (cloud-init names the matched NIC so).
NIC_NAME = "eth0"


@dataclass(frozen=True)
class KeyPair:
    """An ed25519 key pair: OpenSSH private key text and its ``ssh-ed25519 BASE64`` line."""

    private: str
    public: str


def new_key_pair() -> KeyPair:
    """A fresh ed25519 key pair, made in this process."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ).decode()
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode()
    return KeyPair(private, public)


def new_mac() -> str:
    """A random locally administered unicast MAC address in QEMU's 52:54:00 range."""
    return "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))


def user_data(user: str, client_public: str, host: KeyPair, packages: list[str]) -> str:
    """The ``#cloud-config`` document (JSON, a subset of YAML)."""
    config: dict[str, object] = {
        "users": [{
            "name": user,
            "gecos": "kvm-harness benchmark user",
            "shell": "/bin/sh",
            "sudo": "ALL=(ALL) NOPASSWD:ALL",
            "lock_passwd": True,
            "ssh_authorized_keys": [f"{client_public} kvm-harness"],
        }],
        # The hostname in /etc/hosts: otherwise sudo looks it up in DNS before every command
        # (a wait inside each phase where the guest has no network, a warning everywhere).
        "manage_etc_hosts": True,
        "ssh_pwauth": False,
        "disable_root": True,
        "ssh_deletekeys": True,
        "ssh_genkeytypes": [],
        "ssh_keys": {"ed25519_private": host.private, "ed25519_public": host.public},
        "package_update": bool(packages),
        "package_upgrade": False,
        "package_reboot_if_required": False,
    }
    if packages:
        config["packages"] = list(packages)
        # Installed, not started (as in the default image): a workload starts what it
        # measures, and no package's daemon runs beside it (redis-server's own service
        # would hold kv-store's port). Debian's policy-rc.d, written before packages go in.
        config["bootcmd"] = [["sh", "-c", POLICY_RC_D]]
    return "#cloud-config\n" + json.dumps(config, indent=2) + "\n"


def meta_data(instance_id: str, hostname: str) -> str:
    """The NoCloud ``meta-data`` document."""
    return json.dumps({"instance-id": instance_id, "local-hostname": hostname}, indent=2) + "\n"


def network_config(mac: str) -> str:
    """Network config version 2: DHCP (v4) on the NIC with ``mac``."""
    return json.dumps({
        "version": 2,
        "ethernets": {
            NIC_NAME: {"match": {"macaddress": mac}, "set-name": NIC_NAME, "dhcp4": True},
        },
    }, indent=2) + "\n"


@dataclass(frozen=True)
class CloudSeed:
    """One boot's seed and keys, all in ``directory`` (private; removed by :meth:`remove`)."""

    directory: Path
    iso: Path
    client_key: Path  # OpenSSH private key file, 0600
    host_key: str  # "ssh-ed25519 BASE64": the only host key the harness accepts
    instance_id: str
    mac: str

    def remove(self) -> None:
        """Remove the seed and both keys."""
        shutil.rmtree(self.directory, ignore_errors=True)


class SeedError(RuntimeError):
    """The seed could not be written (xorriso missing or failing)."""


def write_seed(
    directory: Path, *, user: str, hostname: str, instance_id: str, packages: list[str],
) -> CloudSeed:
    """Make ``directory`` (private) with a fresh seed ISO and key pairs for one boot."""
    directory.mkdir(mode=0o700)
    make_private_dir(directory)
    try:
        client, host = new_key_pair(), new_key_pair()
        mac = new_mac()
        client_key = directory / "id_ed25519"
        _write_private(client_key, client.private)
        files = directory / "cidata"
        files.mkdir(mode=0o700)
        _write_private(files / "user-data", user_data(user, client.public, host, packages))
        _write_private(files / "meta-data", meta_data(instance_id, hostname))
        _write_private(files / "network-config", network_config(mac))
        iso = directory / "seed.iso"
        _make_iso(files, iso)
        shutil.rmtree(files)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return CloudSeed(directory, iso, client_key, host.public, instance_id, mac)


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _make_iso(files: Path, iso: Path) -> None:
    """An ISO 9660 volume ``cidata`` (Joliet and Rock Ridge: the names keep their dash)."""
    if shutil.which("xorriso") is None:
        raise SeedError("xorriso not found (fix: apt-get install xorriso)")
    proc = subprocess.run(
        ["xorriso", "-as", "mkisofs", "-quiet", "-output", str(iso), "-volid", VOLUME_ID,
         "-joliet", "-rock", str(files)],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        raise SeedError(f"xorriso could not write {iso}: {proc.stderr.strip()[-500:]}")
    iso.chmod(PRIVATE_FILE_MODE)
