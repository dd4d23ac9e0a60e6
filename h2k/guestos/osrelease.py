"""Which Linux a guest root holds: /etc/os-release and the hostname.

os-release(5) is a list of shell-style ``KEY=value`` assignments; values
may be quoted and escaped. It is parsed here without running anything.
The distribution family decides which tools and files the fixes look for
(dracut and ifcfg on the RHEL side, update-initramfs and netplan on the
Debian side), so it comes from ``ID`` and ``ID_LIKE`` both.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from typing import Any

from h2k.guestos.tree import GuestTree

OS_RELEASE_PATHS = ("/etc/os-release", "/usr/lib/os-release")
REDHAT_RELEASE = "/etc/redhat-release"
DEBIAN_VERSION = "/etc/debian_version"
_RELEASE_LINE = re.compile(r"^(?P<name>.*?)\s+release\s+(?P<version>[0-9][0-9.]*)")
_RELEASE_IDS = (
    ("centos", "centos"),
    ("rocky", "rocky"),
    ("alma", "almalinux"),
    ("oracle", "ol"),
    ("fedora", "fedora"),
)
_ASSIGNMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$")
FAMILIES: dict[str, tuple[str, ...]] = {
    "rhel": ("rhel", "centos", "fedora", "rocky", "almalinux", "ol", "amzn"),
    "debian": ("debian", "ubuntu", "linuxmint", "raspbian"),
    "suse": ("suse", "sles", "opensuse", "opensuse-leap", "opensuse-tumbleweed"),
    "arch": ("arch", "manjaro", "endeavouros"),
}


@dataclass(frozen=True)
class OsRelease:
    """The fields of os-release a migration cares about."""

    path: str
    fields: dict[str, str]

    @property
    def id(self) -> str:
        return self.fields.get("ID", "linux").lower()

    @property
    def id_like(self) -> list[str]:
        return self.fields.get("ID_LIKE", "").lower().split()

    @property
    def family(self) -> str | None:
        """ "rhel", "debian", "suse" or "arch"; None when none fits."""
        for candidate in [self.id, *self.id_like]:
            for family, members in FAMILIES.items():
                if candidate in members:
                    return family
        return None

    def as_dict(self) -> dict[str, Any]:
        return {
            "distribution": self.id,
            "distribution_family": self.family,
            "id_like": self.id_like,
            "name": self.fields.get("NAME"),
            "version": self.fields.get("VERSION_ID"),
            "version_full": self.fields.get("VERSION"),
            "codename": self.fields.get("VERSION_CODENAME"),
            "pretty_name": self.fields.get("PRETTY_NAME"),
            "os_release": self.path,
        }


def parse(text: str) -> dict[str, str]:
    """The assignments of an os-release file; malformed lines are skipped."""
    fields = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _ASSIGNMENT.match(line)
        if match is None:
            continue
        try:
            words = shlex.split(match.group(2), comments=False, posix=True)
        except ValueError:
            continue
        fields[match.group(1)] = " ".join(words)
    return fields


def _release_file(tree: GuestTree) -> OsRelease | None:
    """What distributions older than os-release (RHEL 6, Debian 7) say."""
    text = tree.read_text(REDHAT_RELEASE)
    if text is not None and text.strip():
        line = text.strip().splitlines()[0]
        match = _RELEASE_LINE.match(line)
        name = match.group("name").strip() if match else line
        fields = {"NAME": name, "PRETTY_NAME": line, "ID_LIKE": "rhel fedora"}
        fields["ID"] = next(
            (i for word, i in _RELEASE_IDS if word in name.lower()), "rhel"
        )
        if match:
            fields["VERSION_ID"] = match.group("version")
        return OsRelease(REDHAT_RELEASE, fields)
    text = tree.read_text(DEBIAN_VERSION)
    if text is not None and text.strip():
        version = text.strip().splitlines()[0]
        fields = {
            "ID": "debian",
            "NAME": "Debian GNU/Linux",
            "VERSION_ID": version,
            "PRETTY_NAME": f"Debian GNU/Linux {version}",
        }
        return OsRelease(DEBIAN_VERSION, fields)
    return None


def read(tree: GuestTree) -> OsRelease | None:
    """The guest's os-release (or older release file), None when it has none."""
    for path in OS_RELEASE_PATHS:
        text = tree.read_text(path)
        if text is not None:
            return OsRelease(path, parse(text))
    return _release_file(tree)


def hostname(tree: GuestTree) -> str | None:
    """/etc/hostname, else HOSTNAME= in /etc/sysconfig/network (older RHEL)."""
    text = tree.read_text("/etc/hostname")
    if text is not None:
        for line in text.splitlines():
            name = line.split("#", 1)[0].strip()
            if name:
                return name
    network = tree.read_text("/etc/sysconfig/network")
    if network is not None:
        configured = parse(network).get("HOSTNAME")
        if configured:
            return configured
    return None
