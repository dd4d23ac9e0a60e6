"""Names for the partition types a migration meets, for people reading results.

GPT types are GUIDs and MBR types are bytes; a result that says "Linux
swap" is read faster than one that says 0657FD6D-A4AB-43C4-84E5-0933C84B4F4F.
Unknown types keep their raw value and get no name.
"""

from __future__ import annotations

GPT_TYPES: dict[str, str] = {
    "0FC63DAF-8483-4772-8E79-3D69D8477DE4": "Linux filesystem",
    "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F": "Linux swap",
    "E6D6D379-F507-44C2-A23C-238F2A3DF928": "Linux LVM",
    "A19D880F-05FC-4D3B-A006-743F0F84911E": "Linux RAID",
    "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709": "Linux root (x86-64)",
    "BC13C2FF-59E6-4262-A352-B275FD6F7172": "Linux extended boot",
    "C12A7328-F81F-11D2-BA4B-00A0C93EC93B": "EFI System",
    "21686148-6449-6E6F-744E-656564454649": "BIOS boot",
    "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7": "Microsoft basic data",
    "E3C9E316-0B5C-4DB8-817D-F92DF00215AE": "Microsoft reserved",
    "DE94BBA4-06D1-4D40-A16A-BFD50179D6AC": "Windows recovery environment",
}
MBR_TYPES: dict[str, str] = {
    "83": "Linux",
    "82": "Linux swap",
    "8e": "Linux LVM",
    "fd": "Linux RAID autodetect",
    "7": "HPFS/NTFS/exFAT",
    "b": "W95 FAT32",
    "c": "W95 FAT32 (LBA)",
    "ef": "EFI (FAT-12/16/32)",
    "5": "Extended",
    "f": "W95 Extended (LBA)",
    "85": "Linux extended",
    "27": "Hidden NTFS WinRE",
}


def name(table_label: str, type_code: str) -> str | None:
    """The common name of ``type_code`` in a ``gpt`` or ``dos`` table."""
    if table_label == "gpt":
        return GPT_TYPES.get(type_code.upper())
    return MBR_TYPES.get(type_code.lower().removeprefix("0x").lstrip("0") or "0")
