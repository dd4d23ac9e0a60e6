"""Rebuild a Linux guest's initramfs with the virtio drivers, by the guest's tool.

A guest moved from VMware or Hyper-V boots on KVM from a virtio disk, and an
initramfs made for the old hypervisor (``MODULES=dep``, a host-only dracut)
has no driver to find it. Only the guest's own initramfs tool knows how its
distribution builds one, so this operation runs that tool, in a chroot of
the guest (:mod:`h2k.guest.chroot`), with the virtio drivers added both on
its command line and in its configuration, so that later kernel updates
keep them:

- dracut: ``add_drivers+=`` in /etc/dracut.conf.d/h2k-virtio.conf, then
  ``dracut --force --no-hostonly --add-drivers "..." <image> <kver>``;
- initramfs-tools: the drivers appended to /etc/initramfs-tools/modules,
  then ``update-initramfs -u -k <kver>``;
- mkinitcpio: the drivers added to ``MODULES=(...)`` in /etc/mkinitcpio.conf,
  then ``mkinitcpio -k <kver> -g <image>``.

The guest's root is found as inspect finds it (:mod:`h2k.guestos.access`,
:mod:`h2k.guestos.find_root`); its /boot is mounted into it when /etc/fstab
puts /boot on another filesystem of the disk, looked up as offline_fix
looks it up (:func:`h2k.guestos.mounted.fstab_filesystem`). The tools, their
places and the drivers are those of :mod:`h2k.guestos.initramfs_config`.
Kernels are those with a /lib/modules/<kver> directory and a
/boot/vmlinuz-<kver> (or /lib/modules/<kver>/vmlinuz); ``parameters.kernels``
picks some of them. A driver the kernel has built in needs no module; one
it lacks altogether is reported, not passed to the tool.

Success is proven, not assumed: afterwards every image is listed with the
guest's own lister (lsinitrd, lsinitramfs, lsinitcpio) and must hold each
driver the kernel has as a module, and its sha256 must have changed. The
result carries that listing as evidence.

Phases: ``validation``, ``inspection``, ``regeneration``, ``verification``,
``finalize``. Codes: ``NO_OPERATING_SYSTEM``, ``UNSUPPORTED_GUEST`` (no
kernel, a /boot that is not on this disk, or Windows), ``NO_INITRAMFS_TOOL``,
``INITRAMFS_FAILED`` (the tool failed, with its last output, or its image
lacks the drivers), ``INVALID_PARAMETERS`` (a kernel that is not there),
``CANCELLED``, ``TIMEOUT``, ``TOOL_FAILED`` and the guest-disk layer's codes.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from h2k.errors import ToolCancelled, ToolError, ToolTimeout
from h2k.guest import Filesystem, GuestDisk
from h2k.guest.chroot import Chroot, guest_path, prepared
from h2k.guest.chroot import bind as bind_into
from h2k.guestos import fstab, initramfs_config, osrelease
from h2k.guestos.access import read_layout, require_linux
from h2k.guestos.devices import DeviceIndex, DiskFs
from h2k.guestos.find_root import find_root
from h2k.guestos.initramfs_config import (
    DRACUT,
    INITRAMFS_MODULES,
    INITRAMFS_TOOLS,
    MKINITCPIO,
    MKINITCPIO_CONF,
    TOOLS,
)
from h2k.guestos.initramfs_config import VIRTIO_MODULES as DRIVERS
from h2k.guestos.mounted import BOOT, fstab_filesystem
from h2k.guestos.tree import GuestTree
from h2k.operations import codes
from h2k.operations.base import OperationContext
from h2k.operations.common import (
    FINALIZE,
    VALIDATION,
    fail,
    invalid_parameter,
    stop_if_asked,
    tool_errors,
    tool_failure,
)
from h2k.operations.target import WorkTarget, open_guest_disk, working_image
from h2k.tools.checksum import sha256_file

log = logging.getLogger(__name__)

INSPECTION = "inspection"
REGENERATION = "regeneration"
VERIFICATION = "verification"

# Where each tool's lister lives in a guest, in order of preference.
LISTERS: dict[str, tuple[str, ...]] = {
    DRACUT: ("/usr/bin/lsinitrd", "/usr/sbin/lsinitrd", "/bin/lsinitrd"),
    INITRAMFS_TOOLS: ("/usr/bin/lsinitramfs", "/bin/lsinitramfs"),
    MKINITCPIO: ("/usr/bin/lsinitcpio", "/bin/lsinitcpio"),
}
# The same drop-in offline_fix's initramfs_config fix writes: one file.
DRACUT_CONF = initramfs_config.H2K_DRACUT_CONF
MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")
# Per tool run when the job has no time limit: dracut on a slow disk.
DEFAULT_TOOL_SECONDS = 1800.0
OUTPUT_TAIL_LINES = 20
REPORT_EVERY_SECONDS = 1.0
_MKINITCPIO_MODULES = re.compile(r"^MODULES=\(([^)]*)\)", re.MULTILINE)


@dataclass
class _Kernel:
    version: str
    image: str
    # Drivers the kernel has as loadable modules, built in, or not at all.
    modules: list[str]
    builtin: list[str]
    missing: list[str]
    size_before: int | None = None
    sha256_before: str | None = None
    command: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "initramfs_path": self.image,
            "size_before": self.size_before,
            "size_after": None,
            "sha256_before": self.sha256_before,
            "sha256_after": None,
            "command": self.command,
            "drivers": {
                "modules": self.modules,
                "builtin": self.builtin,
                "missing": self.missing,
            },
        }


@dataclass(frozen=True)
class _Guest:
    root: Filesystem
    boot: Filesystem | None
    os_name: str | None
    family: set[str]


def run(ctx: OperationContext) -> dict[str, Any]:
    """Rebuild the initramfs of the guest in ``ctx.spec["image"]``."""
    ctx.report(VALIDATION, 0, "Checking the image and the parameters")
    wanted = _requested_kernels(ctx.parameters)
    with working_image(ctx) as target:
        try:
            with tool_errors(INSPECTION, codes.TOOL_FAILED, "reading the guest disk"):
                result = _regenerate(ctx, target, wanted)
        except OSError as exc:
            # A guest file that cannot be read or written (a symlink loop,
            # a full filesystem); the disk session is already torn down.
            raise fail(
                INSPECTION,
                codes.TOOL_FAILED,
                f"cannot read or write the guest's files: {exc}",
            ) from exc
    result["output"] = target.describe()
    done = "Would rebuild" if target.dry_run else "Rebuilt"
    ctx.report(
        FINALIZE,
        100,
        f"{done} {len(result['kernels'])} initramfs image(s) with {result['tool']}",
        {"tool": result["tool"]},
    )
    log.info("job %s: initramfs %s with %s", ctx.job_id, done, result["tool"])
    return result


def _requested_kernels(params: dict[str, Any]) -> list[str] | None:
    kernels = params.get("kernels")
    if kernels is None:
        return None
    if not isinstance(kernels, list) or not all(
        isinstance(k, str) and k and "/" not in k and k not in (".", "..")
        for k in kernels
    ):
        raise invalid_parameter(
            "parameters.kernels", "parameters.kernels must be a list of kernel versions"
        )
    return list(dict.fromkeys(kernels))


def _regenerate(
    ctx: OperationContext, target: WorkTarget, wanted: list[str] | None
) -> dict[str, Any]:
    opening = f"Opening the guest disk {target.source.path}"
    with open_guest_disk(ctx, target, INSPECTION, opening, 5) as disk:
        guest = _find_guest(ctx, disk)
        with _mounted_guest(disk, guest, writable=target.writable) as root:
            tool, tool_path = _detect_tool(root)
            ctx.report(
                INSPECTION,
                20,
                f"The guest builds its initramfs with {tool} ({tool_path})",
                {"tool": tool},
            )
            kernels = _kernels(root, tool, guest, wanted)
            summary = {
                "tool": tool,
                "tool_path": tool_path,
                "guest": {
                    "os": guest.os_name,
                    "root": guest.root.volume.source,
                    "boot": guest.boot.volume.source if guest.boot else None,
                },
                "dry_run": target.dry_run,
            }
            drivers = _drivers_to_add(ctx, kernels)
            if target.dry_run:
                return _dry_run(ctx, summary, tool, kernels, drivers)
            with prepared(disk, root, phase=REGENERATION) as chroot:
                changes = _configure(chroot, tool, drivers)
                _run_tool(ctx, target, chroot, tool, kernels)
                entries = _verify(ctx, target, chroot, tool, kernels)
    return {
        **summary,
        "kernels": entries,
        "drivers_added": drivers,
        "config_changes": changes,
    }


def _drivers_to_add(ctx: OperationContext, kernels: list[_Kernel]) -> list[str]:
    """The drivers some kernel has as a module; a kernel lacking one is reported."""
    for kernel in kernels:
        if kernel.missing:
            ctx.report(
                INSPECTION,
                None,
                f"Kernel {kernel.version} has no {', '.join(kernel.missing)} "
                "at all, built in or as a module",
                {"kernel": kernel.version},
            )
    return [d for d in DRIVERS if any(d in k.modules for k in kernels)]


def _dry_run(
    ctx: OperationContext,
    summary: dict[str, Any],
    tool: str,
    kernels: list[_Kernel],
    drivers: list[str],
) -> dict[str, Any]:
    """What a real run would do: the commands and drivers, nothing changed."""
    for kernel in kernels:
        kernel.command = _tool_command(tool, kernel)
    versions = ", ".join(k.version for k in kernels)
    ctx.report(INSPECTION, 100, f"Dry run: would run {tool} for {versions}")
    return {
        **summary,
        "kernels": [k.describe() for k in kernels],
        "drivers_added": [],
        "drivers_to_add": drivers,
        "config_changes": [],
    }


# Finding the guest.


def _read(host_path: str, limit: int = 1 << 20) -> str | None:
    try:
        with open(host_path, encoding="utf-8", errors="replace") as f:
            return f.read(limit)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None


def _find_guest(ctx: OperationContext, disk: GuestDisk) -> _Guest:
    """The guest's root, and the filesystem its fstab mounts on /boot."""

    def checkpoint() -> None:
        stop_if_asked(ctx, INSPECTION)

    facts = read_layout(disk, checkpoint)
    facts.search = find_root(disk, facts.filesystems, checkpoint)
    root = require_linux(facts, INSPECTION)
    with disk.mount(root.fs) as mountpoint:
        tree = GuestTree({"/": (mountpoint, False)})
        release = osrelease.read(tree)
        spec = fstab.mount_spec(tree, BOOT)
    boot = None if spec is None else _boot_filesystem(disk, facts.devices, root, spec)
    fields = {} if release is None else release.fields
    ctx.report(
        INSPECTION,
        10,
        f"Found {fields.get('PRETTY_NAME', 'a Linux guest')} on {root.source}"
        + (f", /boot on {boot.source}" if boot else ""),
    )
    family = set() if release is None else {release.id, *release.id_like}
    return _Guest(
        root.fs, None if boot is None else boot.fs, fields.get("PRETTY_NAME"), family
    )


