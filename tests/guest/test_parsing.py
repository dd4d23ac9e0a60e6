"""How the guest layer reads tool output, fed with output the tools really gave.

The JSON below was captured from sfdisk 2.38 and LVM 2.03.16 on images built
for the purpose; the LVM report covers what no single-disk test image shows
(a volume group over two disks, one of them absent, and a striped volume).
These tests need no root.
"""

from __future__ import annotations

import json
import os

import pytest

from h2k.guest import codes, fstypes, lvm, procinfo
from h2k.guest.partitions import parse_sfdisk
from h2k.guest.probe import parse_export
from h2k.guest.volume import Volume

MiB = 2**20

SFDISK_DOS = """{
   "partitiontable": {
      "label": "dos",
      "id": "0x8e29c348",
      "device": "m.raw",
      "unit": "sectors",
      "sectorsize": 512,
      "partitions": [
         {"node": "m.raw1", "start": 2048, "size": 20480, "type": "83",
          "bootable": true},
         {"node": "m.raw2", "start": 22528, "size": 108544, "type": "5"},
         {"node": "m.raw5", "start": 24576, "size": 8192, "type": "82"}
      ]
   }
}"""

SFDISK_GPT = """{
   "partitiontable": {
      "label": "gpt",
      "id": "949AEBF1-F68C-1143-98A2-B299A6707B1E",
      "device": "/tmp/disk 1.raw",
      "unit": "sectors",
      "firstlba": 2048,
      "lastlba": 65502,
      "sectorsize": 512,
      "partitions": [
         {"node": "/tmp/disk 1.raw1", "start": 2048, "size": 57344,
          "type": "0FC63DAF-8483-4772-8E79-3D69D8477DE4",
          "uuid": "0FCC2B72-06D7-8741-8A5C-A14AB212D0CA", "name": "root"}
      ]
   }
}"""

# pvs and lvs of VG vg2 over /dev/loop1 and /dev/loop2: "one" linear over
# both, "str" striped, "two" linear on loop2.
PVS_ROWS = [
    {
        "pv_name": "/dev/loop1",
        "pv_uuid": "uuid-a",
        "vg_name": "vg2",
        "vg_uuid": "vg-uuid",
        "pe_start": "1048576",
        "vg_extent_size": "4194304",
    },
    {
        "pv_name": "/dev/loop2",
        "pv_uuid": "uuid-b",
        "vg_name": "vg2",
        "vg_uuid": "vg-uuid",
        "pe_start": "1048576",
        "vg_extent_size": "4194304",
    },
]
LVS_BOTH = """[
 {"vg_name":"vg2", "lv_name":"one", "lv_uuid":"lv-one", "lv_size":"16777216",
  "segtype":"linear", "seg_start":"0", "seg_size":"8388608", "stripes":"1",
  "seg_pe_ranges":"/dev/loop1:0-1"},
 {"vg_name":"vg2", "lv_name":"one", "lv_uuid":"lv-one", "lv_size":"16777216",
  "segtype":"linear", "seg_start":"8388608", "seg_size":"8388608",
  "stripes":"1", "seg_pe_ranges":"/dev/loop2:2-3"},
 {"vg_name":"vg2", "lv_name":"str", "lv_uuid":"lv-str", "lv_size":"8388608",
  "segtype":"striped", "seg_start":"0", "seg_size":"8388608", "stripes":"2",
  "seg_pe_ranges":"/dev/loop1:2-2 /dev/loop2:4-4"},
 {"vg_name":"vg2", "lv_name":"two", "lv_uuid":"lv-two", "lv_size":"8388608",
  "segtype":"linear", "seg_start":"0", "seg_size":"8388608", "stripes":"1",
  "seg_pe_ranges":"/dev/loop2:0-1"}
]"""
# The same VG read with only /dev/loop1 present.
LVS_ONE_MISSING = LVS_BOTH.replace("/dev/loop2", "[unknown]")


def test_mbr_table_with_an_extended_partition() -> None:
    table = parse_sfdisk(SFDISK_DOS)
    assert table.label == "dos"
    assert [p.number for p in table.partitions] == [1, 2, 5]
    first, extended, logical = table.partitions
    assert (first.start, first.size, first.type) == (MiB, 10 * MiB, "83")
    assert first.bootable and not first.is_extended
    assert first.uuid == "8e29c348-01"
    assert extended.is_extended
    assert logical.uuid == "8e29c348-05"
    assert logical.volume == Volume("partition 5", 24576 * 512, 4 * MiB)


