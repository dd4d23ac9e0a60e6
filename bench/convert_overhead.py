"""What h2k's convert costs over qemu-img by hand, measured side by side.

Ways to turn the same VMDK into qcow2, each run several times, best time
kept, each run starting without an output file as a migration does:

- ``qemu-img convert`` alone;
- what a careful operator types: convert, then ``check`` and ``compare``;
- the same, then the output flushed to disk (``fsync``), as h2k does so that
  a crash never leaves a final name over a partial file;
- h2k's convert operation (format checks, progress events, the same
  verification, the temporary file, fsync and rename).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from h2k.operations import convert
from h2k.operations.base import OperationContext
from tests.images import make_image

SIZE_MIB = 256
ROUNDS = 3


def _best(run: Callable[[], None]) -> float:
    times = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def _qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def main() -> None:
    with tempfile.TemporaryDirectory(dir="/var/tmp") as folder:
        source = make_image(folder, "vmdk", size_mib=SIZE_MIB, name="bench")
        manual_output = Path(folder) / "manual.qcow2"
        h2k_output = Path(folder) / "bench.qcow2"
        events: list[tuple[str, int | None]] = []

        def qemu_img_alone() -> None:
            manual_output.unlink(missing_ok=True)
            _qemu_img(
                "convert", "-f", "vmdk", "-O", "qcow2", source, str(manual_output)
            )

        def by_hand() -> None:
            qemu_img_alone()
            _qemu_img("check", "-f", "qcow2", str(manual_output))
            _qemu_img(
                "compare", "-f", "vmdk", "-F", "qcow2", source, str(manual_output)
            )

        def by_hand_flushed() -> None:
            by_hand()
            fd = os.open(manual_output, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)

        def with_h2k() -> None:
            h2k_output.unlink(missing_ok=True)
            events.clear()
            context = OperationContext(
                job_id="bench",
                spec={
                    "job_id": "bench",
                    "operation": "convert",
                    "image": {"path": source, "format": "vmdk"},
                    "parameters": {"output_format": "qcow2"},
                    "execution_policy": {"timeout_seconds": 3600},
                },
                report=lambda phase, pct, msg, details=None: events.append(
                    (phase, pct)
                ),
                allowed_roots=(folder,),
            )
            convert.run(context)

        alone = _best(qemu_img_alone)
        manual = _best(by_hand)
        flushed = _best(by_hand_flushed)
        h2k = _best(with_h2k)

    print(f"convert {SIZE_MIB} MiB vmdk -> qcow2, best of {ROUNDS}")
    print(f"  qemu-img convert alone          {alone:7.2f} s   1.00x")
    print(f"  convert + check + compare       {manual:7.2f} s   {manual / alone:.2f}x")
    print(
        f"  ... then fsync the output       {flushed:7.2f} s   {flushed / alone:.2f}x"
    )
    print(
        f"  h2k convert operation           {h2k:7.2f} s   {h2k / alone:.2f}x"
        f"   ({h2k / flushed:.2f}x of by-hand flushed; "
        f"{len(events)} progress events)"
    )


if __name__ == "__main__":
    main()