def _boot_filesystem(
    disk: GuestDisk, devices: DeviceIndex, root: DiskFs, spec: str
) -> DiskFs | None:
    """The filesystem ``spec`` (fstab's /boot) names; None when it is the root."""
    boot = fstab_filesystem(disk, devices, root, spec, BOOT, [])
    if boot is None:
        raise fail(
            INSPECTION,
            codes.UNSUPPORTED_GUEST,
            f"the guest mounts /boot from {spec}, which is no filesystem of this disk",
        )
    return None if boot.fs.volume == root.fs.volume else boot


@contextlib.contextmanager
def _mounted_guest(disk: GuestDisk, guest: _Guest, *, writable: bool) -> Iterator[str]:
    """The guest's root mounted, with its /boot bound in when separate."""
    with disk.mount(guest.root, writable=writable) as root:
        if guest.boot is None:
            yield root
            return
        with disk.mount(guest.boot, writable=writable) as boot:
            with bind_into(
                disk, root, "/boot", boot, create=writable, phase=INSPECTION
            ):
                yield root


def _detect_tool(root: str) -> tuple[str, str]:
    """The first of :data:`TOOLS` the guest has, and where."""
    found = initramfs_config.tools(GuestTree({"/": (root, False)}))
    if found:
        return found[0]["name"], found[0]["path"]
    looked = ", ".join(p for paths in TOOLS.values() for p in paths)
    raise fail(
        INSPECTION,
        codes.NO_INITRAMFS_TOOL,
        "the guest has no initramfs tool: none of dracut, update-initramfs "
        f"(initramfs-tools) or mkinitcpio was found (looked for {looked})",
        looked_for=[p for paths in TOOLS.values() for p in paths],
    )


