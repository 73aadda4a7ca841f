"""The ``netpass`` command line.  The only place that prints and picks exit codes."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import signal
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import NetpassError, UsageError

COMPRESS_MODES = ("auto", "zstd", "none")  # see channel.Channel.should_compress

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


async def _until_signal(coro: Any) -> Any:
    """Run ``coro``; SIGTERM or SIGINT cancels it, and only it, once: its own
    handlers then cancel QEMU's migration and undo every change, with the
    tasks they rely on (QMP readers, the channel) still running.  (A signal
    handler raising out of the event loop instead had asyncio cancel every
    task at once, and the undo lost its QMP connection: a SIGTERMed
    migration went on without netpass.)"""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(coro)
    stopping: list[int] = []

    def stop(signum: int) -> None:
        if not stopping:
            log.warning("signal %d: stopping (undoing everything first)", signum)
            task.cancel()
        stopping.append(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop, sig)
    try:
        return await task
    except asyncio.CancelledError as exc:
        if not stopping:
            raise
        interrupted = KeyboardInterrupt(f"signal {stopping[0]}")
        interrupted.report = getattr(exc, "report", None)  # type: ignore[attr-defined]
        raise interrupted from None
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


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


class JsonFormatter(logging.Formatter):
    """One JSON object per event; the session id, when the event has one,
    in its own field (netpass logs every session event as ``session=ID``)."""

    _SESSION = re.compile(r"\bsession=([0-9A-Za-z_-]+)")

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(), "logger": record.name}
        m = self._SESSION.search(msg)
        if m:
            out["session"] = m.group(1)
            msg = (msg[:m.start()] + msg[m.end():]).strip()
        out["msg"] = msg
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="netpass", description="Zero-loss network switchover "
                                 "for QEMU live migration, from the host side.")
    ap.add_argument("--version", action="version", version=f"netpass {__version__}")
    ap.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    ap.add_argument("--log-format", choices=("text", "json"), default="text",
                    help="json: one JSON object per log line (ts, level, logger, session, msg)")
    sub = ap.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run a real migration in the embedded lab and measure loss")
    demo.add_argument("--mode", choices=("both", "baseline", "netpass"), default="both",
                      help="baseline: plain QEMU migration; netpass: with netpass; both (default): "
                           "one of each, side by side")
    demo.add_argument("--rate", type=_positive(float, "--rate"), default=2000.0,
                      help="probes per second from the peer (default 2000)")
    demo.add_argument("--proto", choices=("icmp", "udp", "tcp"), default="icmp",
                      help="icmp/udp: numbered probes at --rate; tcp: a bulk TCP flow into the guest "
                           "at --tcp-rate-mbit (reports its longest stall and retransmissions)")
    demo.add_argument("--size", type=_positive(int, "--size"), default=98, metavar="BYTES",
                      help="probe frame size, 66-1514 (default 98)")
    demo.add_argument("--tcp-rate-mbit", type=_positive(float, "--tcp-rate-mbit"), default=20.0)
    demo.add_argument("--queues", type=_positive(int, "--queues"), default=1,
                      help="NIC queues (and vCPUs) of the lab VM, 1-8")
    demo.add_argument("--flood-pps", type=_non_negative_int("--flood-pps"), default=0, metavar="PPS",
                      help="the peer also floods the VM with PPS frames/s that the guest drops, all along")
    demo.add_argument("--max-bandwidth-mib", type=_positive(int, "--max-bandwidth-mib"), metavar="MIB",
                      help="QEMU's max-bandwidth in MiB/s, both modes (a longer migration)")
    demo.add_argument("--busy-core", action="store_true",
                      help="keep one core busy with an unrelated process all along")
    demo.add_argument("--stopper", choices=("netpass", "external"), default="netpass",
                      help="external: the lab, as a management layer, stops the source VM itself "
                           "mid-migration (netpass's fallback path)")
    demo.add_argument("--pause-ms", type=_non_negative_int("--pause-ms"), default=200,
                      help="extra switchover pause via pause-before-switchover (default 200; QMP only: "
                           "libvirt continues its own pause at once)")
    demo.add_argument("--burst", type=_non_negative_int("--burst"), default=0, metavar="N",
                      help="the peer also sends N frames to the VM while the source is stopped "
                           "(a backlog for netpass to carry; at most 200000)")
    demo.add_argument("--lan-lag-ms", type=_non_negative_int("--lan-lag-ms"), default=0,
                      help="the LAN keeps sending to the source this long after the destination resumes")
    demo.add_argument("--kill-source", action="store_true",
                      help="kill the source QEMU at completion, as libvirt does")
    demo.add_argument("--strict-ordering", action="store_true",
                      help="run netpass with --strict-ordering (nothing overtakes forwarded frames)")
    demo.add_argument("--manager", choices=("qmp", "libvirt"), default="qmp",
                      help="who migrates: netpass over QMP ('netpass migrate'), or libvirt "
                           "('virsh migrate --live', netpass's agents in transparent mode); "
                           "with libvirt, the knobs are --mode, --rate, --proto, --size and --tcp-rate-mbit")
    demo.add_argument("--json", action="store_true", help="print one JSON object")
    demo.add_argument("--plot", type=Path, metavar="FILE.png", help="draw the replies over time")
    demo.add_argument("--cache", type=Path, help="guest image cache (default /var/cache/netpass)")

    agent = sub.add_parser("agent", help="serve migration sessions on this host")
    agent.add_argument("--listen", required=True, metavar="HOST:PORT")
    agent.add_argument("--token-file", required=True, type=Path)
    agent.add_argument("--qmp-root", type=Path, default=Path("/run/libvirt/qemu"),
                       help="only open QMP sockets under this directory, with no world-writable "
                            "directory on the way (default /run/libvirt/qemu)")
    agent.add_argument("--qemu-user", action="append", default=None, metavar="USER",
                       help="a QMP socket must belong to root or to this user (repeatable; default: "
                            "whichever of libvirt-qemu and qemu exist)")
    agent.add_argument("--max-cache-bytes", type=_positive(int, "--max-cache-bytes"),
                       default=256 << 20, help="frames held per session, in bytes (default 256 MiB)")
    agent.add_argument("--tls-cert", help="serve TLS with this certificate (PEM)")
    agent.add_argument("--tls-key", help="the certificate's key (PEM)")
    agent.add_argument("--metrics-listen", metavar="HOST:PORT",
                       help="serve Prometheus metrics at http://HOST:PORT/metrics")
    agent.add_argument("--state-dir", type=Path, default=Path("/run/netpass"),
                       help="where holds in progress are recorded, so that a restarted agent "
                            "undoes what a dead one left (default /run/netpass)")
    agent.add_argument("--libvirt", metavar="URI", dest="libvirt_uri",
                       help="transparent mode: follow the migrations this libvirt drives (e.g. "
                            "qemu:///system) and make them lossless; 'virsh migrate' stays as it is")
    agent.add_argument("--peer", action="append", default=[], metavar="HOST:PORT",
                       help="with --libvirt: another host's agent, asked whether it receives a "
                            "domain this host sends (repeatable; the same token)")
    agent.add_argument("--peer-tls-ca", metavar="PEM",
                       help="with --libvirt: talk TLS to the peers' agents, trusting this CA")
    agent.add_argument("--strict-ordering", action="store_true",
                       help="with --libvirt: the migrations this host sends keep strict ordering "
                            "(as 'netpass migrate --strict-ordering')")

    mig = sub.add_parser("migrate", help="live-migrate a VM with zero network loss")
    mig.add_argument("--qmp", required=True, help="the source VM's QMP socket")
    mig.add_argument("--uri", required=True, help="QEMU migration URI, e.g. tcp:HOST:PORT")
    mig.add_argument("--dest-agent", required=True, metavar="HOST:PORT")
    mig.add_argument("--dest-qmp", required=True, help="the destination VM's QMP socket, on its host")
    mig.add_argument("--token-file", required=True, type=Path)
    mig.add_argument("--report", type=Path, metavar="FILE.json", help="write the session report here")
    mig.add_argument("--best-effort", action="store_true",
                     help="if netpass cannot arm, migrate without it (and say so) instead of aborting")
    mig.add_argument("--max-cache-bytes", type=_positive(int, "--max-cache-bytes"), default=256 << 20,
                     help="bound on the memory captured frames take, each frame's bytes plus "
                          "~256 bytes of bookkeeping (default 256 MiB)")
    mig.add_argument("--linger-ms", type=_positive(int, "--linger-ms"), default=300,
                     help="keep catching late frames until this long a quiet period after the resume")
    mig.add_argument("--linger-max-ms", type=_positive(int, "--linger-max-ms"), default=5000,
                     help="upper bound on catching late frames after the resume (default 5000)")
    mig.add_argument("--strict-ordering", action="store_true",
                     help="the destination holds its VM's transmissions and newer live frames "
                          "until every forwarded frame is inside the VM: nothing overtakes them")
    mig.add_argument("--hold-timeout-ms", type=_positive(int, "--hold-timeout-ms"), default=3000,
                     help="with --strict-ordering: release everything this long after the "
                          "destination resumes, whatever is still missing (default 3000)")
    mig.add_argument("--save-pcap", type=Path, metavar="FILE.pcap",
                     help="write the frames netpass carried across (those replayed) as a pcap file")
    mig.add_argument("--compress", choices=COMPRESS_MODES, default="auto",
                     help="zstd for the batches: auto (when the link falls behind: the default), "
                          "zstd (always) or none")
    mig.add_argument("--tls-ca", help="talk TLS to the agent, trusting this CA (PEM)")
    mig.add_argument("--state-dir", type=Path, default=Path("/run/netpass"),
                     help="where the migration's changes to this host are recorded, so that a guard "
                          "undoes them should netpass be killed (default /run/netpass)")
    mig.add_argument("--json", action="store_true", help="print the report as JSON on stdout")

    bench = sub.add_parser("bench", help="measure the datapath (drain, ship, replay) without QEMU")
    bench.add_argument("--size", type=_positive(int, "--size"), default=64, help="frame size in bytes (60-1514)")
    bench.add_argument("--frames", type=_positive(int, "--frames"), default=100_000,
                       help="frames in the source tap's ring (default 100000)")
    bench.add_argument("--compress", choices=COMPRESS_MODES, default="auto",
                       help="compression policy, as for migrate (default auto)")
    bench.add_argument("--link-mbit", type=_positive(int, "--link-mbit"), metavar="MBIT",
                       help="limit the link between the two namespaces to MBIT Mbit/s")
    bench.add_argument("--cache-cap-mib", type=_positive(int, "--cache-cap-mib"), metavar="MIB",
                       help="instead: fill the agent's cache (a paused VM) past a cap of MIB "
                            "and report whether the cap and the RSS bound hold")
    bench.add_argument("--live", action="store_true",
                       help="instead: netpass's CPU per frame before the stop (the shadow ring), with "
                            "frames offered to a real tap at 50,000 and 200,000 a second")
    bench.add_argument("--seconds", type=_positive(float, "--seconds"), default=2.0,
                       help="with --live: how long each rate is offered (default 2)")
    bench.add_argument("--repeat", type=_positive(int, "--repeat"), default=1, metavar="N",
                       help="run N times and report each field's median, and every run (with --json)")
    bench.add_argument("--free-source", action="store_true",
                       help="drain and encode every batch before the clock starts: the ceiling of the "
                            "channel, the destination and the VM, whatever the source's capture costs")
    bench.add_argument("--perf-control", metavar="FIFO",
                       help="a FIFO that perf record/stat -D -1 --control=fifo:FIFO reads: counting is "
                            "enabled for the transfer alone")
    bench.add_argument("--json", action="store_true")

    doc = sub.add_parser("doctor", help="what this host supports and what netpass will use")
    doc.add_argument("--libvirt", metavar="URI", default=None,
                     help="check this libvirt (as virsh -c URI): reachable, with QMP event passthrough; "
                          "then required (default: qemu:///system, reported only)")
    doc.add_argument("--json", action="store_true")

    lab = sub.add_parser("lab", help="lab housekeeping")
    lab_sub = lab.add_subparsers(dest="lab_command", required=True)
    lab_sub.add_parser("image", help="build the guest image now")
    lab_sub.add_parser("cleanup", help="remove what dead lab runs left behind")
    mx = lab_sub.add_parser("matrix", help="the results matrix: every scenario, plain and netpass, N runs")
    mx.add_argument("--runs", type=_positive(int, "--runs"), default=5,
                    help="runs per scenario (the key ones run twice as many; default 5)")
    mx.add_argument("--scenario", action="append", metavar="NAME",
                    help="only these (repeatable): " + ", ".join(s.name for s in _scenarios()))
    mx.add_argument("--modes", default="plain,netpass,strict",
                    help="comma-separated, of plain, netpass, strict (default all three)")
    mx.add_argument("--busy-core", action="store_true", help="every run with a busy core")
    mx.add_argument("--json", action="store_true", help="print JSON (with every run) instead of Markdown")
    mx.add_argument("--save", metavar="PATH", help="write the matrix so far as JSON after every run")
    return ap


def _scenarios() -> list[Any]:
    from .lab.matrix import SCENARIOS

    return SCENARIOS


def _require_root(what: str) -> None:
    from .errors import PermissionProblem

    if os.geteuid() != 0:
        raise PermissionProblem(f"{what} needs root (network namespaces, taps, QEMU): run it with sudo")


def cmd_demo(args: argparse.Namespace) -> int:
    _require_root("netpass demo")
    from .errors import LabError
    from .lab import image, scenario
    from .lab.topology import demo_tmp_prefix, sweep_stale

    if args.burst > 200_000:
        raise UsageError("--burst is at most 200000 frames")
    if not 66 <= args.size <= 1514:
        raise UsageError("--size is 66 to 1514 bytes")
    if args.queues > 8:
        raise UsageError("--queues is at most 8")
    if args.flood_pps > 100_000:
        raise UsageError("--flood-pps is at most 100000")
    if args.manager == "libvirt":
        qmp_only = [flag for flag, value, default in (
            ("--queues", args.queues, 1), ("--flood-pps", args.flood_pps, 0),
            ("--max-bandwidth-mib", args.max_bandwidth_mib, None), ("--busy-core", args.busy_core, False),
            ("--stopper", args.stopper, "netpass"), ("--burst", args.burst, 0),
            ("--lan-lag-ms", args.lan_lag_ms, 0), ("--kill-source", args.kill_source, False),
            ("--strict-ordering", args.strict_ordering, False)) if value != default]
        if qmp_only:
            raise UsageError(f"{', '.join(qmp_only)}: not with --manager libvirt (libvirt's lab runs "
                             "'virsh migrate --live' as an operator types it)")
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
        with tempfile.TemporaryDirectory(prefix=demo_tmp_prefix()) as tmp:
            modes = ["baseline", "netpass"] if args.mode == "both" else [args.mode]
            if args.manager == "libvirt":
                from .lab import virtlab

                for mode in modes:
                    timelines[mode] = Path(tmp) / f"{mode}.json"
                    say(f"{mode}: starting (libvirt)")
                    runs[mode] = virtlab.run(img, args.rate, say, ("src", "dst") if mode == "netpass" else (),
                                             proto=args.proto, tcp_rate_mbit=args.tcp_rate_mbit,
                                             frame_size=args.size, timeline=timelines[mode])
                    runs[mode].pop("agent_logs", None)
                    rep = runs[mode]["report"]
                    if mode == "netpass" and rep.get("state") != "done":
                        raise LabError(f"netpass's agents did not follow the migration: {rep.get('error')}")
            for mode in modes if args.manager == "qmp" else ():
                timelines[mode] = Path(tmp) / f"{mode}.json"
                opts = scenario.ScenarioOptions(
                    rate=args.rate, proto=args.proto, switchover_pause_ms=args.pause_ms,
                    lan_lag_ms=args.lan_lag_ms, kill_source=args.kill_source,
                    timeline_path=timelines[mode], mode=mode, burst_frames=args.burst,
                    frame_size=args.size, tcp_rate_mbit=args.tcp_rate_mbit, queues=args.queues,
                    flood_pps=args.flood_pps, max_bandwidth_mib=args.max_bandwidth_mib,
                    busy_core=args.busy_core, stopper=args.stopper,
                    migrate_args=("--strict-ordering",) if args.strict_ordering else ())
                say(f"{mode}: starting")
                runs[mode] = scenario.run_migration_scenario(img, opts, say)
                logs = runs[mode].get("report", {}).pop("logs", None)
                if mode == "netpass" and runs[mode]["report"].get("exit_code") != 0:
                    raise LabError("netpass migrate failed in the lab: "
                                   f"{runs[mode]['report'].get('error')}\n{logs or ''}")
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
    tcp = any(r.get("proto") == "tcp" for r in runs.values())
    rows = ([("longest stall (ms)", "stall_ms"), ("retransmissions", "retransmits"),
             ("needless retransmissions (D-SACK)", "dsack_dups"), ("throughput (Mbit/s)", "mbit_per_s")]
            if tcp else
            [("probes sent", "sent"), ("lost", "lost"), ("reordered", "reordered"),
             ("duplicates", "duplicates"), ("largest gap (ms)", "gap_ms")])
    rows += [("QEMU downtime (ms)", "downtime_ms"), ("network pause (ms)", "network_pause_ms"),
             ("migration time (ms)", "total_time_ms")]
    if not tcp:
        rows += [("latency p50 (ms)", "latency_p50_ms"), ("latency p99 (ms)", "latency_p99_ms")]
    for label, key in rows:
        table.add_row(label, *(str(r.get(key)) for r in runs.values()))
    if not tcp:
        table.add_row("never reached the guest",
                      *(str(r["sent"] - r["guest_in_echos"]) if r.get("guest_in_echos") is not None else "-"
                        for r in runs.values()))
        table.add_row("replies the guest failed to send",
                      *(str(r.get("guest_icmp_out_errors", "-")) for r in runs.values()))
    rep_rows = [("frames captured", "frames_captured"), ("frames replayed", "frames_replayed"),
                ("stop path", "stop_path"), ("what QEMU swallowed is", "swallowed_account"),
                ("park to stop (ms)", "park_to_stop_ms"),
                ("replay delay (ms)", "replay_delay_ms"),
                ("destination ring overflow", "dest_ring_overflow"),
                ("VM read the replay at (frames/s)", "vm_replay_read_fps")]
    for label, key in rep_rows:
        table.add_row(label, *(str(r.get("report", {}).get(key, "-")) for r in runs.values()))
    out_console.print(table)


def cmd_doctor(args: argparse.Namespace) -> int:
    from . import doctor

    rep = doctor.run(args.libvirt)
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


def _qemu_uids(users: list[str] | None) -> frozenset[int]:
    import pwd

    uids = {0}
    for name in users or ("libvirt-qemu", "qemu"):
        try:
            uids.add(pwd.getpwnam(name).pw_uid)
        except KeyError:
            if users:
                raise UsageError(f"--qemu-user {name}: no such user") from None
    return frozenset(uids)


def cmd_agent(args: argparse.Namespace) -> int:
    _require_root("netpass agent")

    from .agent import Agent
    from .channel import load_token, parse_hostport
    from .deststate import AgentConfig

    if bool(args.tls_cert) != bool(args.tls_key):
        raise UsageError("--tls-cert and --tls-key go together")
    if (args.peer or args.peer_tls_ca or args.strict_ordering) and not args.libvirt_uri:
        raise UsageError("--peer, --peer-tls-ca and --strict-ordering go with --libvirt (the transparent mode)")
    for peer in args.peer:
        parse_hostport(peer)
    if not args.qmp_root.is_dir() and not args.libvirt_uri:
        raise UsageError(f"--qmp-root {args.qmp_root} is not a directory: give the directory under "
                         "which the destination QEMUs' QMP sockets are")
    cfg = AgentConfig(listen=args.listen, token=load_token(args.token_file), qmp_root=args.qmp_root,
                      max_cache_bytes=args.max_cache_bytes,
                      tls_cert=args.tls_cert, tls_key=args.tls_key, state_dir=args.state_dir,
                      metrics_listen=args.metrics_listen, qemu_uids=_qemu_uids(args.qemu_user),
                      libvirt_uri=args.libvirt_uri, peers=tuple(args.peer), peer_tls_ca=args.peer_tls_ca,
                      follow_strict=args.strict_ordering)
    if not logging.getLogger().isEnabledFor(logging.INFO):
        logging.getLogger().setLevel(logging.INFO)
    asyncio.run(_until_signal(Agent(cfg).serve_forever()))
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    _require_root("netpass migrate")

    from .channel import load_token
    from .source import migrate
    from .srcstate import MigrateOptions

    opts = MigrateOptions(qmp=args.qmp, uri=args.uri, dest_agent=args.dest_agent,
                          dest_qmp=args.dest_qmp, token=load_token(args.token_file),
                          best_effort=args.best_effort, max_cache_bytes=args.max_cache_bytes,
                          linger_quiet_ms=args.linger_ms,
                          linger_max_ms=args.linger_max_ms, tls_ca=args.tls_ca,
                          strict_ordering=args.strict_ordering, hold_timeout_ms=args.hold_timeout_ms,
                          save_pcap=str(args.save_pcap) if args.save_pcap else None,
                          compress=args.compress, state_dir=args.state_dir)
    if args.hold_timeout_ms > 60_000:
        raise UsageError("--hold-timeout-ms is at most 60000")
    if args.linger_max_ms > 60_000 or args.linger_ms > args.linger_max_ms:
        raise UsageError("--linger-max-ms is at most 60000, and --linger-ms at most --linger-max-ms")
    report: dict[str, Any] | None = None
    with err_console.status("arming") as status:
        last_line = [0.0]

        def progress(kind: str, data: dict[str, Any]) -> None:
            if kind == "migration":
                line = (f"{data['status']}: {data['transferred_mib']} MiB sent, "
                        f"{data['remaining_mib']} MiB left of {data['total_mib']}, pass {data['pass']}, "
                        f"dirty {data['dirty_pages_rate']} pages/s, expected downtime "
                        f"{data['expected_downtime_ms']} ms")
                status.update(line)
                # Not a terminal (a log, a pipe): one line a second, not a spinner.
                if not err_console.is_terminal and time.monotonic() - last_line[0] >= 1.0:
                    last_line[0] = time.monotonic()
                    err_console.log(line)
            else:
                err_console.log(data.get("message", ""))
        try:
            report = asyncio.run(_until_signal(migrate(opts, progress)))
        except (NetpassError, KeyboardInterrupt) as exc:
            report = getattr(exc, "report", None)
            raise
        finally:
            if report is not None and args.report:
                args.report.write_text(json.dumps(report, indent=2) + "\n")
            if report is not None and args.json:
                print(json.dumps(report))
    assert report is not None
    if not args.json:
        _print_report(report)
    return 0


def _print_report(rep: dict[str, Any]) -> None:
    table = Table(title=f"netpass session {rep['session']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("frames_captured", "frames_replayed", "frames_dropped", "bytes_captured", "bytes_wire",
                "downtime_ms", "stop_to_resume_ms", "replay_delay_ms", "reordered_estimate",
                "destination_status"):
        table.add_row(key, str(rep.get(key)))
    if rep.get("strict_ordering"):
        for key in ("held_tx", "held_rx", "hold_ms", "hold_timeout"):
            table.add_row(key, str(rep.get(key)))
    out_console.print(table)
    for note in rep.get("notes", []):
        out_console.print(f"note: {note}")


def cmd_bench(args: argparse.Namespace) -> int:
    _require_root("netpass bench")
    from .bench import cache_cap, medians, perf_hint, run

    if args.live and args.cache_cap_mib:
        raise UsageError("--live and --cache-cap-mib are two different benches: choose one")
    if args.perf_control and (args.live or args.cache_cap_mib):
        raise UsageError("--perf-control profiles the transfer bench, not --live or --cache-cap-mib")
    if args.free_source and (args.live or args.cache_cap_mib):
        raise UsageError("--free-source is for the transfer bench, not --live or --cache-cap-mib")
    if args.perf_control and not Path(args.perf_control).is_fifo():
        raise UsageError(f"--perf-control {args.perf_control} is not a FIFO: {perf_hint(args.perf_control)}")
    runs: list[dict[str, Any]] = []
    for i in range(args.repeat):
        of = f" (run {i + 1} of {args.repeat})" if args.repeat > 1 else ""
        if args.live:
            from . import livebench

            with err_console.status(f"bench: the live phase, {args.size}-byte frames offered at "
                                    f"50k and 200k a second{of}"):
                runs.append(livebench.run(args.size, args.seconds))
        elif args.cache_cap_mib:
            with err_console.status(f"bench: filling a {args.cache_cap_mib} MiB agent cache with "
                                    f"{args.size}-byte frames{of}"):
                runs.append(cache_cap(args.cache_cap_mib, args.size))
        else:
            with err_console.status(f"bench: {args.frames} frames of {args.size} bytes{of}"):
                runs.append(run(args.size, args.frames, compress=args.compress, link_mbit=args.link_mbit,
                                perf=args.perf_control, free_source=args.free_source))
    res = runs[0] if args.repeat == 1 else medians(runs)
    if args.json:
        print(json.dumps(res if args.repeat == 1 else {"median": res, "runs": runs}))
    else:
        table = Table(title="netpass bench" + (f", median of {args.repeat} runs" if args.repeat > 1 else ""))
        table.add_column("metric")
        table.add_column("value", justify="right")
        if args.repeat > 1:
            table.add_column("runs", justify="right")
        for k, v in res.items():
            row = [k, str(v)]
            if args.repeat > 1:
                nums = [r[k] for r in runs if isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)]
                row.append(f"{min(nums)} .. {max(nums)}" if len(nums) == len(runs) else "")
            table.add_row(*row)
        out_console.print(table)
    return 0


def cmd_lab(args: argparse.Namespace) -> int:
    _require_root("netpass lab")
    from .lab import image
    from .lab.topology import sweep_stale

    if args.lab_command == "image":
        img = image.build(progress=lambda m: err_console.log(m))
        print(img.kernel.parent)
    elif args.lab_command == "matrix":
        from .lab import matrix

        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        bad = [m for m in modes if m not in matrix.MODES] + \
              [n for n in args.scenario or [] if n not in {s.name for s in matrix.SCENARIOS}]
        if bad or not modes:
            raise UsageError(f"unknown mode or scenario: {', '.join(bad) or '(none given)'}")
        sweep_stale()
        img = image.build(progress=lambda m: err_console.log(m))
        with err_console.status("matrix") as status:
            # A spinner on a terminal; one line per step otherwise (a log, CI).
            say = status.update if err_console.is_terminal else err_console.log
            def save(so_far: dict[str, Any]) -> None:
                tmp = Path(args.save + ".tmp")
                tmp.write_text(json.dumps(so_far))
                tmp.replace(args.save)

            result = matrix.run(img, args.runs, args.scenario, modes,
                                {"busy_core": True} if args.busy_core else {}, say,
                                save if args.save else None)
        print(json.dumps(result) if args.json else matrix.markdown(result))
    else:
        removed = sweep_stale()
        print(f"removed {len(removed)} stale lab namespaces" + (": " + ", ".join(removed) if removed else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    if args.log_format == "json":
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonFormatter())
    global _MAIN_PID
    _MAIN_PID = os.getpid()
    signal.signal(signal.SIGTERM, _on_sigterm)
    # A shell starts background jobs with SIGINT ignored, and Python keeps
    # it so: a SIGINT sent to a background netpass then did nothing at all
    # (its migration went on).  netpass always stops, and undoes, on one.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    handlers = {"demo": cmd_demo, "doctor": cmd_doctor, "lab": cmd_lab, "agent": cmd_agent, "bench": cmd_bench,
                "migrate": cmd_migrate}
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
