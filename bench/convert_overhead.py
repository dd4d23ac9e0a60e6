"""What h2k's convert costs over qemu-img by hand, measured side by side.

Three ways to turn the same VMDK into qcow2, each run several times, best
time kept:

- ``qemu-img convert`` alone;
- what a careful operator types: convert, then ``check`` and ``compare``;
- h2k's convert operation (progress events, the same verification, the
  temporary file, fsync and rename).
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from pathlib import Path

from h2k.operations import convert
from h2k.operations.base import OperationContext
from tests.images import make_image

SIZE_MIB = 256
ROUNDS = 3


def _best(run) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    with tempfile.TemporaryDirectory(dir="/var/tmp") as folder:
        source = make_image(folder, "vmdk", size_mib=SIZE_MIB, name="bench")
        target = str(Path(folder) / "manual.qcow2")

        def qemu_img_alone() -> None:
            subprocess.run(
                ["qemu-img", "convert", "-f", "vmdk", "-O", "qcow2", source, target],
                check=True,
            )

        def by_hand() -> None:
            qemu_img_alone()
            subprocess.run(
                ["qemu-img", "check", "-f", "qcow2", target],
                check=True,
                capture_output=True,
            )
            subprocess.run(
                ["qemu-img", "compare", "-f", "vmdk", "-F", "qcow2", source, target],
                check=True,
                capture_output=True,
            )

        events: list[tuple[str, int | None]] = []

        def with_h2k() -> None:
            events.clear()
            context = OperationContext(
                job_id="bench",
                spec={
                    "job_id": "bench",
                    "operation": "convert",
                    "image": {"path": source, "format": "vmdk"},
                    "parameters": {"output_format": "qcow2", "overwrite": True},
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
        h2k = _best(with_h2k)

    print(f"convert {SIZE_MIB} MiB vmdk -> qcow2, best of {ROUNDS}")
    print(f"  qemu-img convert alone          {alone:7.2f} s   1.00x")
    print(f"  convert + check + compare       {manual:7.2f} s   {manual / alone:.2f}x")
    print(
        f"  h2k convert operation           {h2k:7.2f} s   {h2k / alone:.2f}x"
        f"   ({h2k / manual:.2f}x of by-hand, {len(events)} progress events)"
    )


if __name__ == "__main__":
    main()
