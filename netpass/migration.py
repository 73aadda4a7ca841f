"""Drive one QEMU live migration over QMP and time its switchover."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import MigrationFailed, NetpassError
from .qmp import Event, Monitor
from .watch import AtPreSwitchover, Completed, Fact, Failed, Stopped, Watch

log = logging.getLogger(__name__)

ProgressFn = Callable[[dict[str, Any]], None]
HookFn = Callable[[], Awaitable[None]]


@dataclass
class MigrationOptions:
    uri: str
    downtime_limit_ms: int | None = None
    max_bandwidth: int | None = None
    switchover_pause_ms: int = 0
    timeout_s: float = 600.0
    resume_timeout_s: float = 60.0
    cancel_at_pre_switchover: bool = False
    # A management layer stopping the VM itself, mid-migration, once the RAM
    # left is at most this share of the total; it then resumes the destination.
    stop_at_remaining: float | None = None


@dataclass
class MigrationResult:
    status: str = "none"
    downtime_ms: int | None = None
    total_time_ms: int | None = None
    setup_time_ms: int | None = None
    ram: dict[str, Any] = field(default_factory=dict)
    src_stop_t: float | None = None
    completed_t: float | None = None
    dst_resume_t: float | None = None
    events: list[tuple[float, str, str]] = field(default_factory=list)
    dst_leftovers: list[str] = field(default_factory=list)
    src_leftovers: list[str] = field(default_factory=list)
    metrics_before: str = ""
    metrics_after: str = ""
    burst_sent: int = 0
    burst_end_t: float | None = None


def progress_line(info: dict[str, Any]) -> dict[str, Any]:
    """Pick what an operator wants to see from a ``query-migrate`` answer."""
    ram = info.get("ram", {})
    return {
        "status": info.get("status"),
        "transferred_mib": round(ram.get("transferred", 0) / 2**20, 1),
        "remaining_mib": round(ram.get("remaining", 0) / 2**20, 1),
        "total_mib": round(ram.get("total", 0) / 2**20, 1),
        "dirty_pages_rate": ram.get("dirty-pages-rate", 0),
        "pass": ram.get("dirty-sync-count", 0),
        "expected_downtime_ms": info.get("expected-downtime"),
    }


async def migrate(src: Monitor, dst: Monitor | None, opts: MigrationOptions,
                  progress: ProgressFn | None = None,
                  before_continue: HookFn | None = None,
                  on_stop: HookFn | None = None) -> MigrationResult:
    """Run the migration from ``src``; watch ``dst`` for its RESUME.

    Returns when the source reports ``completed`` and the destination runs.
    Raises :class:`MigrationFailed` when QEMU reports failure or cancel.
    """
    res = MigrationResult()
    await _configure(src, opts)
    dst_resumed = asyncio.Event()
    dst_task = asyncio.create_task(_watch_dst(dst, res, dst_resumed)) if dst is not None else None
    watch = Watch()

    async def act(facts: list[Fact], info: dict[str, Any] | None = None) -> None:
        res.status = watch.status
        for fact in facts:
            await _on_fact(src, fact, info, opts, res, before_continue, on_stop)

    try:
        await src.execute("migrate", {"uri": opts.uri})
        deadline = time.monotonic() + opts.timeout_s
        next_poll = 0.0
        stopped_by_us = False
        while not watch.completed:
            if time.monotonic() > deadline:
                await src.execute("migrate_cancel")
                raise MigrationFailed(f"migration did not finish within {opts.timeout_s:.0f} s; cancelled")
            ev: Event | None = await src.next_event(0.05)
            if ev is not None:
                res.events.append((ev.received, "src", ev.name + ":" + str(ev.data.get("status", ""))))
                await act(watch.event(ev.name, ev.data, ev.emitted))
                continue
            if opts.stop_at_remaining is not None and not stopped_by_us:
                info = await src.execute("query-migrate")
                await act(watch.polled(info), info)
                ram = info.get("ram", {})
                if info.get("status") == "active" and ram.get("total") and \
                        ram.get("remaining", 0) <= opts.stop_at_remaining * ram["total"]:
                    await src.execute("stop")
                    stopped_by_us = True
            if progress is not None and time.monotonic() >= next_poll:
                next_poll = time.monotonic() + 0.5
                info = await src.execute("query-migrate")
                progress(progress_line(info))
                await act(watch.polled(info), info)
        await _finish(src, dst if stopped_by_us else None, opts, res, progress)
        if dst_task is not None:
            try:
                async with asyncio.timeout(opts.resume_timeout_s):
                    await dst_resumed.wait()
            except TimeoutError as exc:
                raise MigrationFailed("the source completed but the destination did not resume "
                                      f"within {opts.resume_timeout_s:.0f} s") from exc
        return res
    finally:
        if dst_task is not None and not dst_task.done():
            await stop_task(dst_task)


async def _finish(src: Monitor, paused_dst: Monitor | None, opts: MigrationOptions, res: MigrationResult,
                  progress: ProgressFn | None) -> None:
    """The migration completed: QEMU's own figures into ``res``; a VM that
    crossed paused (``paused_dst``) is continued on the destination."""
    info = await src.execute("query-migrate")
    res.downtime_ms = info.get("downtime")
    res.total_time_ms = info.get("total-time")
    res.setup_time_ms = info.get("setup-time")
    res.ram = dict(info.get("ram", {}))
    if progress is not None:
        progress(progress_line(info))
    if paused_dst is not None:
        await _cont_when_paused(paused_dst, opts.resume_timeout_s)


async def _configure(src: Monitor, opts: MigrationOptions) -> None:
    caps = [{"capability": "events", "state": True}]
    if opts.switchover_pause_ms > 0 or opts.cancel_at_pre_switchover:
        caps.append({"capability": "pause-before-switchover", "state": True})
    await src.execute("migrate-set-capabilities", {"capabilities": caps})
    params: dict[str, Any] = {}
    if opts.downtime_limit_ms is not None:
        params["downtime-limit"] = opts.downtime_limit_ms
    if opts.max_bandwidth is not None:
        params["max-bandwidth"] = opts.max_bandwidth
    if params:
        await src.execute("migrate-set-parameters", params)


async def _watch_dst(dst: Monitor, res: MigrationResult, resumed: asyncio.Event) -> None:
    """Until the destination's RESUME."""
    while True:
        ev = await dst.next_event(1.0)
        if ev is None:
            continue
        res.events.append((ev.received, "dst", ev.name))
        if ev.name == "RESUME":
            res.dst_resume_t = ev.emitted
            resumed.set()
            return


