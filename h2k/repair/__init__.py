"""What the repair operations (fs_repair, lvm_repair) need besides the guest layer.

- :mod:`h2k.repair.fsck`: running e2fsck and xfs_repair on a block device and
  reading what their exit status and output say.
- :mod:`h2k.repair.lvm_text`: reading LVM's metadata text format, so a copy
  found on disk can be judged whole before it is written back.
- :mod:`h2k.repair.lvm_metadata`: pvck's view of a physical volume (headers,
  metadata areas, every copy of the metadata they still hold), and writing
  a chosen copy back, all without device-mapper.
"""
