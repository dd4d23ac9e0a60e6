"""Tests of the guest operations, run on real guest disks (tests/guestdisks.py)."""
