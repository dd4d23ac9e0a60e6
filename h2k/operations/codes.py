"""The error codes operations put in :class:`h2k.errors.OperationError`.

A failed job records ``{phase, code, message}``; the code is what a client
branches on, the message is what a person reads. Codes are stable: add new
ones, never reuse or rename one.

``INVALID_PARAMETERS``
    A job parameter is missing, of the wrong type or out of range, or two
    parameters contradict each other (compression with raw output).
``INVALID_IMAGE``
    The image cannot be read in its declared format, or is built in a way
    h2k refuses (a backing file whose format it does not name, a backing
    chain too deep).
``FORMAT_MISMATCH``
    The image is in a different format than the job declares; the message
    names the format qemu-img found.
``PATH_NOT_ALLOWED``
    The image, the output, or a file the image refers to (backing file,
    VMDK extent, qcow2 data file) lies outside the allowed roots, directly
    or through ``..`` or a symlink.
``OUTPUT_EXISTS``
    The output file exists and the job did not ask to overwrite it.
``OUTPUT_IS_INPUT``
    The output path is the image itself or a file the image reads.
``CONVERSION_FAILED``
    ``qemu-img convert`` failed; the message carries its last error line.
``VERIFICATION_FAILED``
    The output does not hold the same data as the source, or qemu-img check
    found it corrupt. The output was not kept.
``CANCELLED``
    The job was cancelled while a tool ran; the tool was stopped and partial
    output removed.
``TIMEOUT``
    The job ran past its time limit; the tool was stopped and partial output
    removed.
``TOOL_FAILED``
    A tool other than the conversion itself (info, check, compare) failed or
    could not be started, or a file operation around it failed.
``CHECKSUM_MISMATCH``
    The image's sha256 differs from ``image.checksum``; nothing was done.
``INSUFFICIENT_SPACE``
    ``qemu-img measure`` says the output needs more space than its
    directory has free; nothing was written.
``NO_OPERATING_SYSTEM``
    No filesystem on the disk holds an operating system h2k recognises.
``UNSUPPORTED_GUEST``
    The guest's operating system is not one this operation can change
    (Windows for a Linux fix, say); nothing was changed.
``NO_BOOTLOADER``
    No GRUB configuration was found to repair.
``NO_INITRAMFS_TOOL``
    The guest has none of dracut, update-initramfs or mkinitcpio.
``INITRAMFS_FAILED``
    The guest's initramfs tool ran and failed; its last output is in the
    message.
``FILESYSTEM_UNREPAIRABLE``
    The filesystem checker could not repair a filesystem.
``NO_LVM``
    The disk holds no LVM physical volume.
``LVM_METADATA_DAMAGED``
    The LVM metadata is damaged and no good copy was found to restore.

The guest-disk layer's codes (:mod:`h2k.guest.codes`) pass through
unchanged: ``UNSUPPORTED_FORMAT``, ``SETUP_FAILED``, ``IMAGE_OPEN_FAILED``,
``IMAGE_LOCKED``, ``NO_PARTITIONS``, ``UNSUPPORTED_FILESYSTEM``,
``LVM_NOT_LINEAR``, ``LVM_PV_MISSING``, ``READ_ONLY``, ``MOUNT_FAILED``,
``TEARDOWN_FAILED``.
"""

from __future__ import annotations

from h2k.guest import codes as guest_codes

INVALID_PARAMETERS = "INVALID_PARAMETERS"
INVALID_IMAGE = "INVALID_IMAGE"
FORMAT_MISMATCH = "FORMAT_MISMATCH"
PATH_NOT_ALLOWED = "PATH_NOT_ALLOWED"
OUTPUT_EXISTS = "OUTPUT_EXISTS"
OUTPUT_IS_INPUT = "OUTPUT_IS_INPUT"
CONVERSION_FAILED = "CONVERSION_FAILED"
VERIFICATION_FAILED = "VERIFICATION_FAILED"
CANCELLED = "CANCELLED"
TIMEOUT = "TIMEOUT"
TOOL_FAILED = "TOOL_FAILED"

CHECKSUM_MISMATCH = "CHECKSUM_MISMATCH"
INSUFFICIENT_SPACE = "INSUFFICIENT_SPACE"
NO_OPERATING_SYSTEM = "NO_OPERATING_SYSTEM"
UNSUPPORTED_GUEST = "UNSUPPORTED_GUEST"
NO_BOOTLOADER = "NO_BOOTLOADER"
NO_INITRAMFS_TOOL = "NO_INITRAMFS_TOOL"
INITRAMFS_FAILED = "INITRAMFS_FAILED"
FILESYSTEM_UNREPAIRABLE = "FILESYSTEM_UNREPAIRABLE"
NO_LVM = "NO_LVM"
LVM_METADATA_DAMAGED = "LVM_METADATA_DAMAGED"

ALL: frozenset[str] = (
    frozenset(
        value
        for name, value in dict(globals()).items()
        if name.isupper() and isinstance(value, str)
    )
    | guest_codes.ALL
)
