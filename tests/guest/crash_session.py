"""A worker that dies inside a guest session, for the crash-recovery tests.

Run as ``python -m tests.guest.crash_session IMAGE FORMAT WORKDIR STATE_DIR``:
opens the image, mounts its first filesystem, prints the session's id and
directory as JSON, and kills itself with SIGKILL, so nothing of Python's
own teardown runs and everything stays behind as after a real crash.
"""

from __future__ import annotations

import json
import os
import signal
import sys

from h2k.guest import GuestDisk


def main(image: str, fmt: str, workdir: str, state_dir: str) -> None:
    with GuestDisk.open(image, fmt, workdir=workdir, state_dir=state_dir) as disk:
        filesystem = disk.filesystems()[0]
        with disk.mount(filesystem) as mountpoint:
            json.dump(
                {
                    "session": disk.session_id,
                    "directory": disk.directory,
                    "mountpoint": mountpoint,
                },
                sys.stdout,
            )
            sys.stdout.write("\n")
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    main(*sys.argv[1:5])
