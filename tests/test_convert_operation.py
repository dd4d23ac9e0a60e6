"""The convert operation and the qemu-img wrapper, against real images.

Every image here is built by qemu-img (tests/images.py) and every result is
checked by running qemu-img again directly; nothing is mocked.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from h2k.errors import InvalidInput, OperationError, ToolError
from h2k.operations import codes, convert
from h2k.operations.base import OperationContext
from h2k.tools import checksum, qemu_img
from tests import images
from tests.recording import Recorder

SOURCE_FORMATS = ["vmdk", "vhdx", "vdi", "vhd", "qcow2"]
PHASES = ["validation", "conversion", "verification", "finalize"]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "root"
    path.mkdir()
    return path.resolve()


def make_spec(
    image: str, fmt: str, checksum: str | None = None, **parameters: Any
) -> dict[str, Any]:
    policy = {"priority": 5}
    if "timeout_seconds" in parameters:
        policy["timeout_seconds"] = parameters.pop("timeout_seconds")
    image_spec = {"path": image, "format": fmt}
    if checksum is not None:
        image_spec["checksum"] = checksum
    return {
        "job_id": "job-1",
        "operation": "convert",
        "image": image_spec,
        "parameters": parameters,
        "execution_policy": policy,
    }


def run_convert(
    root: Path,
    image: str,
    fmt: str,
    *,
    recorder: Recorder | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    **parameters: Any,
) -> tuple[dict[str, Any], Recorder]:
    recorder = recorder or Recorder()
    ctx = OperationContext(
        job_id="job-1",
        spec=make_spec(image, fmt, **parameters),
        report=recorder,
        should_stop=should_stop,
        allowed_roots=(str(root),),
    )
    return convert.run(ctx), recorder


def failure(root: Path, image: str, fmt: str, **kwargs: Any) -> OperationError:
    with pytest.raises(OperationError) as caught:
        run_convert(root, image, fmt, **kwargs)
    return caught.value


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".part"))


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains ``text``, read from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                args = cmdline.read().decode(errors="replace")
        except OSError:
            continue
        if text in args and int(entry) != os.getpid():
            found.append(int(entry))
    return found


def measured_required(source: str, fmt: str, output_format: str) -> int:
    """``required`` from ``qemu-img measure``, run directly."""
    out = images.qemu_img(
        "measure",
        "--output=json",
        "-f",
        images.DRIVERS[fmt],
        "-O",
        output_format,
        source,
    ).stdout
    required: int = json.loads(out)["required"]
    return required


def sha256sum(*paths: str) -> str:
    """The sha256 of ``paths`` one after another, by coreutils' sha256sum."""
    data = b"".join(Path(path).read_bytes() for path in paths)
    out = subprocess.run(
        ["sha256sum"], input=data, capture_output=True, check=True
    ).stdout
    return out.split()[0].decode()


def assert_events_sound(recorder: Recorder, virtual_size: int) -> None:
    phases = [e["phase"] for e in recorder.events]
    order = [PHASES.index(p) for p in phases]
    assert order == sorted(order), phases
    assert set(phases) == set(PHASES)
    assert recorder.events[0] == {
        "phase": "validation",
        "percentage": 0,
        "message": recorder.events[0]["message"],
        "details": {},
    }

    percentages = [
        e["percentage"] for e in recorder.events if e["percentage"] is not None
    ]
    assert percentages == sorted(percentages)
    assert percentages[-1] == 100
    assert all(isinstance(p, int) and 0 <= p <= 100 for p in percentages)

    conversion = recorder.of("conversion")
    steps = [e["percentage"] for e in conversion]
    assert steps[0] == 0 and steps[-1] == 100
    assert steps == sorted(set(steps)), "at most one event per whole percent"
    for event in conversion:
        details = event["details"]
        assert details["total_bytes"] == str(virtual_size)
        assert isinstance(details["bytes_processed"], str)
        assert (
            int(details["bytes_processed"]) == virtual_size * event["percentage"] // 100
        )
    assert conversion[-1]["details"]["bytes_processed"] == str(virtual_size)


# Conversions ---------------------------------------------------------------