# Kernels and their drivers.


def _module_name(filename: str) -> str | None:
    for suffix in MODULE_SUFFIXES:
        if filename.endswith(suffix):
            return filename[: -len(suffix)].replace("-", "_")
    return None


def _kernel_drivers(root: str, version: str) -> tuple[list[str], list[str], list[str]]:
    """Which of :data:`DRIVERS` ``version`` has as modules, built in, or lacks."""
    directory = guest_path(root, f"/lib/modules/{version}")
    present: set[str] = set()
    for _, _, files in os.walk(directory):
        present.update(n for f in files if (n := _module_name(f)) is not None)
    builtin_text = (
        _read(guest_path(root, f"/lib/modules/{version}/modules.builtin")) or ""
    )
    builtin = {
        name
        for line in builtin_text.splitlines()
        if (name := _module_name(os.path.basename(line.strip())))
    }
    modules = [d for d in DRIVERS if d in present]
    built = [d for d in DRIVERS if d not in present and d in builtin]
    missing = [d for d in DRIVERS if d not in present and d not in builtin]
    return modules, built, missing


def _image_path(root: str, tool: str, version: str, guest: _Guest) -> str:
    """The guest path of ``version``'s initramfs, as the guest's tool names it."""
    if tool == INITRAMFS_TOOLS:
        return f"/boot/initrd.img-{version}"
    if tool == MKINITCPIO:
        pkgbase = _read(guest_path(root, f"/lib/modules/{version}/pkgbase"))
        if pkgbase and pkgbase.strip():
            return f"/boot/initramfs-{pkgbase.strip()}.img"
        return f"/boot/initramfs-{version}.img"
    candidates = [
        f"/boot/initramfs-{version}.img",
        f"/boot/initrd.img-{version}",
        f"/boot/initrd-{version}",
    ]
    for candidate in candidates:
        if os.path.isfile(guest_path(root, candidate)):
            return candidate
    if guest.family & {"debian", "ubuntu"}:
        return candidates[1]
    if guest.family & {"suse", "opensuse"}:
        return candidates[2]
    return candidates[0]