def test_gpt_table_on_a_path_with_a_space_and_digits() -> None:
    table = parse_sfdisk(SFDISK_GPT)
    (part,) = table.partitions
    assert part.number == 1
    assert part.name == "root"
    assert part.uuid == "0FCC2B72-06D7-8741-8A5C-A14AB212D0CA"
    assert (part.start, part.size) == (MiB, 28 * MiB)


def test_blkid_export_unescapes_values() -> None:
    values = parse_export("LABEL=my\\ disk\\=1\nUUID=abcd\nTYPE=vfat\nnoise\n")
    assert values == {"LABEL": "my disk=1", "UUID": "abcd", "TYPE": "vfat"}


def test_pe_ranges() -> None:
    assert lvm.parse_pe_ranges("/dev/loop1:2-2 [unknown]:4-7") == (
        ("/dev/loop1", 2, 2),
        ("[unknown]", 4, 7),
    )
    assert lvm.parse_pe_ranges("") == ()


def _pvs(*devices: str) -> dict[str, lvm.PhysicalVolume]:
    volumes = {
        "/dev/loop1": Volume("partition 1", MiB, 24 * MiB),
        "/dev/loop2": Volume("partition 2", 25 * MiB, 24 * MiB),
    }
    rows = [r for r in PVS_ROWS if r["pv_name"] in devices]
    found = lvm.physical_volumes(rows, {d: volumes[d] for d in devices})
    return {row["pv_name"]: pv for row, pv in zip(rows, found, strict=True)}


def test_volume_group_over_two_disks() -> None:
    pvs = _pvs("/dev/loop1", "/dev/loop2")
    lvs = {lv.name: lv for lv in lvm.logical_volumes(json.loads(LVS_BOTH), pvs)}
    assert lvs["one"].volume is None
    assert lvs["one"].reason_code == codes.LVM_NOT_LINEAR
    assert lvs["str"].volume is None
    assert lvs["str"].reason_code == codes.LVM_NOT_LINEAR
    assert lvs["str"].segtype == "striped"
    # Partition 2 at 25 MiB, first extent 1 MiB in, extent 0.
    assert lvs["two"].volume == Volume("lvm vg2/two", 26 * MiB, 8 * MiB)


def test_volume_group_with_a_disk_missing() -> None:
    rows = json.loads(LVS_ONE_MISSING)
    lvs = {lv.name: lv for lv in lvm.logical_volumes(rows, _pvs("/dev/loop1"))}
    assert lvs["two"].volume is None
    assert lvs["two"].reason_code == codes.LVM_PV_MISSING
    assert lvs["one"].reason_code == codes.LVM_PV_MISSING
    assert lvs["str"].reason_code == codes.LVM_NOT_LINEAR


def test_lvm_commands_see_only_loop_devices_and_never_device_mapper() -> None:
    argv = lvm.lvm_argv("pvs", ["/dev/loop3"])
    assert argv[:4] == ["pvs", "--driverloaded", "n", "--nolocking"]
    assert '"a|^/dev/loop3$|", "r|.*|"' in argv[5]
    assert "--readonly" in argv
    with pytest.raises(ValueError):
        lvm.lvm_argv("pvs", ["/dev/sda|.*"])


def test_read_only_mount_options_skip_replay() -> None:
    assert fstypes.mount_options("ext4", writable=False) == (
        "ext4",
        ["ro", "noload", "nodev", "nosuid"],
    )
    assert fstypes.mount_options("xfs", writable=False) == (
        "xfs",
        ["ro", "norecovery", "nodev", "nosuid"],
    )
    assert fstypes.mount_options("xfs", writable=True) == (
        "xfs",
        ["rw", "nodev", "nosuid"],
    )
    assert fstypes.mount_options("swap", writable=False) is None


def test_process_identity_tells_a_reused_pid_apart() -> None:
    me = procinfo.identify(os.getpid())
    assert me is not None
    assert procinfo.matches(me.as_record())
    assert not procinfo.matches({**me.as_record(), "start": me.start + 1})
    assert not procinfo.matches({**me.as_record(), "argv": ["qemu-nbd"]})
    assert not procinfo.matches({"pid": "not a pid"})
