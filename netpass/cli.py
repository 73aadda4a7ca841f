"""The ``netpass`` command line.  The only place that prints and picks exit codes."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any, NoReturn

from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import NetpassError, UsageError

log = logging.getLogger(__name__)

err_console = Console(stderr=True)
out_console = Console()


_MAIN_PID = os.getpid()


def _on_sigterm(signum: int, frame: Any) -> NoReturn:
    # pyroute2 forks helpers that inherit this handler and are ended with
    # SIGTERM: a helper must just exit, never unwind (and so undo) our state.
    if os.getpid() != _MAIN_PID:
        os._exit(128 + signum)
    # Unwind through every context manager, so kernel state is undone.
    raise KeyboardInterrupt(f"signal {signum}")


def _positive(kind: type, name: str) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, not {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{name} must be positive, not {text}")
        return value
    return parse


def _non_negative_int(name: str) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a whole number, not {text!r}") from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"{name} must be zero or more, not {text}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="netpass", description="Zero-loss network switchover "
                                 "for QEMU live migration, from the host side.")
    ap.add_argument("--version", action="version", version=f"netpass {__version__}")
    ap.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = ap.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run a real migration in the embedded lab and measure loss")
    demo.add_argument("--mode", choices=("baseline",), default="baseline",
                      help="baseline: plain QEMU migration")
    demo.add_argument("--rate", type=_positive(float, "--rate"), default=2000.0,
                      help="probes per second from the peer (default 2000)")
    demo.add_argument("--proto", choices=("icmp", "udp"), default="icmp")
    demo.add_argument("--pause-ms", type=_non_negative_int("--pause-ms"), default=200,
                      help="extra switchover pause via pause-before-switchover (default 200)")
    demo.add_argument("--lan-lag-ms", type=_non_negative_int("--lan-lag-ms"), default=0,
                      help="the LAN keeps sending to the source this long after the destination resumes")
    demo.add_argument("--kill-source", action="store_true",
                      help="kill the source QEMU at completion, as libvirt does")
    demo.add_argument("--json", action="store_true", help="print one JSON object")
    demo.add_argument("--plot", type=Path, metavar="FILE.png", help="draw the replies over time")
    demo.add_argument("--cache", type=Path, help="guest image cache (default /var/cache/netpass)")

    doc = sub.add_parser("doctor", help="what this host supports and what netpass will use")
    doc.add_argument("--json", action="store_true")

    lab = sub.add_parser("lab", help="lab housekeeping")
    lab_sub = lab.add_subparsers(dest="lab_command", required=True)
    lab_sub.add_parser("image", help="build the guest image now")
    lab_sub.add_parser("cleanup", help="remove what dead lab runs left behind")
    return ap


def _require_root(what: str) -> None:
    from .errors import PermissionProblem

    if os.geteuid() != 0:
        raise PermissionProblem(f"{what} needs root (network namespaces, taps, QEMU): run it with sudo")


def cmd_demo(args: argparse.Namespace) -> int:
    _require_root("netpass demo")
    from .lab import image, scenario
    from .lab.topology import sweep_stale

    sweep_stale()
    cache = args.cache or image.DEFAULT_CACHE
    with err_console.status("building the guest image") as status:
        img = image.build(cache, progress=lambda m: status.update(m))

        def say(msg: str) -> None:
            status.update(msg)
            if not args.json:
                err_console.log(msg)

        runs: dict[str, dict[str, Any]] = {}
        timelines: dict[str, Path] = {}
        with tempfile.TemporaryDirectory(prefix="netpass-demo-") as tmp:
            for mode in [args.mode]:
                timelines[mode] = Path(tmp) / f"{mode}.json"
                opts = scenario.ScenarioOptions(
                    rate=args.rate, proto=args.proto, switchover_pause_ms=args.pause_ms,
                    lan_lag_ms=args.lan_lag_ms, kill_source=args.kill_source,
                    timeline_path=timelines[mode])
                say(f"{mode}: starting")
                runs[mode] = scenario.run_migration_scenario(img, opts, say)
            if args.plot:
                from .lab.plot import plot_runs

                plot_runs(runs, timelines, args.plot)
    if args.json:
        print(json.dumps(runs))
    else:
        _print_runs(runs)
        if args.plot:
            out_console.print(f"plot written to {args.plot}")
    return 0


def _print_runs(runs: dict[str, dict[str, Any]]) -> None:
    table = Table(title="live migration under probe traffic")
    table.add_column("metric")
    for name in runs:
        table.add_column(name, justify="right")
    rows = [("probes sent", "sent"), ("lost", "lost"), ("reordered", "reordered"),
            ("duplicates", "duplicates"), ("largest gap (ms)", "gap_ms"),
            ("QEMU downtime (ms)", "downtime_ms"), ("migration time (ms)", "total_time_ms"),
            ("latency p50 (ms)", "latency_p50_ms"), ("latency p99 (ms)", "latency_p99_ms")]
    for label, key in rows:
        table.add_row(label, *(str(r.get(key)) for r in runs.values()))
    out_console.print(table)


def cmd_doctor(args: argparse.Namespace) -> int:
    from . import doctor

    rep = doctor.run()
    if args.json:
        print(json.dumps(rep.as_dict()))
    else:
        table = Table(title="netpass doctor")
        table.add_column("check")
        table.add_column("status")
        table.add_column("detail")
        for c in rep.checks:
            status = "[green]available" if c.ok else ("[red]MISSING" if c.required else "[yellow]missing")
            table.add_row(c.name + (" (required)" if c.required else ""), status, c.detail)
        out_console.print(table)
        for job, how in rep.uses.items():
            out_console.print(f"[bold]{job}[/bold]: {how}")
        if not rep.ok:
            out_console.print("[red]netpass cannot run here: fix the required checks above")
    return 0 if rep.ok else 1


def cmd_lab(args: argparse.Namespace) -> int:
    _require_root("netpass lab")
    from .lab import image
    from .lab.topology import sweep_stale

    if args.lab_command == "image":
        img = image.build(progress=lambda m: err_console.log(m))
        print(img.kernel.parent)
    else:
        removed = sweep_stale()
        print(f"removed {len(removed)} stale lab namespaces" + (": " + ", ".join(removed) if removed else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    global _MAIN_PID
    _MAIN_PID = os.getpid()
    signal.signal(signal.SIGTERM, _on_sigterm)
    handlers = {"demo": cmd_demo, "doctor": cmd_doctor, "lab": cmd_lab}
    try:
        return handlers[args.command](args)
    except UsageError as exc:
        parser.error(str(exc))
    except NetpassError as exc:
        err_console.print(f"[red]netpass: error:[/red] {exc}", highlight=False)
        return exc.exit_code
    except KeyboardInterrupt:
        err_console.print("netpass: interrupted; everything it set up was removed")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