def _kernels(
    root: str, tool: str, guest: _Guest, wanted: list[str] | None
) -> list[_Kernel]:
    modules_dir = guest_path(root, "/lib/modules")
    names = sorted(os.listdir(modules_dir)) if os.path.isdir(modules_dir) else []
    found = [
        name
        for name in names
        if os.path.isdir(guest_path(root, f"/lib/modules/{name}"))
        and (
            os.path.isfile(guest_path(root, f"/boot/vmlinuz-{name}"))
            or os.path.isfile(guest_path(root, f"/lib/modules/{name}/vmlinuz"))
        )
    ]
    if not found:
        raise fail(
            INSPECTION,
            codes.UNSUPPORTED_GUEST,
            "the guest has no kernel: no /lib/modules/<version> directory with a "
            "/boot/vmlinuz-<version> beside it",
        )
    if wanted is not None:
        unknown = [k for k in wanted if k not in found]
        if unknown:
            message = (
                f"the guest has no kernel {', '.join(unknown)}; "
                f"it has {', '.join(found)}"
            )
            raise fail(
                INSPECTION,
                codes.INVALID_PARAMETERS,
                message,
                fields={"parameters.kernels": [message]},
            )
        found = [k for k in found if k in wanted]
    kernels = []
    for version in found:
        modules, builtin, missing = _kernel_drivers(root, version)
        image = _image_path(root, tool, version, guest)
        kernel = _Kernel(version, image, modules, builtin, missing)
        host = guest_path(root, image)
        if os.path.isfile(host):
            kernel.size_before = os.path.getsize(host)
            kernel.sha256_before = sha256_file(host)
        kernels.append(kernel)
    return kernels


