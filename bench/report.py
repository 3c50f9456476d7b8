"""Merging workers' measurements, the printed tables, the JSON and the plot."""

from __future__ import annotations

import json
import os
import platform
from collections import Counter
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["comparison_table", "machine", "merge", "plot", "run_table", "summary", "write_json"]

PERCENTILES = (50, 95, 99)


def _percentiles(samples: list[float], points: list[float]) -> list[float]:
    """Linear-interpolated percentiles (numpy's default method), in pure Python."""
    values = sorted(samples)
    last = len(values) - 1
    out = []
    for p in points:
        rank = p / 100 * last
        low = int(rank)
        high = min(low + 1, last)
        out.append(values[low] + (values[high] - values[low]) * (rank - low))
    return out


def summary(samples: list[float]) -> dict[str, float | int | None]:
    if not samples:
        return {"count": 0, "p50": None, "p95": None, "p99": None, "max": None}
    out: dict[str, float | int | None] = {"count": len(samples)}
    for p, value in zip(PERCENTILES, _percentiles(samples, list(PERCENTILES)), strict=True):
        out[f"p{p}"] = round(value, 3)
    out["max"] = round(max(samples), 3)
    return out


def _curve(samples: list[float]) -> list[list[float]]:
    """Latency at percentiles from 0 to 99.99, for the plot (small enough for JSON)."""
    if not samples:
        return []
    points = [0, 10, 25, 50, 75, 90, 95, 98, 99, 99.5, 99.9, 99.95, 99.99, 100]
    values = _percentiles(samples, points)
    return [[p, round(float(v), 3)] for p, v in zip(points, values, strict=True)]


def merge(
    name: str, core: str, workers: list[dict[str, Any]], settings: dict[str, Any]
) -> dict[str, Any]:
    """One run's result from its workers' raw measurements."""
    latencies: dict[str, list[float]] = {}
    pushes: list[float] = []
    ok: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    timeline: Counter[int] = Counter()
    totals = Counter[str]()
    setup_errors: list[str] = []
    for w in workers:
        if "fatal" in w:
            setup_errors.append(w["fatal"])
            continue
        for kind, values in w["latencies"].items():
            latencies.setdefault(kind, []).extend(values)
        pushes.extend(w["push_latencies"])
        ok.update(w["ok"])
        errors.update(w["errors"])
        timeline.update({int(k): v for k, v in w["timeline"].items()})
        for key in ("sent", "late_sends", "unanswered", "missing_pushes"):
            totals[key] += w[key]
        setup_errors.extend(w["setup_errors"])
    seconds = float(settings["duration"])
    all_ok = sum(ok.values())
    return {
        "name": name,
        "core": core,
        "settings": settings,
        "throughput": {
            "requests_per_s": round(all_ok / seconds, 1),
            "purchases_per_s": round(ok["purchase"] / seconds, 1),
            # Replies that arrived inside the window: below the two above when
            # an open loop offers more than the server completes (the rest
            # arrive during the drain, and their latency shows the backlog).
            "completed_in_window_per_s": round(
                sum(timeline.get(i, 0) for i in range(int(seconds))) / int(seconds or 1), 1
            ),
        },
        "requests": {
            kind: {**summary(latencies.get(kind, [])), "per_s": round(ok[kind] / seconds, 1)}
            for kind in sorted(set(latencies) | set(ok))
        },
        "all": summary([v for values in latencies.values() for v in values]),
        "push": {**summary(pushes), "missing": totals["missing_pushes"]},
        "errors": dict(errors),
        "sent": totals["sent"],
        "late_sends": totals["late_sends"],
        "unanswered": totals["unanswered"],
        "setup_errors": setup_errors[:20],
        "timeline": [timeline.get(i, 0) for i in range(int(seconds) + 1)],
        "curves": {
            **{kind: _curve(values) for kind, values in latencies.items()},
            "push": _curve(pushes),
        },
    }


def _ms(value: Any) -> str:
    return "-" if value is None else f"{value:.1f}"


