"""qemu-img, called the one way h2k trusts it.

Images come from outside, so the format is always named (``-f``, ``-F``,
``-O``): letting qemu-img guess would let a guest that wrote a qcow2 header
into its raw disk make us read files the header names. The one exception is
:func:`probe_format`, whose answer only ever refuses an image or explains a
refusal, never decides how an image is opened.

An image can make qemu-img read other files: a backing file, VMDK extents, a
qcow2 external data file. :func:`verify_declared_format` refuses an image
when any of them lies outside the allowed roots, before anything reads them.

Some drivers are opened with read options (:data:`READ_OPTIONS`), through
``--image-opts`` with the driver still named: a VHD's size is read from its
footer's current size, not from its CHS geometry (see :data:`READ_OPTIONS`).

Failures come back as h2k errors: :class:`~h2k.errors.ToolError` (and its
cancelled / timed out kinds) from :func:`~h2k.tools.process.run_tool`, and
:class:`~h2k.errors.InvalidInput` where the image or a parameter is wrong.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from h2k.errors import InvalidInput, ToolError
from h2k.paths import resolve_inside
from h2k.tools.process import run_tool

log = logging.getLogger(__name__)

QEMU_IMG = "qemu-img"

# Wire format name (what a job spec says) -> qemu block driver.
QEMU_FORMATS: dict[str, str] = {
    "vmdk": "vmdk",
    "vhd": "vpc",
    "vhdx": "vhdx",
    "vdi": "vdi",
    "qcow2": "qcow2",
    "raw": "raw",
}
WIRE_FORMATS: dict[str, str] = {driver: wire for wire, driver in QEMU_FORMATS.items()}

# Options h2k reads a source with, by driver (convert, compare, measure).
#
# vpc: a VHD footer holds the disk's size twice, as a byte count ("current
# size") and as a CHS geometry that can only approximate it. Virtual PC sized
# disks by the geometry; Hyper-V, Azure, disk2vhd and XenServer use the byte
# count. qemu 7.2 picks one from the footer's creator application ("win ",
# "qem2", "d2v ", "CTXS", "tap" and a maximal geometry mean the byte count;
# anything else, VirtualBox's "vbox" and Virtual PC's "vpc " included, means
# the geometry), so a VHD from a tool it does not know, whose size is not a
# whole geometry, would be read a little short and its last sectors lost.
# force_size_calc=current_size makes qemu use the byte count always. That
# never drops data: the footer's byte count is what the file holds, and
# for the images qemu itself sizes by geometry (creator "qemu") both agree.
READ_OPTIONS: dict[str, dict[str, str]] = {
    "vpc": {"force_size_calc": "current_size"},
}

# Metadata commands read headers only; a minute means something is wrong.
INFO_TIMEOUT_SECONDS = 60.0
# A backing chain deeper than this is refused rather than walked.
MAX_CHAIN_DEPTH = 16

# qemu-img check exit statuses (qemu-img(1)).
CHECK_CLEAN = 0
CHECK_CORRUPTED = 2
CHECK_LEAKED = 3
CHECK_UNSUPPORTED = 63
# qemu-img compare exit statuses.
COMPARE_IDENTICAL = 0
COMPARE_DIFFERENT = 1

_PROGRESS = re.compile(r"\(\s*(\d+(?:\.\d+)?)/100%\)")
_VERSION = re.compile(r"version\s+(\d[^\s,()]*)")
# "json:{...}" or "nbd://host": names qemu opens through a protocol, which
# no path check can vouch for.
_PROTOCOL = re.compile(r"^(json:|[A-Za-z][A-Za-z0-9+.-]*://)")
# qemu's vhdx driver refuses to open read-only an image whose log was not
# replayed (the VM was not shut down cleanly); replaying it writes the image.
_DIRTY_LOG = "contains a log that needs to be replayed"


class FormatMismatch(InvalidInput):
    """The image is not in the format its job declares.

    ``detected`` is the wire name qemu-img finds (or its driver name when h2k
    has no wire name for it), or None when qemu-img recognises nothing.
    """

    def __init__(
        self,
        message: str,
        fields: dict[str, list[str]],
        declared: str,
        detected: str | None,
    ):
        super().__init__(message, fields)
        self.declared = declared
        self.detected = detected

    def __reduce__(self) -> Any:
        return (
            type(self),
            (self.message, self.fields, self.declared, self.detected),
        )


class ReferenceOutsideRoots(InvalidInput):
    """The image refers to a file (backing, extent, data file) outside the roots."""


def driver_for(fmt: str, field: str) -> str:
    """The qemu driver of wire format ``fmt``, or InvalidInput naming ``field``."""
    try:
        return QEMU_FORMATS[fmt]
    except (KeyError, TypeError):
        known = ", ".join(sorted(QEMU_FORMATS))
        message = f"{field} is {fmt!r}; expected one of {known}"
        raise InvalidInput(message, {field: [message]}) from None


def last_line(exc: ToolError) -> str:
    """The line of a tool's error output that says what went wrong."""
    lines = exc.stderr.splitlines()
    return lines[-1] if lines else f"exit status {exc.returncode}, no message"


