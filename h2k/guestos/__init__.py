"""Reading and rewriting a Linux guest's own files, offline, from the host.

The guest-disk layer (:mod:`h2k.guest`) gives a mount of each filesystem of
a disk; this package knows what a Linux guest keeps in them and what a move
from VMware to KVM has to change there. One module per concept:

- :mod:`~h2k.guestos.tree`: guest paths resolved as the guest would (its
  symlinks never lead to the host), atomic rewrites keeping owners, modes
  and SELinux labels;
- :mod:`~h2k.guestos.find_root`, :mod:`~h2k.guestos.mounted`: which
  filesystem is the root, and the guest mounted with its /boot;
- :mod:`~h2k.guestos.devices`: how the guest names filesystems, and which
  names break when the disk moves to virtio;
- :mod:`~h2k.guestos.osrelease`, :mod:`~h2k.guestos.kernels`: what the
  guest is;
- :mod:`~h2k.guestos.fstab`, :mod:`~h2k.guestos.bootloader` (with
  :mod:`~h2k.guestos.cmdline`), :mod:`~h2k.guestos.network` (with
  :mod:`~h2k.guestos.netplan`), :mod:`~h2k.guestos.vmware`,
  :mod:`~h2k.guestos.initramfs_config`, :mod:`~h2k.guestos.selinux`: one
  concern each, each with ``describe`` (for inspect) and ``plan`` (the
  :class:`~h2k.guestos.changes.Change` records a fix makes);
- :mod:`~h2k.guestos.changes`: a fix's changes as records (path, before,
  after) that a dry run reports and a real run applies;
- :mod:`~h2k.guestos.parttypes`: names of partition types, for results;
- :mod:`~h2k.guestos.access`, :mod:`~h2k.guestos.modify`: the steps the
  guest operations share (phases, progress, cancellation, error codes,
  read-only planning then writable applying).
"""

from __future__ import annotations

from h2k.guestos.changes import Change, FixPlan
from h2k.guestos.tree import GuestTree

__all__ = ["Change", "FixPlan", "GuestTree"]