@pytest.mark.parametrize("source_format", SOURCE_FORMATS)
@pytest.mark.parametrize(
    ("output_format", "compress"),
    [("qcow2", False), ("qcow2", True), ("raw", False)],
    ids=["qcow2", "qcow2-compressed", "raw"],
)
def test_converts_a_real_image(
    root: Path, source_format: str, output_format: str, compress: bool
) -> None:
    source = images.make_image(root, source_format, size_mib=4, seed=7)
    if source_format == output_format:
        output_path = str(root / f"converted.{output_format}")
        expected_output = output_path
        params: dict[str, Any] = {"output_path": output_path}
    else:
        expected_output = str(root / f"disk.{output_format}")
        params = {}

    result, recorder = run_convert(
        root,
        source,
        source_format,
        output_format=output_format,
        compress=compress,
        **params,
    )

    virtual_size = images.info(source, source_format)["virtual-size"]
    assert isinstance(virtual_size, int)
    assert result["output_path"] == expected_output
    assert os.path.isfile(expected_output)
    assert result["output_format"] == output_format
    assert result["virtual_size_bytes"] == virtual_size
    assert result["source"]["path"] == source
    assert result["source"]["format"] == source_format
    assert result["source"]["files"] == [source]
    if source_format == "vhd":
        assert result["source"]["read_options"] == {"force_size_calc": "current_size"}
        assert result["source"]["qemu_default_virtual_size_bytes"] == virtual_size
    else:
        assert "read_options" not in result["source"]
    assert result["compressed"] is compress
    assert result["checksum"] is None
    assert result["measured_required_bytes"] == measured_required(
        source, source_format, output_format
    )
    assert result["free_bytes_before"] > result["measured_required_bytes"]
    assert result["output_size_bytes"] == os.stat(expected_output).st_blocks * 512

    out_info = images.info(expected_output, output_format)
    assert out_info["format"] == output_format
    assert out_info["virtual-size"] == virtual_size
    independent = images.compare(source, source_format, expected_output, output_format)
    assert independent.returncode == 0, independent.stdout + independent.stderr

    verification = result["verification"]
    assert verification["compare"]["identical"] is True
    if output_format == "qcow2":
        assert verification["check"]["supported"] is True
        assert verification["check"]["clean"] is True
    else:
        assert verification["check"]["supported"] is False
        assert verification["check"]["clean"] is None
    if compress:
        checked = images.qemu_img(
            "check", "--output=json", "-f", "qcow2", expected_output
        ).stdout
        assert '"compressed-clusters"' in checked

    assert_events_sound(recorder, virtual_size)
    assert leftovers(root) == []


def test_compression_makes_a_smaller_qcow2(root: Path) -> None:
    source = images.make_image(root, "vmdk", size_mib=4)
    plain, _ = run_convert(root, source, "vmdk", output_path=str(root / "plain.qcow2"))
    packed, _ = run_convert(
        root, source, "vmdk", output_path=str(root / "packed.qcow2"), compress=True
    )
    assert packed["output_size_bytes"] < plain["output_size_bytes"]


def test_raw_source_converts_to_qcow2(root: Path) -> None:
    source = images.make_image(root, "raw", size_mib=4)
    result, recorder = run_convert(root, source, "raw")
    assert result["output_path"] == str(root / "disk.qcow2")
    assert images.compare(source, "raw", result["output_path"], "qcow2").returncode == 0
    assert_events_sound(recorder, 4 * images.MIB)


def test_flattens_a_backing_chain_inside_the_roots(root: Path) -> None:
    base = images.make_image(root, "qcow2", size_mib=4, name="base")
    overlay = images.make_overlay(root / "overlay.qcow2", base, "qcow2")
    result, _ = run_convert(root, overlay, "qcow2", output_format="raw")
    output = result["output_path"]
    assert images.compare(overlay, "qcow2", output, "raw").returncode == 0
    assert images.compare(base, "qcow2", output, "raw").returncode == 1
    assert "backing-filename" not in images.info(output, "raw")


# Outputs that must not be written -------------------------------------------


def test_existing_output_is_kept_without_overwrite(root: Path) -> None:
    source = images.make_image(root, "vdi", size_mib=4)
    existing = root / "disk.qcow2"
    existing.write_bytes(b"keep me")

    error = failure(root, source, "vdi")
    assert error.code == codes.OUTPUT_EXISTS
    assert error.phase == "validation"
    assert "overwrite" in error.message
    assert existing.read_bytes() == b"keep me"

    result, _ = run_convert(root, source, "vdi", overwrite=True)
    assert result["output_path"] == str(existing)
    assert images.compare(source, "vdi", str(existing), "qcow2").returncode == 0
    assert leftovers(root) == []


def test_output_that_is_the_input_is_refused(root: Path) -> None:
    source = images.make_image(root, "qcow2", size_mib=4)
    before = Path(source).read_bytes()

    error = failure(root, source, "qcow2")
    assert error.code == codes.OUTPUT_IS_INPUT
    assert "output_path" in error.message

    error = failure(root, source, "qcow2", output_path=source, overwrite=True)
    assert error.code == codes.OUTPUT_IS_INPUT

    link = root / "same.qcow2"
    os.link(source, link)
    error = failure(root, source, "qcow2", output_path=str(link), overwrite=True)
    assert error.code == codes.OUTPUT_IS_INPUT
    assert Path(source).read_bytes() == before


def test_output_over_a_vmdk_extent_is_refused(root: Path) -> None:
    flat = images.make_raw(root / "disk-flat.img", 1)
    descriptor = images.write_vmdk_descriptor(root / "disk.vmdk", flat, images.MIB)
    error = failure(
        root, descriptor, "vmdk", output_path=flat, output_format="raw", overwrite=True
    )
    assert error.code == codes.OUTPUT_IS_INPUT
    assert flat in error.message


