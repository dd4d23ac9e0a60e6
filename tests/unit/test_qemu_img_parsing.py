"""What the qemu-img wrapper reads from qemu-img's output and how it names formats."""

from __future__ import annotations

import pytest

from h2k.errors import InvalidInput, ToolError
from h2k.tools import checksum, qemu_img


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("    (0.00/100%)", 0.0),
        ("    (12.34/100%)", 12.34),
        ("    (100.00/100%)", 100.0),
        ("(7/100%)", 7.0),
        ("    (99.99/100%)\r", 99.99),
    ],
)
def test_parse_progress_reads_the_percentage(line: str, expected: float) -> None:
    assert qemu_img.parse_progress(line) == pytest.approx(expected)


@pytest.mark.parametrize(
    "line",
    [
        "",
        "   ",
        "qemu-img: error while reading at byte 0: Input/output error",
        "(12.34/50%)",
        "12.34%",
        "Images are identical.",
    ],
)
def test_parse_progress_ignores_other_lines(line: str) -> None:
    assert qemu_img.parse_progress(line) is None


def test_parse_progress_never_passes_100() -> None:
    assert qemu_img.parse_progress("    (100.01/100%)") == 100.0


def test_wire_formats_map_to_qemu_drivers() -> None:
    assert qemu_img.QEMU_FORMATS == {
        "vmdk": "vmdk",
        "vhd": "vpc",
        "vhdx": "vhdx",
        "vdi": "vdi",
        "qcow2": "qcow2",
        "raw": "raw",
    }


def test_drivers_map_back_to_wire_names() -> None:
    assert qemu_img.WIRE_FORMATS["vpc"] == "vhd"
    for wire, driver in qemu_img.QEMU_FORMATS.items():
        assert qemu_img.WIRE_FORMATS[driver] == wire


def test_driver_for_refuses_an_unknown_format_naming_the_field() -> None:
    with pytest.raises(InvalidInput) as caught:
        qemu_img.driver_for("vpc", "image.format")
    assert "image.format" in caught.value.fields
    assert "'vpc'" in caught.value.message
    assert "vhd" in caught.value.message


def test_driver_for_refuses_a_non_string() -> None:
    with pytest.raises(InvalidInput) as caught:
        qemu_img.driver_for(["qcow2"], "parameters.output_format")
    assert "parameters.output_format" in caught.value.fields


def test_version_reads_the_installed_qemu_img() -> None:
    version = qemu_img.version()
    major = int(version.split(".")[0])
    assert major >= 5


def test_image_opts_name_the_driver_and_the_vhd_size_rule() -> None:
    assert qemu_img.image_opts("/images/disk.vhd", "vhd") == (
        "driver=vpc,force_size_calc=current_size,file.filename=/images/disk.vhd"
    )
    assert qemu_img.image_opts("/images/disk.qcow2", "qcow2") == (
        "driver=qcow2,file.filename=/images/disk.qcow2"
    )


def test_image_opts_double_commas_and_make_paths_absolute() -> None:
    opts = qemu_img.image_opts("/a,b/c,,d.vhd", "vhd")
    assert opts.endswith("file.filename=/a,,b/c,,,,d.vhd")
    relative = qemu_img.image_opts("nbd:evil.raw", "raw")
    assert relative.startswith("driver=raw,file.filename=/")
    assert relative.endswith("/nbd:evil.raw")


def test_image_opts_refuse_an_unknown_format() -> None:
    with pytest.raises(InvalidInput) as caught:
        qemu_img.image_opts("/x.img", "vpc")
    assert "image.format" in caught.value.fields


def test_only_vhd_is_read_with_options() -> None:
    assert [f for f in qemu_img.QEMU_FORMATS if qemu_img.has_read_options(f)] == ["vhd"]
    assert qemu_img.has_read_options("vpc") is False


def test_parse_measure_reads_both_sizes() -> None:
    text = '{\n    "required": 6619136,\n    "fully-allocated": 8716288\n}\n'
    assert qemu_img.parse_measure(text, ["qemu-img", "measure"]) == {
        "required": 6619136,
        "fully_allocated": 8716288,
    }
    with_bitmaps = '{"bitmaps": 0, "required": 1, "fully-allocated": 2}'
    assert qemu_img.parse_measure(with_bitmaps, [])["required"] == 1


@pytest.mark.parametrize(
    "text",
    [
        "",
        "required size: 1",
        '{"required": 1}',
        '{"required": "x", "fully-allocated": 2}',
    ],
)
def test_parse_measure_refuses_other_output(text: str) -> None:
    with pytest.raises(ToolError):
        qemu_img.parse_measure(text, ["qemu-img", "measure"])


def test_error_summary_prefers_qemu_img_s_error_over_its_hint() -> None:
    stderr = (
        "qemu-img: Could not open '/i/d.vhdx': VHDX image file '/i/d.vhdx' opened "
        "read-only, but contains a log that needs to be replayed\n"
        "To replay the log, run:\n"
        "qemu-img check -r all '/i/d.vhdx'\n"
    )
    exc = ToolError("qemu-img", ["qemu-img", "info"], 1, stderr)
    assert qemu_img.error_summary(exc).startswith("qemu-img: Could not open")
    assert qemu_img.last_line(exc) == "qemu-img check -r all '/i/d.vhdx'"
    plain = ToolError("qemu-img", [], 1, "something broke\n")
    assert qemu_img.error_summary(plain) == "something broke"
    silent = ToolError("qemu-img", [], 3, "")
    assert qemu_img.error_summary(silent) == "exit status 3, no message"


@pytest.mark.parametrize(
    ("given", "digest"),
    [
        ("sha256:" + "ab" * 32, "ab" * 32),
        ("sha256:" + "AB" * 32, "ab" * 32),
        ("sha256:" + "aB" * 32, "ab" * 32),
    ],
)
def test_checksum_parse_accepts_any_hex_case(given: str, digest: str) -> None:
    assert checksum.parse(given) == digest


@pytest.mark.parametrize(
    "given",
    [
        None,
        7,
        "",
        "ab" * 32,
        "SHA256:" + "ab" * 32,
        "sha256:" + "ab" * 31,
        "sha256:" + "ab" * 32 + "\n",
        "md5:" + "ab" * 16,
        "sha256: " + "ab" * 32,
    ],
)
def test_checksum_parse_refuses_anything_else(given: object) -> None:
    with pytest.raises(InvalidInput) as caught:
        checksum.parse(given, "image.checksum")
    assert list(caught.value.fields) == ["image.checksum"]
