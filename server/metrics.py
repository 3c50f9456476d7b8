"""Prometheus metrics of a gateway process, served at ``GET /metrics``."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)


class Metrics:
    """One registry per gateway (so tests can build several in a process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.connections = Gauge(
            "loadout_connections", "Open WebSocket connections.", registry=self.registry
        )
        self.requests = Counter(
            "loadout_requests", "Requests answered, by type and outcome (ok or error code).",
            ["type", "outcome"], registry=self.registry,
        )  # fmt: skip
        self.latency = Histogram(
            "loadout_request_seconds", "From frame received to reply queued, by type.",
            ["type"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.pushes = Counter(
            "loadout_pushes", "Pushes queued to connections.", registry=self.registry
        )
        self.batches = Histogram(
            "loadout_shard_batch_size", "Requests per shard call.",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000),
            registry=self.registry,
        )  # fmt: skip
        self.restarts = Counter(
            "loadout_dependency_restarts", "Embedded services started again after they died.",
            ["dependency"], registry=self.registry,
        )  # fmt: skip
        self.dependency_up = Gauge(
            "loadout_dependency_up", "1 when a dependency answers, 0 when it does not.",
            ["dependency"], registry=self.registry,
        )  # fmt: skip
        self.disconnects = Counter(
            "loadout_disconnects", "Connections closed by the server, by reason.",
            ["reason"], registry=self.registry,
        )  # fmt: skip
        self.refused = Counter(
            "loadout_refused_handshakes", "WebSocket handshakes refused by a limit, by limit.",
            ["limit"], registry=self.registry,
        )  # fmt: skip

        self.pauses = Histogram(
            "loadout_partition_pause_seconds",
            "How long requests of a moving partition waited at this gateway for its new shard.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5), registry=self.registry,
        )  # fmt: skip
        self.map_epoch = Gauge(
            "loadout_map_epoch", "The partition map's epoch this gateway routes by.",
            registry=self.registry,
        )  # fmt: skip
        shard = ["shard", "node"]
        self.shard_users = Gauge(
            "loadout_shard_resident_users", "Users in a shard's memory.", shard,
            registry=self.registry,
        )  # fmt: skip
        self.shard_partitions = Gauge(
            "loadout_shard_partitions", "Partitions a shard serves.", shard,
            registry=self.registry,
        )  # fmt: skip
        self.shard_flushes = Gauge(
            "loadout_shard_flushes", "Journal flushes since the shard started.", shard,
            registry=self.registry,
        )  # fmt: skip
        self.shard_flush_p99 = Gauge(
            "loadout_shard_flush_p99_seconds", "p99 of a shard's last 512 journal flushes.",
            shard, registry=self.registry,
        )  # fmt: skip
        self.shard_batches = Gauge(
            "loadout_shard_batches", "Batches this gateway sent to a shard.", ["shard"],
            registry=self.registry,
        )  # fmt: skip

        self.fulfillment = Counter(
            "loadout_fulfillment_attempts", "Fulfillment attempts by delivery and outcome"
            " (done, retry, failed).", ["delivery", "outcome"], registry=self.registry,
        )  # fmt: skip
        self.webhooks = Counter(
            "loadout_webhooks", "Webhook deliveries by source and outcome.",
            ["source", "outcome"], registry=self.registry,
        )  # fmt: skip

        # Children by label values: ``labels()`` costs more than the increment.
        self._counts: dict[tuple[str, str], Any] = {}
        self._latencies: dict[str, Any] = {}

    def count(self, kind: str, outcome: str) -> None:
        """One request of ``kind`` answered with ``outcome`` (ok or an error code)."""
        child = self._counts.get((kind, outcome))
        if child is None:
            child = self._counts[kind, outcome] = self.requests.labels(kind, outcome)
        child.inc()

    def timed(self, kind: str, seconds: float) -> None:
        child = self._latencies.get(kind)
        if child is None:
            child = self._latencies[kind] = self.latency.labels(kind)
        child.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
