"""The ``h2k`` command: run the whole stack on one host, check a host.

``h2k up`` starts, on this host: a Redis (the embedded one when no
``REDIS_URL`` is given), the API under gunicorn, and one Celery worker for
each capability queue the host can serve; with ``--flower``, Flower too.
Ctrl-C stops everything it started.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from h2k.capabilities import ORDER, queues_for_worker

console = Console(stderr=True)


@click.group()
def main() -> None:
    """h2k: move VMware and Hyper-V disks onto KVM."""


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def detect(as_json: bool) -> None:
    """Try each disk tool on this host and report the capabilities it has."""
    from h2k.detect import detect_capabilities

    reports = detect_capabilities()
    if as_json:
        click.echo(json.dumps({k: asdict(v) for k, v in reports.items()}, indent=2))
        return
    table = Table("capability", "available", "version or reason")
    for name in ORDER:
        report = reports[name]
        table.add_row(
            name,
            "yes" if report.available else "no",
            report.version if report.available else report.detail,
        )
    Console().print(table)


def _spawn(
    args: list[str], env: dict[str, str], log_path: Path
) -> subprocess.Popen[bytes]:
    log_file = open(log_path, "ab")  # noqa: SIM115 - lives as long as the child
    return subprocess.Popen(
        args,
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _signal_group(child: subprocess.Popen[bytes], signum: int) -> None:
    try:
        os.killpg(child.pid, signum)
    except ProcessLookupError:
        return


@main.command()
@click.option("--port", default=8000, show_default=True, help="API port.")
@click.option("--host", default="127.0.0.1", show_default=True, help="API address.")
@click.option(
    "--data-dir",
    default=".h2k",
    show_default=True,
    type=click.Path(),
    help="Logs, the embedded Redis's data, and default image root.",
)
@click.option(
    "--concurrency", default=1, show_default=True, help="Jobs each worker runs at once."
)
@click.option("--flower", "with_flower", is_flag=True, help="Start Flower too.")
@click.option("--flower-port", default=5555, show_default=True, help="Flower port.")
def up(
    port: int,
    host: str,
    data_dir: str,
    concurrency: int,
    with_flower: bool,
    flower_port: int,
) -> None:
    """Run Redis, the API and one worker per capability queue on this host."""
    from h2k.detect import available, detect_capabilities
    from h2k.embedded import start_redis

    data = Path(data_dir).resolve()
    logs = data / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    children: list[tuple[str, subprocess.Popen[bytes]]] = []

    if not env.get("REDIS_URL"):
        process, url = start_redis(str(data / "redis"))
        children.append(("redis", process))
        env["REDIS_URL"] = url
        console.print(f"embedded Redis at [bold]{url}[/] (data in {data / 'redis'})")
    if not env.get("H2K_ALLOWED_ROOTS"):
        images = data / "images"
        images.mkdir(exist_ok=True)
        env["H2K_ALLOWED_ROOTS"] = str(images)
    console.print(f"images may lie in [bold]{env['H2K_ALLOWED_ROOTS']}[/]")
    env.setdefault("PROMETHEUS_MULTIPROC_DIR", str(data / "prometheus"))
    Path(env["PROMETHEUS_MULTIPROC_DIR"]).mkdir(exist_ok=True)
    for stale in Path(env["PROMETHEUS_MULTIPROC_DIR"]).glob("*.db"):
        stale.unlink()

    queues = queues_for_worker(available(detect_capabilities()))
    if not queues:
        raise click.ClickException(
            "this host can serve no queue: qemu-img does not work here "
            "(run 'h2k detect')"
        )
    config = Path(__file__).resolve().parent.parent / "gunicorn.conf.py"
    celery = [sys.executable, "-m", "celery", "-A", "workers"]
    commands = [
        (
            "api",
            [sys.executable, "-m", "gunicorn", "-c", str(config)]
            + ["--bind", f"{host}:{port}", "web:create_app()"],
        )
    ]
    for queue in queues:
        commands.append(
            (
                f"worker-{queue}",
                celery
                + ["worker", "-Q", queue, "-n", f"{queue}@%h"]
                + ["-c", str(concurrency), "--loglevel", "INFO"],
            )
        )
    if with_flower:
        commands.append(
            (
                "flower",
                celery + ["flower", f"--port={flower_port}", f"--address={host}"],
            )
        )
    for name, args in commands:
        children.append((name, _spawn(args, env, logs / f"{name}.log")))

    console.print(f"API at [bold]http://{host}:{port}[/] (docs at /docs)")
    if with_flower:
        console.print(f"Flower at [bold]http://{host}:{flower_port}[/]")
    console.print(f"workers for queues: {', '.join(queues)}; logs in {logs}")
    console.print("Ctrl-C stops everything")
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        while not stopping:
            for name, child in children:
                if child.poll() is not None:
                    console.print(
                        f"[red]{name} exited ({child.returncode}); see {logs}[/]"
                    )
                    stopping = True
            time.sleep(0.5)
    finally:
        for _, child in reversed(children):
            _signal_group(child, signal.SIGTERM)
        for _, child in reversed(children):
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                _signal_group(child, signal.SIGKILL)
                child.wait()


if __name__ == "__main__":
    main()
