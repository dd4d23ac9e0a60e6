"""What the qemu-img wrapper reads from qemu-img's output and how it names formats."""

from __future__ import annotations

import pytest

from h2k.errors import InvalidInput
from h2k.tools import qemu_img


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
        qemu_img.driver_for(["qcow2"], "parameters.output_format")  # type: ignore[arg-type]
    assert "parameters.output_format" in caught.value.fields


def test_version_reads_the_installed_qemu_img() -> None:
    version = qemu_img.version()
    major = int(version.split(".")[0])
    assert major >= 5