def error_summary(exc: ToolError) -> str:
    """qemu-img's own error line, even when hint lines follow it.

    qemu-img prints hints after some errors (a dirty VHDX's "To replay the
    log, run: qemu-img check -r all ..."); the last line alone would name
    the remedy without the problem.
    """
    lines = [line for line in exc.stderr.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith(f"{QEMU_IMG}:"):
            return line
    return last_line(exc)


def _json_output(result_stdout: str, args: list[str]) -> Any:
    try:
        return json.loads(result_stdout)
    except json.JSONDecodeError as exc:
        raise ToolError(
            QEMU_IMG, args, 0, f"output is not JSON: {result_stdout[:200]!r}"
        ) from exc


def version() -> str:
    """The qemu-img version, e.g. ``7.2.22``."""
    args = [QEMU_IMG, "--version"]
    result = run_tool(args, timeout=INFO_TIMEOUT_SECONDS)
    match = _VERSION.search(result.stdout)
    if match is None:
        raise ToolError(
            QEMU_IMG, args, result.returncode, f"no version in {result.stdout!r}"
        )
    return match.group(1)


def info(path: str, fmt: str) -> dict[str, Any]:
    """``qemu-img info`` of ``path`` opened as wire format ``fmt``.

    ``-U`` lets the header be read while another process holds the image;
    info never opens the backing file.
    """
    driver = driver_for(fmt, "image.format")
    args = [QEMU_IMG, "info", "-f", driver, "--output=json", "-U", path]
    result = run_tool(args, timeout=INFO_TIMEOUT_SECONDS)
    details = _json_output(result.stdout, args)
    if not isinstance(details, dict):
        raise ToolError(QEMU_IMG, args, 0, f"unexpected info output: {details!r}")
    return details


def image_opts(path: str, fmt: str, field: str = "image.format") -> str:
    """The ``--image-opts`` string that opens ``path`` as wire format ``fmt``.

    The driver is always named, with its :data:`READ_OPTIONS`; the path is
    made absolute, so qemu never reads a protocol prefix (``nbd:``) into
    it, and its commas are doubled, as QemuOpts syntax wants.
    """
    driver = driver_for(fmt, field)
    options = [f"driver={driver}"]
    options += [f"{key}={value}" for key, value in READ_OPTIONS.get(driver, {}).items()]
    filename = os.path.abspath(path).replace(",", ",,")
    options.append(f"file.filename={filename}")
    return ",".join(options)


def has_read_options(fmt: str) -> bool:
    """Whether h2k opens images of wire format ``fmt`` with read options."""
    return QEMU_FORMATS.get(fmt) in READ_OPTIONS


def _image_args(
    images: Sequence[tuple[str, str, str]], flags: Sequence[str]
) -> tuple[list[str], list[str]]:
    """(options, names) opening each (path, format, field) of ``images``.

    ``--image-opts`` applies to every image of a command, so when any one
    needs read options all are given as option strings; otherwise each
    format goes with its flag from ``flags`` (``-f``, ``-F``).
    """
    if any(has_read_options(fmt) for _, fmt, _ in images):
        names = [image_opts(path, fmt, field) for path, fmt, field in images]
        return ["--image-opts"], names
    options: list[str] = []
    for flag, (_, fmt, field) in zip(flags, images, strict=True):
        options += [flag, driver_for(fmt, field)]
    return options, [path for path, _, _ in images]


def source_info(path: str, fmt: str) -> dict[str, Any]:
    """``qemu-img info`` of ``path`` read as h2k reads a source.

    The same as :func:`info` but for formats with :data:`READ_OPTIONS`,
    whose virtual size may differ (a VHD's footer size, not its geometry).
    """
    if not has_read_options(fmt):
        return info(path, fmt)
    args = [QEMU_IMG, "info", "--output=json", "-U", "--image-opts"]
    args.append(image_opts(path, fmt))
    result = run_tool(args, timeout=INFO_TIMEOUT_SECONDS)
    details = _json_output(result.stdout, args)
    if not isinstance(details, dict):
        raise ToolError(QEMU_IMG, args, 0, f"unexpected info output: {details!r}")
    return details


def parse_measure(text: str, args: list[str]) -> dict[str, int]:
    """``required`` and ``fully_allocated`` bytes from ``measure --output=json``."""
    report = _json_output(text, args)
    try:
        return {
            "required": int(report["required"]),
            "fully_allocated": int(report["fully-allocated"]),
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise ToolError(
            QEMU_IMG, args, 0, f"unexpected measure output: {text[:200]!r}"
        ) from exc


def measure(
    src: str,
    src_fmt: str,
    dst_fmt: str,
    *,
    should_stop: Callable[[], bool] | None = None,
    timeout: float | None = None,
) -> dict[str, int]:
    """Bytes a conversion of ``src`` into ``dst_fmt`` will write.

    ``required`` is what the output needs for the data the source holds
    (read through its whole backing chain); ``fully_allocated`` what it
    would need if every block were written. qemu-img 7.2's measure has no
    compression flag: for a compressed qcow2 ``required`` is an upper bound,
    since qemu writes a cluster that does not shrink uncompressed. For raw
    it is the whole virtual size: qemu-img leaves zeros as holes, so the file
    takes less at first, but it grows towards that size as the guest writes,
    and a thin file on a full filesystem fails the guest's writes.
    """
    dst_driver = driver_for(dst_fmt, "parameters.output_format")
    options, names = _image_args([(src, src_fmt, "image.format")], ["-f"])
    args = [QEMU_IMG, "measure", "--output=json", "-O", dst_driver, *options, *names]
    result = run_tool(args, should_stop=should_stop, timeout=timeout)
    return parse_measure(result.stdout, args)


def _probe_driver(path: str) -> str | None:
    """The qemu driver qemu-img guesses for ``path``, None if it cannot open it."""
    args = [QEMU_IMG, "info", "--output=json", "-U", path]
    try:
        result = run_tool(args, timeout=INFO_TIMEOUT_SECONDS)
        details = _json_output(result.stdout, args)
    except ToolError as exc:
        log.info("qemu-img cannot probe %s: %s", path, exc)
        return None
    driver = details.get("format") if isinstance(details, dict) else None
    return driver if isinstance(driver, str) else None


def probe_format(path: str) -> str | None:
    """The wire format qemu-img detects in ``path``, None if none it knows.

    Only for explaining or refusing: never open an image with this answer.
    """
    driver = _probe_driver(path)
    return WIRE_FORMATS.get(driver) if driver else None


def _sibling(field: str, name: str) -> str:
    """``image.format`` -> ``image.path``: where errors about a path belong."""
    head, dot, _ = field.rpartition(".")
    return f"{head}{dot}{name}"


def _mismatch(
    path: str, declared: str, driver: str | None, field: str, note: str = ""
) -> FormatMismatch | None:
    """The error for an image qemu-img sees as ``driver``, if not ``declared``."""
    if driver is None or driver == QEMU_FORMATS[declared]:
        return None
    detected = WIRE_FORMATS.get(driver, driver)
    if detected == "raw":
        message = (
            f"{field} says {declared} but qemu-img finds no {declared} header in "
            f"{path}; it looks like a raw disk"
        )
    elif detected in QEMU_FORMATS:
        message = (
            f"{field} says {declared} but {path} is a {detected} image; "
            f'set {field} to "{detected}" if that is the disk to convert'
        )
    else:
        message = (
            f"{field} says {declared} but {path} is a {detected} image, "
            "a format h2k does not convert"
        )
    message += note
    return FormatMismatch(message, {field: [message]}, declared, detected)


def verify_declared_format(
    path: str,
    declared: str,
    allowed_roots: Iterable[str],
    field: str = "image.format",
) -> dict[str, Any]:
    """Check that ``path`` opens as ``declared`` and return its info.

    Opening with the declared format comes first; only when that fails is
    the format probed, to tell the person what the file really is. A raw
    driver opens anything, so a raw declaration is also refused when qemu-img
    recognises a structured format: reading a qcow2 file as raw would
    convert the container, not the disk. Every file the image refers to must
    lie inside ``allowed_roots``.
    """
    roots = tuple(allowed_roots)
    path = os.path.abspath(path)
    driver = driver_for(declared, field)
    try:
        details = info(path, declared)
    except ToolError as exc:
        mismatch = _mismatch(path, declared, _probe_driver(path), field)
        if mismatch is not None:
            raise mismatch from exc
        message = f"{path} is not a readable {declared} image: {error_summary(exc)}"
        if _DIRTY_LOG in exc.stderr:
            message += (
                ". h2k never writes the source: shut the VM down cleanly in "
                "Hyper-V, or replay the log on a copy with qemu-img check -r all "
                "and convert the copy"
            )
        raise InvalidInput(message, {field: [message]}) from exc
    if driver == "raw":
        note = " (h2k does not read a structured image as raw)"
        mismatch = _mismatch(path, declared, _probe_driver(path), field, note)
        if mismatch is not None:
            raise mismatch
    _walk_references(path, details, roots, field, depth=0)
    return details


def _resolve_reference(base: str, name: str) -> str:
    return os.path.join(os.path.dirname(base), name)


def _referenced(path: str, details: dict[str, Any]) -> list[tuple[str, str]]:
    """(kind, file) for every file besides the backing one that ``path`` reads."""
    found: list[tuple[str, str]] = []
    data = (details.get("format-specific") or {}).get("data") or {}
    for extent in data.get("extents") or ():
        name = extent.get("filename")
        if name:
            found.append(("VMDK extent", _resolve_reference(path, name)))
    if data.get("data-file"):
        found.append(("data file", _resolve_reference(path, data["data-file"])))
    return found


def _walk_references(
    path: str,
    details: dict[str, Any],
    roots: tuple[str, ...],
    field: str,
    depth: int,
) -> list[str]:
    """Check every file ``path`` reads lies in ``roots``; return them all.

    The backing chain is walked one level at a time, each backing file
    checked before qemu-img is asked to open it.
    """
    path_field = _sibling(field, "path")
    files = [path]
    for kind, name in _referenced(path, details):
        files.append(_inside(name, roots, path_field, f"the {kind} of {path}"))

    backing = details.get("full-backing-filename") or details.get("backing-filename")
    if not backing:
        return files
    if depth >= MAX_CHAIN_DEPTH:
        message = f"{path} has a backing chain deeper than {MAX_CHAIN_DEPTH}"
        raise InvalidInput(message, {path_field: [message]})
    if _PROTOCOL.match(backing):
        message = f"{path} names its backing file as {backing!r}, not a file path"
        raise ReferenceOutsideRoots(message, {path_field: [message]})
    backing = _inside(
        _resolve_reference(path, backing),
        roots,
        path_field,
        f"the backing file of {path}",
    )
    backing_driver = details.get("backing-filename-format")
    backing_fmt = WIRE_FORMATS.get(backing_driver) if backing_driver else None
    if backing_fmt is None:
        message = (
            f"{path} does not name a supported format for its backing file "
            f"{backing} ({backing_driver or 'none given'}); qemu-img would have "
            "to guess it. Set one with qemu-img rebase -u -F"
        )
        raise InvalidInput(message, {path_field: [message]})
    try:
        backing_details = info(backing, backing_fmt)
    except ToolError as exc:
        message = (
            f"the backing file of {path}, {backing}, cannot be read: {last_line(exc)}"
        )
        raise InvalidInput(message, {path_field: [message]}) from exc
    return files + _walk_references(backing, backing_details, roots, field, depth + 1)


def _inside(name: str, roots: tuple[str, ...], field: str, what: str) -> str:
    try:
        return resolve_inside(name, roots, field)
    except InvalidInput as exc:
        message = f"{what} is {name}, outside the allowed roots ({':'.join(roots)})"
        raise ReferenceOutsideRoots(message, {field: [message]}) from exc


def image_files(
    path: str,
    fmt: str,
    allowed_roots: Iterable[str],
    field: str = "image.format",
) -> list[str]:
    """Every file qemu-img reads to present ``path``, resolved.

    The image itself, its extents and data file, and its whole backing
    chain: an output must not replace any of them. Raises like
    :func:`verify_declared_format` when one lies outside the roots.
    """
    path = os.path.realpath(path)
    details = info(path, fmt)
    files = _walk_references(path, details, tuple(allowed_roots), field, depth=0)
    # A sparse VMDK lists itself as its extent; name each file once.
    return list(dict.fromkeys(files))


def parse_progress(line: str) -> float | None:
    """The percentage in a ``qemu-img -p`` line such as ``    (12.34/100%)``."""
    match = _PROGRESS.search(line)
    if match is None:
        return None
    return min(100.0, float(match.group(1)))


def create_overlay(path: str, backing: str, backing_fmt: str) -> None:
    """A new qcow2 at ``path`` that reads through to ``backing`` and takes writes.

    The backing file is named by its absolute path and its format is stated,
    so qemu never guesses it.
    """
    driver = driver_for(backing_fmt, "image.format")
    run_tool(
        [
            QEMU_IMG,
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            os.path.abspath(backing),
            "-F",
            driver,
            path,
        ],
        timeout=INFO_TIMEOUT_SECONDS,
    )


def convert(
    src: str,
    src_fmt: str,
    dst: str,
    dst_fmt: str,
    *,
    compress: bool = False,
    rate_limit: int | None = None,
    on_progress: Callable[[float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    timeout: float | None = None,
) -> None:
    """Convert ``src`` into a new image ``dst``.

    ``rate_limit`` caps the copy at that many bytes per second. qemu-img's
    progress runs ahead of a rate-limited copy: with its default eight
    parallel requests it shows 100% almost at once and then waits out the
    limit, so a rate-limited copy runs one request at a time, which keeps
    the progress within a couple of chunks of the data written.
    """
    dst_driver = driver_for(dst_fmt, "parameters.output_format")
    options, names = _image_args([(src, src_fmt, "image.format")], ["-f"])
    args = [QEMU_IMG, "convert", "-p", *options, "-O", dst_driver]
    if compress:
        if dst_driver != "qcow2":
            message = f"compression needs qcow2 output, not {dst_fmt}"
            raise InvalidInput(message, {"parameters.compress": [message]})
        args.append("-c")
    if rate_limit is not None:
        if isinstance(rate_limit, bool) or not isinstance(rate_limit, int):
            message = "rate limit must be a whole number of bytes per second"
            raise InvalidInput(message, {"parameters.rate_limit_bytes": [message]})
        if rate_limit <= 0:
            message = "rate limit must be a positive number of bytes per second"
            raise InvalidInput(message, {"parameters.rate_limit_bytes": [message]})
        args += ["-r", str(rate_limit), "-m", "1"]
    args += [*names, dst]

    def on_line(line: str) -> None:
        percent = parse_progress(line)
        if percent is not None and on_progress is not None:
            on_progress(percent)

    log.info("converting %s (%s) to %s (%s)", src, src_fmt, dst, dst_fmt)
    run_tool(args, on_line=on_line, should_stop=should_stop, timeout=timeout)


def check(
    path: str,
    fmt: str,
    *,
    should_stop: Callable[[], bool] | None = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    """``qemu-img check`` of ``path``: corruptions and leaked clusters.

    Formats qemu-img cannot check (raw, vhd) come back with ``supported``
    false and ``clean`` None: not checked is not the same as clean.
    """
    driver = driver_for(fmt, "image.format")
    args = [QEMU_IMG, "check", "--output=json", "-f", driver, path]
    result = run_tool(args, should_stop=should_stop, timeout=timeout, check=False)
    if result.returncode == CHECK_UNSUPPORTED:
        return {
            "supported": False,
            "clean": None,
            "corruptions": None,
            "leaks": None,
            "check_errors": None,
            "message": f"qemu-img check does not support the {fmt} format",
        }
    if result.returncode not in (CHECK_CLEAN, CHECK_CORRUPTED, CHECK_LEAKED):
        raise ToolError(
            QEMU_IMG, args, result.returncode, result.stderr or result.stdout
        )
    report = _json_output(result.stdout, args)
    corruptions = int(report.get("corruptions", 0))
    leaks = int(report.get("leaks", 0))
    check_errors = int(report.get("check-errors", 0))
    clean = corruptions == 0 and leaks == 0 and check_errors == 0
    if clean:
        message = "no corruptions, no leaked clusters"
    else:
        message = (
            f"{corruptions} corruptions, {leaks} leaked clusters, "
            f"{check_errors} check errors"
        )
    return {
        "supported": True,
        "clean": clean,
        "corruptions": corruptions,
        "leaks": leaks,
        "check_errors": check_errors,
        "message": message,
    }


def compare(
    a: str,
    a_fmt: str,
    b: str,
    b_fmt: str,
    should_stop: Callable[[], bool] | None = None,
    *,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Whether ``a`` and ``b`` hold the same guest data.

    Not strict: areas one image leaves unallocated compare equal to zeros in
    the other, since a conversion may allocate differently. An image larger
    than the other compares equal only if its extra part reads as zeros.
    """
    options, names = _image_args(
        [(a, a_fmt, "image.format"), (b, b_fmt, "parameters.output_format")],
        ["-f", "-F"],
    )
    args = [QEMU_IMG, "compare", *options, *names]
    result = run_tool(args, should_stop=should_stop, timeout=timeout, check=False)
    message = (result.stdout.strip() or result.stderr.strip()).splitlines()
    last = message[-1] if message else ""
    if result.returncode == COMPARE_IDENTICAL:
        return {"identical": True, "message": last or "Images are identical."}
    if result.returncode == COMPARE_DIFFERENT:
        return {"identical": False, "message": last}
    raise ToolError(QEMU_IMG, args, result.returncode, result.stderr or result.stdout)
