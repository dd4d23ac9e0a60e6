"""A guest disk opened for inspection or repair: :class:`GuestDisk`.

``GuestDisk.open`` serves the image with qemu-nbd on a Unix socket, shows it
as a raw file through nbdfuse, and from there reads the partition table,
the filesystems and the LVM volumes, and mounts any of them through a loop
device over its byte range. Every step is recorded in the session's ledger
(:mod:`h2k.guest.ledger`) as it is set up and torn down in reverse order on
the way out, whatever the way out is; what a crash leaves is for
:func:`h2k.guest.stale.cleanup_stale`.

A read-only session cannot change the image: qemu-nbd serves it read-only,
the FUSE file, the loop devices and the mounts are read-only, and mounts
skip journal and log replay.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from h2k.errors import H2KError, OperationError, ToolCancelled, ToolError, ToolTimeout
from h2k.guest import codes, daemon, fstypes, loop, lvm, mounts, nbd, release
from h2k.guest.daemon import Daemon
from h2k.guest.ledger import Ledger, state_dir_or_default
from h2k.guest.lvm import LogicalVolume, PhysicalVolume
from h2k.guest.partitions import Partition, PartitionTable, read_partition_table
from h2k.guest.probe import Filesystem, probe
from h2k.guest.volume import Volume

log = logging.getLogger(__name__)

FORMATS = frozenset({"raw", "qcow2", "vmdk", "vpc", "vhdx", "vdi"})
DEFAULT_TIMEOUT_SECONDS = 300.0
RAW_NAME = "disk.raw"
LVM_MEMBER = "LVM2_member"
FUSE_EXIT_SECONDS = 5.0

# How qemu says another process holds the image's lock.
_LOCKED_SIGNS = ('" lock', "Is another process using the image")

MountTarget = Filesystem | Volume | Partition | LogicalVolume


@dataclass
class _Held:
    """A resource set up by this session, and how to take it down."""

    entry_id: int
    record: dict[str, Any]
    release: Callable[[], None]
    server: Daemon | None = None


class GuestDisk:
    """An open guest disk; create it with :meth:`GuestDisk.open`.

    Not thread-safe: one session belongs to one job.
    """

    def __init__(
        self,
        path: str,
        fmt: str,
        *,
        writable: bool,
        workdir: str | None,
        state_dir: str | None,
        should_stop: Callable[[], bool] | None,
        timeout: float,
        phase: str,
    ):
        self.image = os.path.abspath(path)
        self.format = fmt
        self.writable = writable
        self.session_id = uuid.uuid4().hex
        base = os.path.realpath(workdir or tempfile.gettempdir())
        self.directory = os.path.join(base, f"h2k-guest-{self.session_id[:12]}")
        self.raw_path = os.path.join(self.directory, "fuse", RAW_NAME)
        self.nbd_uri = ""
        self.size = 0
        self._state_dir = state_dir_or_default(state_dir)
        self._should_stop = should_stop
        self._timeout = timeout
        self._phase = phase
        self._held: list[_Held] = []
        self._ledger: Ledger | None = None
        self._mounts = 0
        self._closed = False

    @classmethod
    @contextlib.contextmanager
    def open(
        cls,
        path: str,
        fmt: str,
        *,
        writable: bool = False,
        workdir: str | None = None,
        state_dir: str | None = None,
        should_stop: Callable[[], bool] | None = None,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        phase: str = "guest",
    ) -> Iterator[GuestDisk]:
        """Open the image at ``path`` in qemu format ``fmt``.

        ``path`` must already be checked against the allowed roots, with
        its backing files and extents (:mod:`h2k.tools.qemu_img`).
        ``workdir`` holds the session's private directory (default: the
        system temp dir); ``state_dir`` its ledger (default:
        ``$H2K_GUEST_STATE_DIR`` or /var/lib/h2k/guest). ``should_stop`` and
        ``timeout`` apply to every tool the session runs; ``phase`` goes
        into the :class:`OperationError` it raises.
        """
        disk = cls(
            path,
            fmt,
            writable=writable,
            workdir=workdir,
            state_dir=state_dir,
            should_stop=should_stop,
            timeout=timeout,
            phase=phase,
        )
        try:
            disk._start()
            yield disk
        except BaseException:
            disk._close(raising=False)
            raise
        disk._close(raising=True)

    # Set-up and teardown.

    def _error(self, code: str, message: str, **kwargs: Any) -> OperationError:
        return OperationError(self._phase, code, message, **kwargs)

    def _hold(
        self,
        record: dict[str, Any],
        release_fn: Callable[[], None],
        server: Daemon | None = None,
    ) -> _Held:
        assert self._ledger is not None
        held = _Held(self._ledger.add(record), record, release_fn, server)
        self._held.append(held)
        return held

    def _let_go(self, held: _Held) -> None:
        if held not in self._held:
            return
        held.release()
        self._held.remove(held)
        if self._ledger is not None:
            self._ledger.remove(held.entry_id)

    def _start(self) -> None:
        if self.format not in FORMATS:
            raise self._error(
                codes.UNSUPPORTED_FORMAT,
                f"h2k opens {', '.join(sorted(FORMATS))} images, not {self.format!r}",
            )
        if not os.path.exists(self.image):
            raise self._error(codes.IMAGE_OPEN_FAILED, f"{self.image} does not exist")
        try:
            self._prepare()
            socket_path = self._socket_path()
        except OSError as exc:
            raise self._error(
                codes.SETUP_FAILED,
                f"cannot set up the guest disk session: {exc}",
                details={"state_dir": self._state_dir, "directory": self.directory},
            ) from exc
        self.nbd_uri = nbd.nbd_uri(socket_path)
        try:
            self._serve(socket_path)
            self._expose(socket_path)
        except (ToolCancelled, ToolTimeout):
            raise
        except ToolError as exc:
            locked = any(sign in exc.stderr for sign in _LOCKED_SIGNS)
            raise self._error(
                codes.IMAGE_LOCKED if locked else codes.IMAGE_OPEN_FAILED,
                f"cannot open {self.image} as {self.format}: {exc}",
                retryable=locked,
                details={"tool": exc.tool, "stderr": exc.stderr[-2000:]},
            ) from exc

    def _prepare(self) -> None:
        """The ledger, then the private directory it records first."""
        self._ledger = Ledger(
            self._state_dir,
            self.session_id,
            {
                "image": self.image,
                "format": self.format,
                "writable": self.writable,
                "directory": self.directory,
            },
        )
        directory = self.directory
        self._hold({"kind": "dir", "path": directory}, lambda: release.sweep(directory))
        os.mkdir(directory, 0o700)
        for name in ("fuse", "lvm", "mnt"):
            os.mkdir(os.path.join(directory, name), 0o700)

    def _socket_path(self) -> str:
        socket_path = os.path.join(self.directory, "nbd.sock")
        if len(socket_path.encode()) <= nbd.MAX_SOCKET_PATH:
            return socket_path
        # The session directory is too deep for a Unix socket path.
        short = tempfile.mkdtemp(prefix="h2k-nbd-", dir="/tmp")
        self._hold({"kind": "dir", "path": short}, lambda: release.sweep(short))
        return os.path.join(short, "nbd.sock")

    def _serve(self, socket_path: str) -> None:
        server = nbd.serve(
            self.image,
            self.format,
            socket_path,
            read_only=not self.writable,
            cwd=self.directory,
            log_path=os.path.join(self.directory, "qemu-nbd.log"),
        )
        self._hold(
            {"kind": "process", "role": "qemu-nbd", "process": server.record()},
            server.stop,
            server,
        )
        self.size = nbd.wait_served(
            server,
            socket_path,
            timeout=self._timeout,
            should_stop=self._should_stop,
        )

    def _expose(self, socket_path: str) -> None:
        mountpoint = os.path.dirname(self.raw_path)
        pid_file = os.path.join(self.directory, "nbdfuse.pid")
        view = nbd.expose(
            mountpoint,
            RAW_NAME,
            socket_path,
            read_only=not self.writable,
            pid_file=pid_file,
            cwd=self.directory,
            log_path=os.path.join(self.directory, "nbdfuse.log"),
        )

        def unexpose() -> None:
            mounts.unmount_fuse(mountpoint)
            if not view.exit_gracefully(FUSE_EXIT_SECONDS):
                view.stop()

        self._hold(
            {"kind": "fuse", "mountpoint": mountpoint, "process": view.record()},
            unexpose,
            view,
        )
        nbd.wait_exposed(
            view,
            pid_file,
            self.raw_path,
            timeout=self._timeout,
            should_stop=self._should_stop,
        )

    def _close(self, *, raising: bool) -> None:
        """Tear down everything still held, last first.

        Each resource rests on the ones set up before it, so the first one
        that cannot be released stops the teardown: what is left stays in
        the ledger, unlocked, for :func:`h2k.guest.cleanup_stale`.
        """
        if self._closed:
            return
        self._closed = True
        failure = self._release_from(list(self._held))
        for entry in self._held:
            if entry.server is not None:
                daemon.leave_behind(entry.server)
        if self._ledger is not None:
            self._ledger.close(keep=failure is not None)
        if failure is not None and raising:
            raise failure

    @contextlib.contextmanager
    def _released(self, held: list[_Held]) -> Iterator[None]:
        """Release ``held`` (it may grow inside) when the block ends, last first.

        An error inside wins over one in the release; the session's teardown
        tries again what could not be released.
        """
        try:
            yield
        except BaseException:
            self._release_from(held)
            raise
        failure = self._release_from(held)
        if failure is not None:
            raise failure

    def _release_from(self, held: Sequence[_Held]) -> OperationError | None:
        """Release ``held`` last first; the error that stopped it, if one did."""
        for entry in reversed(held):
            try:
                self._let_go(entry)
            except (H2KError, OSError) as exc:
                log.error(
                    "guest session %s: cannot release %s: %s",
                    self.session_id,
                    entry.record,
                    exc,
                )
                return self._error(
                    codes.TEARDOWN_FAILED,
                    f"could not release the {entry.record.get('kind')} "
                    f"of guest session {self.session_id}: {exc}",
                    details={
                        "resource": entry.record,
                        "ledger": self._ledger.path if self._ledger else None,
                    },
                )
        return None

    # Reading the disk.

    def partition_table(self) -> PartitionTable | None:
        """The MBR or GPT partition table, None when the disk has none."""
        return read_partition_table(
            self.raw_path, should_stop=self._should_stop, timeout=self._timeout
        )

    def partitions(self) -> list[Partition]:
        """The partitions; OperationError ``NO_PARTITIONS`` when there are none."""
        table = self.partition_table()
        if table is None or not table.partitions:
            raise self._error(
                codes.NO_PARTITIONS,
                f"{self.image} has no partition table"
                if table is None
                else f"the {table.label} partition table of {self.image} is empty",
            )
        return list(table.partitions)

    def volumes(self) -> list[Volume]:
        """Partitions that may hold a filesystem; the whole disk if unpartitioned."""
        table = self.partition_table()
        if table is None:
            return [Volume("disk", 0, self.size)]
        return [p.volume for p in table.partitions if not p.is_extended]

    def _probe(self, volume: Volume) -> Filesystem | None:
        return probe(
            self.raw_path, volume, should_stop=self._should_stop, timeout=self._timeout
        )

    def _lvm(self) -> tuple[list[PhysicalVolume], list[LogicalVolume]]:
        members = [
            v
            for v in self.volumes()
            if (found := self._probe(v)) is not None and found.type == LVM_MEMBER
        ]
        return self._read_lvm(members)

    def _read_lvm(
        self, members: Sequence[Volume]
    ) -> tuple[list[PhysicalVolume], list[LogicalVolume]]:
        if not members:
            return [], []
        loops: dict[str, Volume] = {}
        held: list[_Held] = []
        with self._released(held):
            for volume in members:
                device, entry = self._attach(volume, read_only=True)
                held.append(entry)
                loops[device] = volume
            found = lvm.read_lvm(
                loops,
                system_dir=os.path.join(self.directory, "lvm"),
                should_stop=self._should_stop,
                timeout=self._timeout,
            )
        return found

    def physical_volumes(self) -> list[PhysicalVolume]:
        """The LVM physical volumes on this disk, with their volume group."""
        return self._lvm()[0]

    def logical_volumes(self) -> list[LogicalVolume]:
        """The logical volumes of the volume groups on this disk."""
        return self._lvm()[1]

    def filesystems(self) -> list[Filesystem]:
        """Every signature blkid finds: on each volume and each linear LV.

        Besides filesystems this lists swap, LVM physical volumes and
        encrypted volumes; ``usage`` tells them apart.
        """
        found = []
        members = []
        for volume in self.volumes():
            signature = self._probe(volume)
            if signature is None:
                continue
            found.append(signature)
            if signature.type == LVM_MEMBER:
                members.append(volume)
        for lv in self._read_lvm(members)[1]:
            if lv.volume is not None and (signature := self._probe(lv.volume)):
                found.append(signature)
        return found

    # Mounting.

    def _attach(self, volume: Volume, *, read_only: bool) -> tuple[str, _Held]:
        device = loop.attach(
            self.raw_path,
            offset=volume.offset,
            size=volume.size,
            read_only=read_only,
            # Not stopped on cancellation: losetup may have attached the
            # device already, and a stopped losetup never names it, so it
            # would be left behind unrecorded. Attaching takes milliseconds.
            timeout=self._timeout,
        )
        backing = self.raw_path
        record = {
            "kind": "loop",
            "device": device,
            "backing": backing,
            "offset": volume.offset,
            "sizelimit": volume.size,
        }
        return device, self._hold(record, lambda: loop.detach(device, backing))

    @contextlib.contextmanager
    def attach(self, target: MountTarget, *, writable: bool = False) -> Iterator[str]:
        """A loop device over ``target``'s byte range, unmounted; detached after.

        For the tools that check or repair a volume themselves (e2fsck,
        xfs_repair, pvck), which need a block device that nothing mounts.
        """
        if self._closed:
            raise self._error(codes.SETUP_FAILED, "the guest disk session is closed")
        if writable and not self.writable:
            raise self._error(
                codes.READ_ONLY,
                "a read-only guest disk session cannot attach a writable device",
            )
        device, entry = self._attach(self._volume_of(target), read_only=not writable)
        with self._released([entry]):
            yield device

    def _volume_of(self, target: MountTarget) -> Volume:
        """The byte range of ``target``; an LV no loop device can show is refused."""
        if isinstance(target, LogicalVolume):
            if target.volume is None:
                raise self._error(
                    target.reason_code or codes.LVM_NOT_LINEAR,
                    target.reason or f"{target.path} cannot be shown by a loop device",
                )
            return target.volume
        if isinstance(target, Filesystem | Partition):
            return target.volume
        return target

    def _filesystem_of(self, target: MountTarget) -> Filesystem:
        if isinstance(target, Filesystem):
            return target
        volume = self._volume_of(target)
        found = self._probe(volume)
        if found is None:
            raise self._error(
                codes.UNSUPPORTED_FILESYSTEM, f"no filesystem found on {volume.source}"
            )
        return found

    @contextlib.contextmanager
    def mount(
        self,
        target: MountTarget,
        *,
        writable: bool = False,
        options: Sequence[str] = (),
    ) -> Iterator[str]:
        """Mount ``target`` and yield the mount point; unmount on the way out.

        A read-only mount replays no journal or log, so it writes nothing
        even to a dirty filesystem. ``options`` are added to h2k's own.
        """
        if self._closed:
            raise self._error(codes.MOUNT_FAILED, "the guest disk session is closed")
        if writable and not self.writable:
            raise self._error(
                codes.READ_ONLY,
                "a read-only guest disk session cannot mount read-write",
            )
        fs = self._filesystem_of(target)
        chosen = fstypes.mount_options(fs.type, writable)
        if fs.usage != "filesystem" or chosen is None:
            raise self._error(
                codes.UNSUPPORTED_FILESYSTEM,
                f"{fs.volume.source} holds {fs.type}, which h2k does not mount",
                details={"type": fs.type, "usage": fs.usage},
            )
        kernel_type, mount_options = chosen
        self._mounts += 1
        mountpoint = os.path.join(self.directory, "mnt", str(self._mounts))
        held: list[_Held] = []
        with self._released(held):
            device, loop_entry = self._attach(fs.volume, read_only=not writable)
            held.append(loop_entry)

            def unmount() -> None:
                mounts.unmount(mountpoint, timeout=self._timeout)
                with contextlib.suppress(FileNotFoundError):
                    os.rmdir(mountpoint)

            held.append(self._hold({"kind": "mount", "target": mountpoint}, unmount))
            os.mkdir(mountpoint, 0o700)
            self._mount(
                device,
                mountpoint,
                kernel_type,
                [*mount_options, *options],
                f"{fs.volume.source} ({fs.type})",
            )
            log.info(
                "mounted %s (%s) %s at %s",
                fs.volume.source,
                fs.type,
                "read-write" if writable else "read-only",
                mountpoint,
            )
            yield mountpoint

    @contextlib.contextmanager
    def mount_at(
        self,
        source: str,
        target: str,
        fstype: str,
        options: Sequence[str] = (),
    ) -> Iterator[str]:
        """Mount ``source`` on ``target`` inside one of this session's mounts.

        For what an operation mounts on top of a guest filesystem (proc,
        sysfs, a /dev, a bind of the guest's /boot into its root, before
        running the guest's own tools in a chroot). The mount is recorded in
        the ledger first, so this session's teardown, or
        :func:`h2k.guest.cleanup_stale` after a crash, unmounts it before
        the filesystem it sits on. ``target`` must exist and contain no
        symlink: mount would follow one out of the session.
        """
        if self._closed:
            raise self._error(codes.MOUNT_FAILED, "the guest disk session is closed")
        inside = os.path.join(self.directory, "mnt") + os.sep
        if not target.startswith(inside) or os.path.realpath(target) != target:
            raise self._error(
                codes.MOUNT_FAILED,
                f"{target} is not a directory inside a mount of this session",
            )
        held = self._hold(
            {"kind": "mount", "target": target},
            lambda: mounts.unmount(target, timeout=self._timeout),
        )
        with self._released([held]):
            self._mount(
                source, target, fstype, options, f"{source} ({fstype}) on {target}"
            )
            yield target

    def _mount(
        self,
        source: str,
        target: str,
        fstype: str,
        options: Sequence[str],
        what: str,
    ) -> None:
        """mount(8) within the session's limits; a failure is ``MOUNT_FAILED``."""
        try:
            mounts.mount(
                source,
                target,
                fstype,
                options,
                should_stop=self._should_stop,
                timeout=self._timeout,
            )
        except (ToolCancelled, ToolTimeout):
            raise
        except ToolError as exc:
            raise self._error(
                codes.MOUNT_FAILED,
                f"cannot mount {what}: {exc}",
                details={"stderr": exc.stderr[-2000:]},
            ) from exc
