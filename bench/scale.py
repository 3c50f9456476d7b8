"""The scale figures of a run (BENCHMARKS.md, "Scale"): connections opened,
the server's memory before and with them open (so memory per connection),
its CPU during the measured window, the load generators' own figures, and
the push latency seen by service watchers (``--watchers``)."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from bench.probe import ServerProbe, server_connections
from bench.report import summary

__all__ = ["ServerWatch", "scale", "scale_table"]

MB = 1024 * 1024


class ServerWatch:
    """Samples of a server the bench started, at the phases of a run:
    ``before`` (users funded, no load-generator connection yet), ``open``
    (every connection open, before the load), ``from`` and ``to`` (the
    measured window)."""

    def __init__(self, pid: int, http_port: int) -> None:
        self.probe = ServerProbe(pid)
        self.http_port = http_port
        self.counted: dict[str, int | None] = {}

    def phase(self, name: str) -> None:
        self.probe.mark(name)
        if name in ("before", "open"):
            self.counted[name] = server_connections(self.http_port)


def scale(workers: list[dict[str, Any]], watch: ServerWatch | None) -> dict[str, Any]:
    live = [w for w in workers if "fatal" not in w]
    watch_latencies = [v for w in live for v in w["watch_latencies"]]
    after_reply = [v for w in live for v in w["watch_after_reply"]]
    wall = max((w["wall_seconds"] for w in live), default=0.0)
    connected = sum(w["connected"] for w in live)
    out: dict[str, Any] = {
        "connections": {
            "established": connected,
            "failed": sum(w["connect_failures"] for w in live),
            "seconds_to_open": round(max((w["connect_seconds"] for w in live), default=0.0), 2),
        },
        "client": {
            "processes": len(workers),
            "cpu_percent": round(100 * sum(w["cpu_seconds"] for w in live) / wall, 1)
            if wall
            else None,
            "rss_bytes": sum(w["rss_bytes"] for w in live),
        },
        "watch": {
            **summary(watch_latencies),
            "after_reply": summary(after_reply),
            "missing": sum(w["missing_watch_pushes"] for w in live),
        },
    }
    if watch is not None:
        out["server"] = _server(watch, connected)
        out["connections"]["counted_by_server"] = watch.counted.get("open")
    return out


def _server(watch: ServerWatch, connected: int) -> dict[str, Any]:
    marks = watch.probe.marks
    before, opened, end = marks.get("before"), marks.get("open"), marks.get("to")
    out: dict[str, Any] = {"cpu": watch.probe.cpu_between("from", "to")}
    for name, sample in (("before", before), ("open", opened), ("end", end)):
        if sample is not None:
            out[f"rss_{name}"] = sample.rss
            out[f"gateway_rss_{name}"] = sample.gateway_rss
            out[f"processes_{name}"] = sample.processes
    counted = watch.counted.get("open")
    connections = counted if counted is not None else connected
    connections -= watch.counted.get("before") or 0
    if before is not None and opened is not None and connections > 0:
        out["per_connection_bytes"] = round((opened.rss - before.rss) / connections)
        out["gateway_per_connection_bytes"] = round(
            (opened.gateway_rss - before.gateway_rss) / connections
        )
    return out


def _mb(value: Any) -> str:
    return "-" if value is None else f"{value / MB:,.1f} MiB"


def _ms(value: Any) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def scale_table(result: dict[str, Any]) -> Table:
    s = result["scale"]
    table = Table(title=f"{result['name']}: connections, memory, CPU")
    table.add_column("")
    table.add_column("", justify="right")
    c = s["connections"]
    table.add_row("connections open", f"{c['established']:,} ({c['failed']:,} failed)")
    if c.get("counted_by_server") is not None:
        table.add_row("  counted by the server", f"{c['counted_by_server']:,}")
    table.add_row("  time to open them", f"{c['seconds_to_open']:.1f} s")
    server = s.get("server")
    if server:
        table.add_row("server RSS before / open / end", " / ".join(
            _mb(server.get(f"rss_{k}")) for k in ("before", "open", "end")))  # fmt: skip
        table.add_row("gateway RSS before / open / end", " / ".join(
            _mb(server.get(f"gateway_rss_{k}")) for k in ("before", "open", "end")))  # fmt: skip
        per = server.get("per_connection_bytes")
        gateway = server.get("gateway_per_connection_bytes")
        if per is not None:
            table.add_row("per connection: server / gateway", f"{per / 1024:.1f} / "
                          f"{gateway / 1024:.1f} KiB")  # fmt: skip
        cpu = server["cpu"]
        if cpu:
            parts = ", ".join(f"{k} {v:.0f}%" for k, v in list(cpu["by_process"].items())[:4])
            table.add_row("server CPU (measured window)", f"{cpu['percent']:.0f}% ({parts})")
    client = s["client"]
    cpu_text = "-" if client["cpu_percent"] is None else f"{client['cpu_percent']:.0f}%"
    table.add_row(f"load generators ({client['processes']})",
                  f"CPU {cpu_text}, RSS {_mb(client['rss_bytes'])}")  # fmt: skip
    w = s["watch"]
    if w["count"] or w["missing"]:
        table.add_row("watcher push p50 / p99 / max", " / ".join(
            _ms(w[k]) for k in ("p50", "p99", "max")) + f" ({w['count']:,} pushes)")  # fmt: skip
        a = w["after_reply"]
        table.add_row("  after the reply p50 / p99", f"{_ms(a['p50'])} / {_ms(a['p99'])}")
        if w["missing"]:
            table.add_row("  pushes not seen", f"{w['missing']:,}")
    return table