# Configuring and running the tool.


def _tool_command(tool: str, kernel: _Kernel) -> list[str]:
    if tool == DRACUT:
        command = ["dracut", "--force", "--no-hostonly"]
        if kernel.modules:
            command += ["--add-drivers", " ".join(kernel.modules)]
        return [*command, kernel.image, kernel.version]
    if tool == INITRAMFS_TOOLS:
        return ["update-initramfs", "-u", "-k", kernel.version]
    return ["mkinitcpio", "-k", kernel.version, "-g", kernel.image]


def _write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _configure(chroot: Chroot, tool: str, drivers: list[str]) -> list[dict[str, Any]]:
    """Name the drivers in the tool's configuration; what was changed."""
    if not drivers:
        return []
    if tool == DRACUT:
        path = DRACUT_CONF
        text = (
            "# Added by h2k: the disk and network drivers of KVM.\n"
            f'add_drivers+=" {" ".join(drivers)} "\n'
        )
        if _read(chroot.path(path)) == text:
            return []
        _write(chroot.path(path), text)
        return [{"path": path, "added": drivers}]
    if tool == INITRAMFS_TOOLS:
        path = INITRAMFS_MODULES
        current = _read(chroot.path(path)) or ""
        listed = {
            line.split()[0]
            for line in current.splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        }
        added = [d for d in drivers if d not in listed]
        if not added:
            return []
        if current and not current.endswith("\n"):
            current += "\n"
        _write(
            chroot.path(path),
            current + "# Added by h2k for KVM.\n" + "".join(f"{d}\n" for d in added),
        )
        return [{"path": path, "added": added}]
    path = MKINITCPIO_CONF
    current = _read(chroot.path(path)) or ""
    match = _MKINITCPIO_MODULES.search(current)
    modules = match.group(1).split() if match else []
    added = [d for d in drivers if d not in modules]
    if not added:
        return []
    line = f"MODULES=({' '.join([*modules, *added])})"
    if match:
        text = current[: match.start()] + line + current[match.end() :]
    else:
        text = current + ("" if current.endswith("\n") or not current else "\n")
        text += line + "\n"
    _write(chroot.path(path), text)
    return [{"path": path, "added": added}]


class _Output:
    """The tool's last lines, for an error; a few of them reported as progress."""

    def __init__(self, ctx: OperationContext, phase: str):
        self.lines: collections.deque[str] = collections.deque(maxlen=OUTPUT_TAIL_LINES)
        self._ctx = ctx
        self._phase = phase
        self._last = 0.0

    def __call__(self, line: str) -> None:
        self.lines.append(line.rstrip())
        now = time.monotonic()
        if now - self._last >= REPORT_EVERY_SECONDS:
            self._last = now
            self._ctx.report(self._phase, None, line.strip()[:500])

    def tail(self, stderr: str = "") -> list[str]:
        extra = [line for line in stderr.splitlines() if line.strip()]
        return [*self.lines, *extra][-OUTPUT_TAIL_LINES:]


