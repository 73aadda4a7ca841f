"""Prometheus metrics of the agent: the only module that knows them.

Served by ``netpass agent --metrics-listen HOST:PORT`` (prometheus_client's
own HTTP server, in a thread of the agent).
"""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from .channel import parse_hostport
from .errors import UsageError

log = logging.getLogger(__name__)


class AgentMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.sessions = Counter("netpass_sessions", "Sessions ended, by outcome", ["outcome"], registry=r)
        self.active = Gauge("netpass_sessions_active", "Sessions in progress", registry=r)
        self.frames_received = Counter("netpass_frames_received", "Frames received from sources "
                                       "(captured on the source hosts)", registry=r)
        self.bytes_received = Counter("netpass_bytes_received", "Bytes of frames received from sources",
                                      registry=r)
        self.frames_replayed = Counter("netpass_frames_replayed", "Frames replayed into destination VMs",
                                       registry=r)
        self.duplicates = Counter("netpass_duplicates_suppressed", "Frames not replayed because the "
                                  "network delivered them to the destination too", registry=r)
        self.dropped = Counter("netpass_frames_dropped", "Frames dropped, by reason", ["reason"], registry=r)
        self.held = Counter("netpass_frames_held", "Frames held by strict ordering, by direction",
                            ["direction"], registry=r)
        self.hold_seconds = Histogram("netpass_hold_seconds", "Destination resume to the end of the "
                                      "strict-ordering hold", registry=r,
                                      buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10))
        self.followed = Counter("netpass_followed_migrations", "Migrations libvirt drove that this agent "
                                "followed (transparent mode), by role and outcome", ["role", "outcome"],
                                registry=r)
        self.replay_delay = Histogram("netpass_replay_delay_seconds", "Destination resume to the last "
                                      "replayed frame read by the VM", registry=r,
                                      buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5))

    def serve(self, listen: str) -> None:
        host, port = parse_hostport(listen)
        try:
            start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise UsageError(f"cannot serve metrics on {listen}: {exc.strerror}") from exc
        log.info("metrics on http://%s:%d/metrics", host, port)

    def batch(self, frames: int, nbytes: int) -> None:
        self.frames_received.inc(frames)
        self.bytes_received.inc(nbytes)

    def session_ended(self, report: dict[str, Any]) -> None:
        """Count a finished session from its report."""
        self.sessions.labels(outcome=str(report.get("state", "failed"))).inc()
        for nic in report.get("nics", []):
            self.frames_replayed.inc(int(nic.get("replayed", 0)))
            self.duplicates.inc(int(nic.get("duplicates_suppressed", 0)))
            for reason, n in (nic.get("dropped") or {}).items():
                self.dropped.labels(reason=reason).inc(int(n))
        if report.get("strict_ordering"):
            self.held.labels(direction="tx").inc(int(report.get("held_tx") or 0))
            self.held.labels(direction="rx").inc(int(report.get("held_rx") or 0))
            if report.get("hold_ms") is not None:
                self.hold_seconds.observe(float(report["hold_ms"]) / 1000)
        if report.get("replay_delay_ms") is not None:
            self.replay_delay.observe(float(report["replay_delay_ms"]) / 1000)