async def _on_fact(src: Monitor, fact: Fact, info: dict[str, Any] | None, opts: MigrationOptions,
                   res: MigrationResult, before_continue: HookFn | None, on_stop: HookFn | None) -> None:
    """Act on one thing the watch learned: the stop's time, the pause before
    the switchover (wait, then continue or cancel), the end."""
    if isinstance(fact, Stopped):
        if fact.emitted is not None and res.src_stop_t is None:
            res.src_stop_t = fact.emitted  # the STOP event's own time
        if fact.first and on_stop is not None:
            await on_stop()
    elif isinstance(fact, AtPreSwitchover):
        if opts.cancel_at_pre_switchover:
            await asyncio.sleep(opts.switchover_pause_ms / 1000)
            await src.execute("migrate_cancel")
        elif opts.switchover_pause_ms > 0:
            if before_continue is not None:
                await before_continue()
            await asyncio.sleep(opts.switchover_pause_ms / 1000)
            await src.execute("migrate-continue", {"state": "pre-switchover"})
    elif isinstance(fact, Completed):
        res.completed_t = fact.emitted
    elif isinstance(fact, Failed):
        if info is None:
            info = await src.execute("query-migrate")
        raise MigrationFailed(f"migration {fact.status}: {info.get('error-desc', 'no reason given')}")


async def stop_task(task: asyncio.Task[Any]) -> None:
    """Cancel a helper task and wait for it to end, its failure ignored
    (NetpassError); a cancel of the caller itself that lands meanwhile is
    not swallowed with the helper's."""
    me = asyncio.current_task()
    before = me.cancelling() if me is not None else 0
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        if me is not None and me.cancelling() > before:
            raise
    except NetpassError:
        pass


async def _cont_when_paused(dst: Monitor, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = await dst.status()
        if status == "paused":
            await dst.execute("cont")
            return
        if status == "running":
            return
        await asyncio.sleep(0.002)