def _in_chroot(
    ctx: OperationContext,
    target: WorkTarget,
    chroot: Chroot,
    argv: list[str],
    phase: str,
    what: str,
    **details: Any,
) -> str:
    """Run ``argv`` in the guest; its output, or ``INITRAMFS_FAILED`` saying
    ``what`` failed, with its last output and ``details``."""
    stop_if_asked(ctx, phase)
    output = _Output(ctx, phase)
    try:
        result = chroot.run(
            argv,
            on_line=output,
            should_stop=ctx.should_stop,
            timeout=target.deadline.capped(phase, DEFAULT_TOOL_SECONDS),
        )
    except (ToolCancelled, ToolTimeout) as exc:
        raise tool_failure(phase, codes.INITRAMFS_FAILED, argv[0], exc) from exc
    except ToolError as exc:
        tail = output.tail(exc.stderr)
        raise fail(
            phase,
            codes.INITRAMFS_FAILED,
            f"{what} (exit status {exc.returncode}): " + " | ".join(tail[-3:]),
            output=tail,
            **details,
        ) from exc
    return result.stdout


def _run_tool(
    ctx: OperationContext,
    target: WorkTarget,
    chroot: Chroot,
    tool: str,
    kernels: list[_Kernel],
) -> None:
    for index, kernel in enumerate(kernels):
        kernel.command = _tool_command(tool, kernel)
        ctx.report(
            REGENERATION,
            100 * index // len(kernels),
            f"Running {tool} for kernel {kernel.version}",
            {"command": " ".join(kernel.command)},
        )
        _in_chroot(
            ctx,
            target,
            chroot,
            kernel.command,
            REGENERATION,
            f"{tool} failed for kernel {kernel.version}",
            command=kernel.command,
        )
    ctx.report(REGENERATION, 100, f"{tool} finished for every kernel")


def _listed_drivers(listing: str) -> dict[str, str]:
    """Driver name -> path in the image, from a lister's output."""
    found: dict[str, str] = {}
    for line in listing.splitlines():
        fields = line.split()
        if not fields:
            continue
        path = fields[-1]
        name = _module_name(os.path.basename(path))
        if name in DRIVERS:
            found.setdefault(name, path)
    return found


def _verify(
    ctx: OperationContext,
    target: WorkTarget,
    chroot: Chroot,
    tool: str,
    kernels: list[_Kernel],
) -> list[dict[str, Any]]:
    """Prove each new image exists, changed, and holds the drivers."""
    lister = next(
        (p for p in LISTERS[tool] if os.path.isfile(chroot.path(p))),
        None,
    )
    entries = []
    for index, kernel in enumerate(kernels):
        ctx.report(
            VERIFICATION,
            100 * index // len(kernels),
            f"Checking {kernel.image}",
        )
        host = chroot.path(kernel.image)
        if not os.path.isfile(host):
            raise fail(
                VERIFICATION,
                codes.INITRAMFS_FAILED,
                f"{tool} reported success but {kernel.image} does not exist",
            )
        entry = kernel.describe()
        entry["size_after"] = os.path.getsize(host)
        entry["sha256_after"] = sha256_file(host)
        if entry["sha256_after"] == kernel.sha256_before:
            raise fail(
                VERIFICATION,
                codes.INITRAMFS_FAILED,
                f"{tool} reported success but left {kernel.image} unchanged "
                "(is it disabled in the guest's configuration?)",
            )
        if lister is None:
            raise fail(
                VERIFICATION,
                codes.INITRAMFS_FAILED,
                f"the guest has no lister for {tool} images "
                f"({', '.join(LISTERS[tool])}), so the new image cannot be checked",
            )
        listing = _in_chroot(
            ctx,
            target,
            chroot,
            [lister, kernel.image],
            VERIFICATION,
            f"cannot list {kernel.image}",
        )
        in_image = _listed_drivers(listing)
        absent = [d for d in kernel.modules if d not in in_image]
        if absent:
            raise fail(
                VERIFICATION,
                codes.INITRAMFS_FAILED,
                f"the new {kernel.image} lacks {', '.join(absent)}",
                listed=sorted(in_image.values()),
            )
        entry["verification"] = {
            "lister": lister,
            "modules_in_image": in_image,
            "entries_listed": len(listing.splitlines()),
        }
        entries.append(entry)
        ctx.report(
            VERIFICATION,
            100 * (index + 1) // len(kernels),
            f"{kernel.image} holds {', '.join(sorted(in_image)) or 'no module'}",
        )
    return entries
