"""The guest's file tree as the guest sees it, assembled from host mounts.

A guest root is mounted on the host at some directory, its /boot maybe at
another. Paths inside it are guest paths, and so are its symlinks: an
absolute link such as ``/etc/systemd/.../vmtoolsd.service ->
/usr/lib/systemd/system/vmtoolsd.service`` names the guest's /usr, never the
host's. :class:`GuestTree` resolves every path the way the guest's kernel
would (chroot-like: ``..`` stops at the guest's root, absolute links start
again from it, mounts are crossed), so nothing a guest contains can make h2k
read or write a host file.

Writes replace a file through a temporary sibling and a rename, keeping its
mode, owner and extended attributes (the SELinux label above all: a guest
that enforces SELinux cannot read an unlabelled /etc/fstab); a new file gets
its directory's SELinux label, as the guest's kernel would give it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import stat
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

log = logging.getLogger(__name__)

MAX_SYMLINKS = 40
# Configuration files are small; a bigger one is not read whole.
MAX_READ_BYTES = 8 * 2**20
SELINUX_XATTR = "security.selinux"


class GuestPathError(OSError):
    """A guest path that cannot be resolved (too many links, a loop)."""


@dataclass(frozen=True)
class Mount:
    """Guest directory ``guest_path`` is host directory ``host_path``."""

    guest_path: str
    host_path: str
    writable: bool


def _split(path: str) -> list[str]:
    return [part for part in path.split("/") if part and part != "."]


def _join(parts: list[str]) -> str:
    return "/" + "/".join(parts)


class GuestTree:
    """Read, and when mounted writable change, files by their guest paths."""

    def __init__(self, mounts: Mapping[str, tuple[str, bool]]):
        """``mounts`` maps a guest directory ("/", "/boot") to (host dir, writable)."""
        if "/" not in mounts:
            raise ValueError("a guest tree needs its root mount")
        self.mounts = sorted(
            (
                Mount(guest, host, writable)
                for guest, (host, writable) in mounts.items()
            ),
            key=lambda m: len(_split(m.guest_path)),
            reverse=True,
        )

    # Resolution.

    def _mount_for(self, parts: list[str]) -> tuple[Mount, list[str]]:
        for mount in self.mounts:
            prefix = _split(mount.guest_path)
            if parts[: len(prefix)] == prefix:
                return mount, parts[len(prefix) :]
        raise AssertionError("the root mount matches every path")

    def _host(self, parts: list[str]) -> str:
        mount, rest = self._mount_for(parts)
        return os.path.join(mount.host_path, *rest)

    def _is_mountpoint(self, parts: list[str]) -> bool:
        return any(_split(m.guest_path) == parts for m in self.mounts)

    def resolve_parts(self, path: str, *, follow: bool = True) -> list[str]:
        """The components of ``path`` with every symlink resolved in the guest.

        With ``follow`` false the last component is not followed, so a
        symlink names itself (to remove or read it).
        """
        if not path.startswith("/"):
            raise ValueError(f"not an absolute guest path: {path!r}")
        pending = _split(path)
        done: list[str] = []
        links = 0
        while pending:
            part = pending.pop(0)
            if part == "..":
                if done:
                    done.pop()
                continue
            candidate = [*done, part]
            if (pending or follow) and not self._is_mountpoint(candidate):
                host = self._host(candidate)
                if os.path.islink(host):
                    links += 1
                    if links > MAX_SYMLINKS:
                        raise GuestPathError(
                            errno.ELOOP, f"too many symlinks resolving {path}"
                        )
                    target = os.readlink(host)
                    if target.startswith("/"):
                        done = []
                    pending = _split(target) + pending
                    continue
            done = candidate
        return done

    def resolve(self, path: str, *, follow: bool = True) -> str:
        """The host path of guest ``path`` (see :meth:`resolve_parts`)."""
        return self._host(self.resolve_parts(path, follow=follow))

    def canonical(self, path: str, *, follow: bool = True) -> str:
        """The guest path of ``path`` once its symlinks are resolved."""
        return _join(self.resolve_parts(path, follow=follow))

    def mount_of(self, path: str) -> Mount:
        """The mount that holds guest ``path`` (its parent directory resolved)."""
        return self._mount_for(self.resolve_parts(path, follow=False))[0]

    # Reading.

    def lstat(self, path: str) -> os.stat_result | None:
        try:
            return os.lstat(self.resolve(path, follow=False))
        except (FileNotFoundError, NotADirectoryError, GuestPathError):
            return None

    def stat(self, path: str) -> os.stat_result | None:
        try:
            return os.lstat(self.resolve(path))
        except (FileNotFoundError, NotADirectoryError, GuestPathError):
            return None

    def exists(self, path: str) -> bool:
        return self.stat(path) is not None

    def lexists(self, path: str) -> bool:
        return self.lstat(path) is not None

    def is_file(self, path: str) -> bool:
        found = self.stat(path)
        return found is not None and stat.S_ISREG(found.st_mode)

    def is_dir(self, path: str) -> bool:
        found = self.stat(path)
        return found is not None and stat.S_ISDIR(found.st_mode)

    def is_symlink(self, path: str) -> bool:
        found = self.lstat(path)
        return found is not None and stat.S_ISLNK(found.st_mode)

    def readlink(self, path: str) -> str | None:
        try:
            return os.readlink(self.resolve(path, follow=False))
        except (OSError, GuestPathError):
            return None

    def listdir(self, path: str) -> list[str]:
        """The names in directory ``path``, sorted; empty when it is none."""
        try:
            return sorted(os.listdir(self.resolve(path)))
        except (FileNotFoundError, NotADirectoryError, GuestPathError):
            return []

    def files(self, directory: str, suffix: str = "") -> list[str]:
        """Guest paths of the regular files in ``directory`` ending in ``suffix``."""
        base = directory.rstrip("/")
        return [
            f"{base}/{name}"
            for name in self.listdir(directory)
            if name.endswith(suffix) and self.is_file(f"{base}/{name}")
        ]

    def read_bytes(self, path: str, limit: int = MAX_READ_BYTES) -> bytes | None:
        """The content of regular file ``path``; None when it is not one."""
        try:
            host = self.resolve(path)
            # O_NONBLOCK: a FIFO the guest put there must not hang the job.
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
            fd = os.open(host, flags)
        except (FileNotFoundError, NotADirectoryError, GuestPathError):
            return None
        except OSError as exc:
            # A link loop, a device node on a nodev mount, a socket: no file.
            if exc.errno in (errno.ELOOP, errno.EACCES, errno.ENXIO, errno.ENODEV):
                return None
            raise
        with os.fdopen(fd, "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                return None
            if info.st_size > limit:
                # Never half-read: a rewrite of part of a file would cut it.
                log.warning("guest file %s is over %d bytes; not read", path, limit)
                return None
            return f.read(limit + 1)[:limit]

    def read_text(self, path: str) -> str | None:
        """The text of ``path``; bytes that are not UTF-8 survive a rewrite."""
        data = self.read_bytes(path)
        return None if data is None else data.decode("utf-8", "surrogateescape")

    # Writing.

    def _writable_host(self, path: str, *, follow: bool) -> tuple[str, Mount]:
        parts = self.resolve_parts(path, follow=follow)
        if self._is_mountpoint(parts) or not parts:
            raise IsADirectoryError(errno.EISDIR, f"{path} is a mount point")
        mount, _ = self._mount_for(parts)
        if not mount.writable:
            raise PermissionError(
                errno.EROFS, f"{path} lies on {mount.guest_path}, mounted read-only"
            )
        return self._host(parts), mount

    def write_text(self, path: str, text: str, *, mode: int = 0o644) -> None:
        """Replace (or create) ``path`` with ``text``, atomically.

        An existing file keeps its mode, owner and extended attributes; a
        new one gets ``mode``, root's ownership and its directory's SELinux
        label.
        """
        host, _ = self._writable_host(path, follow=True)
        directory = os.path.dirname(host)
        try:
            old = os.lstat(host)
        except FileNotFoundError:
            old = None
        if old is not None and not stat.S_ISREG(old.st_mode):
            raise IsADirectoryError(errno.EISDIR, f"{path} is not a regular file")
        temp = os.path.join(directory, f".h2k-{uuid.uuid4().hex[:12]}.tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(text.encode("utf-8", "surrogateescape"))
                if old is not None:
                    os.fchown(f.fileno(), old.st_uid, old.st_gid)
                    os.fchmod(f.fileno(), stat.S_IMODE(old.st_mode))
                    _copy_xattrs(host, temp)
                else:
                    os.fchmod(f.fileno(), mode)
                    _inherit_label(directory, temp)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, host)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            raise
        _fsync_dir(directory)
        log.info("wrote guest file %s", path)

    def make_dirs(self, path: str) -> None:
        """Create directory ``path`` and its parents in the guest."""
        parts = self.resolve_parts(path)
        for depth in range(1, len(parts) + 1):
            sub = _join(parts[:depth])
            if self.is_dir(sub):
                continue
            host, _ = self._writable_host(sub, follow=False)
            os.mkdir(host, 0o755)
            _inherit_label(os.path.dirname(host), host)

    def remove(self, path: str) -> None:
        """Remove ``path`` itself (a symlink is removed, not its target);
        a directory goes with everything in it, no link inside followed."""
        host, _ = self._writable_host(path, follow=False)
        info = os.lstat(host)
        if stat.S_ISDIR(info.st_mode):
            shutil.rmtree(host)
        else:
            os.unlink(host)
        _fsync_dir(os.path.dirname(host))
        log.info("removed guest path %s", path)


def _copy_xattrs(source: str, target: str) -> None:
    try:
        names = os.listxattr(source, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return
        raise
    for name in names:
        value = os.getxattr(source, name, follow_symlinks=False)
        os.setxattr(target, name, value, follow_symlinks=False)


def _inherit_label(directory: str, target: str) -> None:
    try:
        label = os.getxattr(directory, SELINUX_XATTR)
    except OSError:
        return
    os.setxattr(target, SELINUX_XATTR, label, follow_symlinks=False)


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