def test_output_outside_the_roots_is_refused(root: Path, tmp_path: Path) -> None:
    source = images.make_image(root, "vhd", size_mib=4)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    error = failure(root, source, "vhd", output_path=str(elsewhere / "out.qcow2"))
    assert error.code == codes.PATH_NOT_ALLOWED
    assert "parameters.output_path" in error.details["fields"]
    assert list(elsewhere.iterdir()) == []

    error = failure(root, source, "vhd", output_path=str(root / ".." / "out.qcow2"))
    assert error.code == codes.PATH_NOT_ALLOWED
    assert not (tmp_path / "out.qcow2").exists()


def test_symlinks_out_of_the_root_are_refused(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    source = images.make_image(root, "vmdk", size_mib=4)

    (root / "escape").symlink_to(outside)
    error = failure(root, source, "vmdk", output_path=str(root / "escape" / "o.qcow2"))
    assert error.code == codes.PATH_NOT_ALLOWED
    assert str(outside) in error.message
    assert list(outside.iterdir()) == []

    hidden = images.make_image(outside, "vmdk", size_mib=1, name="hidden")
    (root / "looks-inside.vmdk").symlink_to(hidden)
    error = failure(root, str(root / "looks-inside.vmdk"), "vmdk")
    assert error.code == codes.PATH_NOT_ALLOWED
    assert "image.path" in error.details["fields"]


def test_missing_output_directory_is_refused(root: Path) -> None:
    source = images.make_image(root, "vdi", size_mib=1)
    error = failure(root, source, "vdi", output_path=str(root / "no" / "out.qcow2"))
    assert error.code == codes.INVALID_PARAMETERS
    assert "does not exist" in error.message


@pytest.mark.parametrize(
    ("parameters", "field"),
    [
        ({"output_format": "raw", "compress": True}, "parameters.compress"),
        ({"output_format": "vmdk"}, "parameters.output_format"),
        ({"rate_limit_bytes": 0}, "parameters.rate_limit_bytes"),
        ({"rate_limit_bytes": "1M"}, "parameters.rate_limit_bytes"),
        ({"overwrite": "yes"}, "parameters.overwrite"),
        ({"output_path": "relative/out.qcow2"}, "parameters.output_path"),
        ({"timeout_seconds": -1}, "execution_policy.timeout_seconds"),
    ],
    ids=[
        "compress-raw",
        "output-vmdk",
        "rate-zero",
        "rate-string",
        "overwrite-string",
        "relative-output",
        "negative-timeout",
    ],
)
def test_invalid_parameters_are_refused(
    root: Path, parameters: dict[str, Any], field: str
) -> None:
    source = images.make_image(root, "vdi", size_mib=1)
    error = failure(root, source, "vdi", **parameters)
    assert error.code == codes.INVALID_PARAMETERS
    assert error.phase == "validation"
    assert field in error.details["fields"]
    assert sorted(p.name for p in root.iterdir()) == ["disk.vdi"]


# Declared formats and referenced files --------------------------------------


def test_declared_format_mismatch_names_both_formats(root: Path) -> None:
    source = images.make_image(root, "qcow2", size_mib=1, name="disk")
    renamed = root / "disk.img"
    os.rename(source, renamed)

    with pytest.raises(InvalidInput) as caught:
        qemu_img.verify_declared_format(str(renamed), "vmdk", (str(root),))
    error = caught.value
    assert isinstance(error, qemu_img.FormatMismatch)
    assert error.detected == "qcow2"
    assert list(error.fields) == ["image.format"]
    assert error.message.startswith(f"image.format says vmdk but {renamed} is a qcow2")

    failed = failure(root, str(renamed), "vmdk")
    assert failed.code == codes.FORMAT_MISMATCH
    assert "qcow2" in failed.message


def test_vhd_declared_for_a_vdi_names_vhd_not_vpc(root: Path) -> None:
    source = images.make_image(root, "vhd", size_mib=1)
    with pytest.raises(qemu_img.FormatMismatch) as caught:
        qemu_img.verify_declared_format(source, "vdi", (str(root),))
    assert caught.value.detected == "vhd"
    assert "is a vhd image" in caught.value.message


def test_structured_image_declared_raw_is_refused(root: Path) -> None:
    source = images.make_image(root, "qcow2", size_mib=1)
    with pytest.raises(qemu_img.FormatMismatch) as caught:
        qemu_img.verify_declared_format(source, "raw", (str(root),))
    assert caught.value.detected == "qcow2"
    assert "says raw" in caught.value.message
    assert failure(root, source, "raw").code == codes.FORMAT_MISMATCH


def test_vmdk_descriptor_declared_raw_is_refused(root: Path) -> None:
    flat = images.make_raw(root / "flat.img", 1)
    descriptor = images.write_vmdk_descriptor(root / "d.vmdk", flat, images.MIB)
    with pytest.raises(qemu_img.FormatMismatch) as caught:
        qemu_img.verify_declared_format(descriptor, "raw", (str(root),))
    assert caught.value.detected == "vmdk"


def test_raw_declared_for_a_raw_disk_passes(root: Path) -> None:
    source = images.make_image(root, "raw", size_mib=1)
    details = qemu_img.verify_declared_format(source, "raw", (str(root),))
    assert details["format"] == "raw"
    assert details["virtual-size"] == images.MIB
    assert qemu_img.probe_format(source) == "raw"


def test_raw_disk_declared_vhd_is_a_mismatch(root: Path) -> None:
    source = images.make_image(root, "raw", size_mib=1)
    with pytest.raises(qemu_img.FormatMismatch) as caught:
        qemu_img.verify_declared_format(source, "vhd", (str(root),))
    assert caught.value.detected == "raw"
    assert "no vhd header" in caught.value.message


def test_unreadable_image_of_the_declared_format(root: Path) -> None:
    descriptor = images.write_vmdk_descriptor(
        root / "d.vmdk", str(root / "missing-flat.img"), images.MIB
    )
    with pytest.raises(InvalidInput) as caught:
        qemu_img.verify_declared_format(descriptor, "vmdk", (str(root),))
    assert not isinstance(caught.value, qemu_img.FormatMismatch)
    assert "not a readable vmdk image" in caught.value.message
    assert isinstance(caught.value.__cause__, ToolError)
    assert failure(root, descriptor, "vmdk").code == codes.INVALID_IMAGE


def test_probe_format_of_an_unknown_file(root: Path) -> None:
    empty = root / "empty"
    empty.write_bytes(b"")
    assert qemu_img.probe_format(str(root / "absent")) is None
    assert qemu_img.probe_format(str(empty)) == "raw"


def test_backing_file_outside_the_roots_is_refused(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    base = images.make_image(outside, "qcow2", size_mib=1, name="base")
    overlay = images.make_overlay(root / "overlay.qcow2", base, "qcow2")

    with pytest.raises(qemu_img.ReferenceOutsideRoots) as caught:
        qemu_img.verify_declared_format(overlay, "qcow2", (str(root),))
    assert "backing file" in caught.value.message
    assert base in caught.value.message
    assert "image.path" in caught.value.fields

    error = failure(root, overlay, "qcow2", output_format="raw")
    assert error.code == codes.PATH_NOT_ALLOWED
    assert not (root / "overlay.raw").exists()


def test_vmdk_extent_outside_the_roots_is_refused(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = images.make_raw(outside / "secret.img", 1)
    descriptor = images.write_vmdk_descriptor(root / "d.vmdk", secret, images.MIB)

    with pytest.raises(qemu_img.ReferenceOutsideRoots) as caught:
        qemu_img.verify_declared_format(descriptor, "vmdk", (str(root),))
    assert "VMDK extent" in caught.value.message
    assert failure(root, descriptor, "vmdk").code == codes.PATH_NOT_ALLOWED
    assert not (root / "d.qcow2").exists()


def test_image_files_lists_extents_and_backing_chain(root: Path) -> None:
    flat = images.make_raw(root / "flat.img", 1)
    descriptor = images.write_vmdk_descriptor(root / "d.vmdk", flat, images.MIB)
    assert qemu_img.image_files(descriptor, "vmdk", (str(root),)) == [descriptor, flat]

    base = images.make_image(root, "qcow2", size_mib=1, name="base")
    overlay = images.make_overlay(root / "overlay.qcow2", base, "qcow2")
    assert qemu_img.image_files(overlay, "qcow2", (str(root),)) == [overlay, base]

    sparse = images.make_image(root, "vmdk", size_mib=1, name="sparse")
    assert qemu_img.image_files(sparse, "vmdk", (str(root),)) == [sparse]


# check and compare -----------------------------------------------------------


def test_check_reports_clean_leaked_and_corrupt_images(root: Path) -> None:
    clean = images.make_image(root, "qcow2", size_mib=1, name="clean")
    assert qemu_img.check(clean, "qcow2") == {
        "supported": True,
        "clean": True,
        "corruptions": 0,
        "leaks": 0,
        "check_errors": 0,
        "message": "no corruptions, no leaked clusters",
    }

    leaky = images.make_image(root, "qcow2", size_mib=1, name="leaky")
    images.set_header_refcount(leaky, 2)
    result = qemu_img.check(leaky, "qcow2")
    assert (result["clean"], result["leaks"], result["corruptions"]) == (False, 1, 0)

    corrupt = images.make_image(root, "qcow2", size_mib=1, name="corrupt")
    images.set_header_refcount(corrupt, 0)
    result = qemu_img.check(corrupt, "qcow2")
    assert (result["clean"], result["leaks"], result["corruptions"]) == (False, 0, 1)


@pytest.mark.parametrize("fmt", ["raw", "vhd"])
def test_check_says_when_a_format_cannot_be_checked(root: Path, fmt: str) -> None:
    image = images.make_image(root, fmt, size_mib=1)
    result = qemu_img.check(image, fmt)
    assert result["supported"] is False
    assert result["clean"] is None
    assert fmt in result["message"]


def test_compare_finds_identical_and_different_images(root: Path) -> None:
    a = images.make_image(root, "raw", size_mib=2, name="a")
    b = images.make_image(root, "vdi", size_mib=2, name="b")
    assert qemu_img.compare(a, "raw", b, "vdi")["identical"] is True

    with open(a, "r+b") as image:
        image.seek(1_500_000)
        image.write(b"\xff" * 16)
    result = qemu_img.compare(a, "raw", b, "vdi")
    assert result["identical"] is False
    assert "offset" in result["message"]

    with pytest.raises(ToolError):
        qemu_img.compare(a, "raw", str(root / "absent.vdi"), "vdi")


def test_unreadable_data_fails_the_conversion_with_qemu_img_s_message(
    root: Path,
) -> None:
    source = images.make_image(root, "qcow2", size_mib=1, name="damaged")
    images.misalign_first_l2(source)
    error = failure(root, source, "qcow2", output_format="raw")
    assert error.code == codes.CONVERSION_FAILED
    assert error.phase == "conversion"
    assert "Input/output error" in error.message
    assert isinstance(error.__cause__, ToolError)
    assert leftovers(root) == []
    assert not (root / "damaged.raw").exists()


def test_source_changed_before_comparison_fails_verification(root: Path) -> None:
    source = images.make_image(root, "raw", size_mib=2)

    def on_event(event: dict[str, Any]) -> None:
        if event["phase"] == "verification" and "Comparing" in event["message"]:
            with open(source, "r+b") as image:
                image.seek(1_000_000)
                image.write(b"\xff" * 16)

    error = failure(root, source, "raw", recorder=Recorder(on_event))
    assert error.code == codes.VERIFICATION_FAILED
    assert error.phase == "verification"
    assert "differs from the source" in error.message
    assert error.details["compare"]["identical"] is False
    assert sorted(p.name for p in root.iterdir()) == ["disk.img"]


def test_output_appearing_during_conversion_is_not_replaced(root: Path) -> None:
    source = images.make_image(root, "vdi", size_mib=2)
    output = root / "disk.qcow2"

    def on_event(event: dict[str, Any]) -> None:
        if event["phase"] == "verification" and not output.exists():
            output.write_bytes(b"written by someone else")

    error = failure(root, source, "vdi", recorder=Recorder(on_event))
    assert error.code == codes.OUTPUT_EXISTS
    assert error.phase == "finalize"
    assert output.read_bytes() == b"written by someone else"
    assert leftovers(root) == []


def test_relative_image_path_is_refused(root: Path) -> None:
    images.make_image(root, "vdi", size_mib=1)
    error = failure(root, "root/disk.vdi", "vdi")
    assert error.code == codes.INVALID_PARAMETERS
    assert "image.path" in error.details["fields"]


# Stopping ----------------------------------------------------------------------


# 6 MiB of non-zero data at this rate would take about 24 seconds.
SLOW_RATE = 256 * 1024
# How long stopping may take: run_tool's SIGTERM grace (5 s, see the report of
# h2k.tools.process) plus slack for a loaded machine.
STOP_WITHIN_SECONDS = 12


def stopped_conversion(root: Path, **parameters: Any) -> tuple[OperationError, float]:
    """Run a slow (rate-limited) conversion; return how it ended and how fast."""
    source = images.make_image(root, "vmdk", size_mib=8, seed=3)
    started = time.monotonic()
    error = failure(root, source, "vmdk", rate_limit_bytes=SLOW_RATE, **parameters)
    return error, time.monotonic() - started


def assert_nothing_left(root: Path) -> None:
    assert leftovers(root) == []
    assert not (root / "disk.qcow2").exists()
    assert processes_mentioning(str(root)) == []


def test_cancellation_stops_qemu_img_and_removes_the_partial_output(root: Path) -> None:
    stop = False
    seen_while_running: list[list[str]] = []

    def on_event(event: dict[str, Any]) -> None:
        nonlocal stop
        if event["phase"] == "conversion" and event["percentage"] > 0 and not stop:
            seen_while_running.append(leftovers(root))
            seen_while_running.append(
                [str(pid) for pid in processes_mentioning(str(root))]
            )
            stop = True

    recorder = Recorder(on_event)
    error, elapsed = stopped_conversion(
        root, recorder=recorder, should_stop=lambda: stop
    )
    assert error.code == codes.CANCELLED
    assert error.phase == "conversion"
    assert error.retryable is False
    partial, running = seen_while_running
    assert partial == [".disk.qcow2.h2k-job-1.part"]
    assert len(running) == 1, "qemu-img was running when the job was cancelled"
    assert elapsed < STOP_WITHIN_SECONDS, "stopped, not left to finish"
    assert recorder.of("verification") == []
    assert_nothing_left(root)


def test_timeout_stops_qemu_img_and_removes_the_partial_output(root: Path) -> None:
    error, elapsed = stopped_conversion(root, timeout_seconds=1.5)
    assert error.code == codes.TIMEOUT
    assert error.phase == "conversion"
    assert error.retryable is True
    assert elapsed < STOP_WITHIN_SECONDS
    assert_nothing_left(root)


def test_cancel_before_conversion_writes_nothing(root: Path) -> None:
    source = images.make_image(root, "vdi", size_mib=1)
    error = failure(root, source, "vdi", should_stop=lambda: True)
    assert error.code == codes.CANCELLED
    assert sorted(p.name for p in root.iterdir()) == ["disk.vdi"]


# Source format quirks ----------------------------------------------------------


def test_stream_optimized_vmdk_converts(root: Path) -> None:
    source = images.make_image(
        root, "vmdk", size_mib=8, seed=5, options="subformat=streamOptimized"
    )
    details = images.info(source, "vmdk")["format-specific"]
    assert isinstance(details, dict)
    assert details["data"]["create-type"] == "streamOptimized"
    assert details["data"]["extents"][0]["compressed"] is True

    for output_format in ("qcow2", "raw"):
        result, _ = run_convert(root, source, "vmdk", output_format=output_format)
        output = result["output_path"]
        assert result["source"]["files"] == [source]
        assert result["virtual_size_bytes"] == 8 * images.MIB
        assert images.compare(source, "vmdk", output, output_format).returncode == 0
    assert leftovers(root) == []


def test_monolithic_flat_vmdk_reads_its_extent(root: Path) -> None:
    descriptor = images.make_image(
        root, "vmdk", size_mib=4, seed=2, options="subformat=monolithicFlat"
    )
    flat = str(root / "disk-flat.vmdk")
    assert os.path.getsize(flat) == 4 * images.MIB
    assert os.path.getsize(descriptor) < 4096

    result, _ = run_convert(root, descriptor, "vmdk")
    assert result["source"]["files"] == [descriptor, flat]
    output = result["output_path"]
    assert images.compare(descriptor, "vmdk", output, "qcow2").returncode == 0
    assert images.compare(flat, "raw", output, "qcow2").returncode == 0

    error = failure(
        root, descriptor, "vmdk", output_path=flat, output_format="raw", overwrite=True
    )
    assert error.code == codes.OUTPUT_IS_INPUT


def test_split_sparse_vmdk_reads_every_extent(root: Path) -> None:
    descriptor, size = images.make_split_vmdk(root)
    extents = [str(root / "split-s001.vmdk"), str(root / "split-s002.vmdk")]
    digest = sha256sum(descriptor, *extents)

    result, _ = run_convert(root, descriptor, "vmdk", checksum=f"sha256:{digest}")
    assert result["source"]["files"] == [descriptor, *extents]
    assert result["checksum"]["files"] == [descriptor, *extents]
    assert result["virtual_size_bytes"] == size
    output = result["output_path"]
    assert images.info(output, "qcow2")["virtual-size"] == size
    assert images.compare(descriptor, "vmdk", output, "qcow2").returncode == 0
    tail = images.qemu_img(
        "map", "--output=json", "-f", "qcow2", output
    ).stdout  # the data past 2 GiB, in the second extent, was copied
    assert any(
        entry["data"] and entry["start"] >= 2048 * images.MIB
        for entry in json.loads(tail)
    )


@pytest.mark.parametrize("subformat", ["fixed", "dynamic"])
def test_vhd_rounded_to_its_geometry_keeps_that_size(
    root: Path, subformat: str
) -> None:
    # qemu-img sizes a VHD it creates without force_size to a whole geometry.
    source = images.make_image(
        root, "vhd", size_mib=4, seed=9, options=f"subformat={subformat}"
    )
    size = images.info(source, "vhd")["virtual-size"]
    assert isinstance(size, int) and size > 4 * images.MIB

    result, _ = run_convert(root, source, "vhd", output_format="raw")
    assert result["virtual_size_bytes"] == size
    assert result["source"]["qemu_default_virtual_size_bytes"] == size
    assert os.path.getsize(result["output_path"]) == size
    assert images.compare(source, "vhd", result["output_path"], "raw").returncode == 0


# A size no CHS geometry describes: the VHD algorithm rounds it down.
EXACT_VHD_SIZE = 10 * images.MIB + 512 * 1024


@pytest.mark.parametrize("subformat", ["fixed", "dynamic"])
@pytest.mark.parametrize("creator", [None, "win ", "vbox"], ids=["qem2", "win", "vbox"])
def test_vhd_converts_to_its_exact_footer_size(
    root: Path, subformat: str, creator: str | None
) -> None:
    source, expected = images.make_vhd(
        root, EXACT_VHD_SIZE, subformat, seed=4, creator=creator
    )
    cylinders, heads, sectors = images.vhd_geometry(EXACT_VHD_SIZE)
    geometry_size = cylinders * heads * sectors * 512
    assert geometry_size < EXACT_VHD_SIZE
    plain = images.info(source, "vhd")["virtual-size"]
    # qemu's own choice: the footer size for the creators it knows.
    assert plain == (geometry_size if creator == "vbox" else EXACT_VHD_SIZE)

    result, _ = run_convert(root, source, "vhd")
    output = result["output_path"]
    assert result["virtual_size_bytes"] == EXACT_VHD_SIZE
    assert result["source"]["qemu_default_virtual_size_bytes"] == plain
    assert images.info(output, "qcow2")["virtual-size"] == EXACT_VHD_SIZE
    independent = images.compare(expected, "raw", output, "qcow2")
    assert independent.returncode == 0, independent.stdout


def test_vhd_in_a_directory_with_a_comma(root: Path) -> None:
    folder = root / "a,b"
    folder.mkdir()
    source, expected = images.make_vhd(folder, EXACT_VHD_SIZE, "dynamic", seed=1)
    result, _ = run_convert(root, source, "vhd", output_format="raw")
    assert result["output_path"] == str(folder / "disk.raw")
    assert images.compare(expected, "raw", result["output_path"], "raw").returncode == 0


def test_vhdx_with_an_unreplayed_log_is_refused_untouched(root: Path) -> None:
    source = images.make_dirty_vhdx(root)
    before = sha256sum(source)

    error = failure(root, source, "vhdx")
    assert error.code == codes.INVALID_IMAGE
    assert error.phase == "validation"
    assert "log that needs to be replayed" in error.message
    assert "never writes the source" in error.message
    assert sha256sum(source) == before
    assert sorted(p.name for p in root.iterdir()) == ["dirty.vhdx"]


# Checksums ---------------------------------------------------------------------


@pytest.mark.parametrize("case", ["lower", "upper"])
def test_matching_checksum_lets_the_conversion_run(root: Path, case: str) -> None:
    source = images.make_image(root, "vdi", size_mib=8, seed=3)
    digest = sha256sum(source)
    given = digest.upper() if case == "upper" else digest

    result, recorder = run_convert(root, source, "vdi", checksum=f"sha256:{given}")
    assert result["checksum"] == {
        "algorithm": "sha256",
        "expected": f"sha256:{digest}",
        "actual": f"sha256:{digest}",
        "files": [source],
        "matches": True,
    }
    hashed = [e for e in recorder.of("validation") if "bytes_hashed" in e["details"]]
    assert len(hashed) >= 2
    total = str(os.path.getsize(source))
    done = [int(e["details"]["bytes_hashed"]) for e in hashed]
    assert done == sorted(done)
    assert hashed[-1]["details"] == {"bytes_hashed": total, "total_bytes": total}
    assert all(e["percentage"] is None for e in hashed)
    assert_events_sound(recorder, 8 * images.MIB)


def test_checksum_mismatch_stops_before_anything_is_written(root: Path) -> None:
    source = images.make_image(root, "vmdk", size_mib=4)
    actual = sha256sum(source)
    wrong = "ab" * 32

    recorder = Recorder()
    error = failure(root, source, "vmdk", checksum=f"sha256:{wrong}", recorder=recorder)
    assert error.code == codes.CHECKSUM_MISMATCH
    assert error.phase == "validation"
    assert error.retryable is False
    assert f"sha256:{wrong}" in error.message
    assert f"sha256:{actual}" in error.message
    assert error.details == {
        "expected": f"sha256:{wrong}",
        "actual": f"sha256:{actual}",
        "files": [source],
    }
    assert {e["phase"] for e in recorder.events} == {"validation"}
    assert sorted(p.name for p in root.iterdir()) == ["disk.vmdk"]


def test_checksum_of_a_multi_file_vmdk_covers_its_extents(root: Path) -> None:
    descriptor = images.make_image(
        root, "vmdk", size_mib=2, options="subformat=monolithicFlat"
    )
    flat = str(root / "disk-flat.vmdk")

    error = failure(
        root, descriptor, "vmdk", checksum=f"sha256:{sha256sum(descriptor)}"
    )
    assert error.code == codes.CHECKSUM_MISMATCH
    assert f"{descriptor}, {flat} (hashed one after another" in error.message

    both = sha256sum(descriptor, flat)
    result, _ = run_convert(root, descriptor, "vmdk", checksum=f"sha256:{both}")
    assert result["checksum"]["files"] == [descriptor, flat]
    assert result["checksum"]["actual"] == f"sha256:{both}"


def test_cancel_while_hashing_writes_nothing(root: Path) -> None:
    source = images.make_image(root, "raw", size_mib=8)
    stop = False

    def on_event(event: dict[str, Any]) -> None:
        nonlocal stop
        if "bytes_hashed" in event["details"]:
            stop = True

    recorder = Recorder(on_event)
    error = failure(
        root,
        source,
        "raw",
        checksum=f"sha256:{'0' * 64}",
        recorder=recorder,
        should_stop=lambda: stop,
    )
    assert error.code == codes.CANCELLED
    assert error.phase == "validation"
    hashed = [e for e in recorder.events if "bytes_hashed" in e["details"]]
    assert len(hashed) == 1
    assert sorted(p.name for p in root.iterdir()) == ["disk.img"]


@pytest.mark.parametrize(
    "given", ["md5:" + "0" * 32, "sha256:" + "0" * 63, "sha256:" + "g" * 64, 7]
)
def test_malformed_checksum_is_refused(root: Path, given: Any) -> None:
    source = images.make_image(root, "vdi", size_mib=1)
    error = failure(root, source, "vdi", checksum=given)
    assert error.code == codes.INVALID_PARAMETERS
    assert "image.checksum" in error.details["fields"]


def test_sha256_files_hashes_files_as_one_stream(root: Path) -> None:
    first = images.make_raw(root / "a.img", 2, pattern_seed=1)
    second = images.make_raw(root / "b.img", 1, pattern_seed=2)
    seen: list[tuple[int, int]] = []
    digest = checksum.sha256_files(
        [first, second],
        on_progress=lambda done, total: seen.append((done, total)),
        chunk_bytes=512 * 1024,
    )
    assert digest == sha256sum(first, second)
    assert seen == [(n * 512 * 1024, 3 * images.MIB) for n in range(1, 7)]

    with pytest.raises(ToolError) as caught:
        checksum.sha256_files([str(root / "absent.img")])
    assert "absent.img" in str(caught.value)


# Free space --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("output_format", "compress"),
    [("qcow2", False), ("qcow2", True), ("raw", False)],
    ids=["qcow2", "qcow2-compressed", "raw"],
)
def test_measure_bounds_what_the_conversion_writes(
    root: Path, output_format: str, compress: bool
) -> None:
    source = images.make_image(root, "vmdk", size_mib=8, seed=11)
    measured = qemu_img.measure(source, "vmdk", output_format)
    assert measured["required"] == measured_required(source, "vmdk", output_format)
    assert measured["fully_allocated"] >= measured["required"]

    result, recorder = run_convert(
        root, source, "vmdk", output_format=output_format, compress=compress
    )
    assert result["measured_required_bytes"] == measured["required"]
    assert result["output_file_size_bytes"] <= measured["required"]
    if output_format == "raw":
        assert measured["required"] == 8 * images.MIB
    event = next(
        e
        for e in recorder.of("validation")
        if "measured_required_bytes" in e["details"]
    )
    assert event["details"]["measured_required_bytes"] == str(measured["required"])
    assert event["details"]["free_bytes"] == str(result["free_bytes_before"])


def test_measure_reads_a_vhd_at_its_footer_size(root: Path) -> None:
    source, _ = images.make_vhd(root, EXACT_VHD_SIZE, "fixed", creator="vbox")
    assert qemu_img.measure(source, "vhd", "raw")["required"] == EXACT_VHD_SIZE


def test_human_size() -> None:
    assert convert.human_size(0) == "0 bytes"
    assert convert.human_size(1023) == "1023 bytes"
    assert convert.human_size(1024) == "1.0 KiB"
    assert convert.human_size(6_619_136) == "6.3 MiB"
    assert convert.human_size(3 * 1024**3) == "3.0 GiB"
    assert convert.human_size(5 * 1024**7) == "5120.0 EiB"


@pytest.fixture
def small_fs(root: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs inside the root, unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = root / "small"
    mount.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0755", "h2k-test", str(mount)],
        check=True,
        capture_output=True,
    )
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True, capture_output=True)


def free_bytes_by_stat(directory: Path) -> int:
    """Free bytes for unprivileged users, as coreutils' stat -f reports them."""
    out = subprocess.run(
        ["stat", "-f", "-c", "%a %S", str(directory)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return int(out[0]) * int(out[1])


@pytest.mark.parametrize("output_format", ["qcow2", "raw"])
def test_output_that_does_not_fit_is_refused_before_writing(
    root: Path, small_fs: Path, output_format: str
) -> None:
    source = images.make_image(root, "vmdk", size_mib=8, seed=6)
    required = measured_required(source, "vmdk", output_format)
    free = free_bytes_by_stat(small_fs)
    assert required > free

    recorder = Recorder()
    error = failure(
        root,
        source,
        "vmdk",
        recorder=recorder,
        output_format=output_format,
        output_path=str(small_fs / f"out.{output_format}"),
    )
    assert error.code == codes.INSUFFICIENT_SPACE
    assert error.phase == "validation"
    assert str(required) in error.message and str(free) in error.message
    assert convert.human_size(required) in error.message
    assert "2.0 MiB" in error.message
    assert error.details == {
        "measured_required_bytes": required,
        "free_bytes": free,
        "output_directory": str(small_fs),
    }
    assert list(small_fs.iterdir()) == []
    assert {e["phase"] for e in recorder.events} == {"validation"}
    assert free_bytes_by_stat(small_fs) == free


def test_output_that_fits_a_small_filesystem_is_written(
    root: Path, small_fs: Path
) -> None:
    source = images.make_image(root, "vdi", size_mib=1, seed=8)
    free = free_bytes_by_stat(small_fs)
    output = small_fs / "out.qcow2"

    result, _ = run_convert(root, source, "vdi", output_path=str(output))
    assert result["free_bytes_before"] == free
    assert result["measured_required_bytes"] <= free
    assert images.compare(source, "vdi", str(output), "qcow2").returncode == 0
    assert sorted(p.name for p in small_fs.iterdir()) == ["out.qcow2"]