def run_table(result: dict[str, Any]) -> Table:
    s = result["settings"]
    if s.get("pace"):
        mode = f"paced, a request per connection every {s['pace']:g} s"
    elif s.get("rate"):
        mode = f"open loop {s['rate']:.0f}/s"
    else:
        mode = f"closed loop depth {s['depth']}"
    title = (
        f"{result['name']}: {mode}, {s['connections']} connections, {s['users']} users"
        f"{', hot' if s.get('hot') else ''}, {s['duration']:.0f} s"
    )
    table = Table(title=title)
    for column in ("", "ok", "per s", "p50 ms", "p95 ms", "p99 ms", "max ms"):
        table.add_column(column, justify="right" if column else "left")
    rows = [
        *result["requests"].items(),
        ("all", {**result["all"], "per_s": result["throughput"]["requests_per_s"]}),
    ]
    for kind, r in rows:
        table.add_row(
            kind, str(r["count"]), f"{r['per_s']:.0f}",
            _ms(r["p50"]), _ms(r["p95"]), _ms(r["p99"]), _ms(r["max"]),
        )  # fmt: skip
    push = result["push"]
    table.add_row(
        "push", str(push["count"]), "", _ms(push["p50"]), _ms(push["p95"]), _ms(push["p99"]),
        _ms(push["max"]),
    )  # fmt: skip
    notes = []
    if result["errors"]:
        notes.append(
            "errors: " + ", ".join(f"{k} x{v}" for k, v in sorted(result["errors"].items()))
        )
    if result["unanswered"]:
        notes.append(f"unanswered: {result['unanswered']}")
    if push["missing"]:
        notes.append(f"pushes not seen: {push['missing']}")
    if result["late_sends"]:
        notes.append(f"sends >1 ms behind schedule: {result['late_sends']}")
    if result["setup_errors"]:
        notes.append("setup: " + "; ".join(result["setup_errors"][:3]))
    table.caption = " | ".join(notes) if notes else "no errors"
    return table


def comparison_table(base: dict[str, Any], other: dict[str, Any]) -> Table:
    table = Table(title=f"{base['name']} vs {other['name']}")
    for column in ("", base["name"], other["name"], "ratio"):
        table.add_column(column, justify="right" if column else "left")

    def row(label: str, a: float | None, b: float | None, higher_better: bool) -> None:
        ratio = "-"
        if a and b:
            ratio = f"{a / b:.2f}x" if higher_better else f"{b / a:.2f}x"
        table.add_row(label, _ms(a), _ms(b), ratio)

    row(
        "purchases/s",
        base["throughput"]["purchases_per_s"],
        other["throughput"]["purchases_per_s"],
        True,
    )
    row(
        "requests/s",
        base["throughput"]["requests_per_s"],
        other["throughput"]["requests_per_s"],
        True,
    )
    pa, pb = base["requests"].get("purchase", {}), other["requests"].get("purchase", {})
    for p in ("p50", "p95", "p99", "max"):
        row(f"purchase {p} ms", pa.get(p), pb.get(p), False)
    for p in ("p50", "p99"):
        row(f"push {p} ms", base["push"].get(p), other["push"].get(p), False)
    table.caption = "ratio: how many times better the first is (throughput up, latency down)"
    return table


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_bytes": memory,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average": list(os.getloadavg()),
    }


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1))


def plot(path: Path, runs: list[dict[str, Any]], console: Console) -> bool:
    """Latency by percentile per run (purchases and pushes); False if no matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import ScalarFormatter
    except ImportError:
        console.print("[yellow]matplotlib is not installed: no plot (pip install 'loadout[bench]')")
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=80)
    for ax, kind, title in (
        (axes[0], "purchase", "purchase reply"),
        (axes[1], "push", "inventory push"),
    ):
        for run in runs:
            curve = run["curves"].get(kind) or []
            if not curve:
                continue
            xs = [100 / (100 - p) if p < 100 else 1e5 for p, _ in curve]
            ax.plot(xs, [v for _, v in curve], marker=".", label=run["name"])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ticks = [1, 2, 10, 100, 1000, 10000]
        ax.set_xticks(ticks, ["p0", "p50", "p90", "p99", "p99.9", "p99.99"])
        ax.set_xlim(1, 1e4)
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.set_ylabel("latency (ms)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return True
