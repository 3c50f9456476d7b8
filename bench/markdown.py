"""Markdown tables of ``loadout bench`` results, for BENCHMARKS.md.

python -m bench.markdown bench-results/*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["tables"]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _population(s: dict[str, Any]) -> str:
    if not s["hot"]:
        return ", uniform"
    return f", hot ({s['hot_users']} hot users get 50% of purchases)"


def tables(document: dict[str, Any]) -> str:
    runs = document["runs"]
    s = runs[0]["settings"]
    mode = (
        f"open loop, {s['rate']:.0f} requests/s offered"
        if s["rate"]
        else (f"closed loop, depth {s['depth']}")
    )
    lines = [
        f"{mode}; {s['connections']} connections, {s['users']} users"
        f"{_population(s)}"
        f"; {s['duration']:.0f} s measured after {s['warmup']:.0f} s warm-up;"
        f" load average at the end {document['machine']['load_average'][0]:.2f}",
        "",
        "| core | request | ok/s | p50 ms | p95 ms | p99 ms | max ms | errors |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for run in runs:
        errors = ", ".join(f"{k} x{v}" for k, v in sorted(run["errors"].items())) or "none"
        rows = [
            *run["requests"].items(),
            ("all", {**run["all"], "per_s": run["throughput"]["requests_per_s"]}),
        ]
        for kind, r in rows:
            lines.append(
                f"| {run['name']} | {kind} | {r['per_s']:.0f} | {_ms(r['p50'])} | {_ms(r['p95'])}"
                f" | {_ms(r['p99'])} | {_ms(r['max'])} | {errors if kind == 'all' else ''} |"
            )
        p = run["push"]
        lines.append(
            f"| {run['name']} | push | - | {_ms(p['p50'])} | {_ms(p['p95'])} | {_ms(p['p99'])}"
            f" | {_ms(p['max'])} | {p['missing']} not seen |"
        )
    for run in runs:
        done = run["throughput"].get("completed_in_window_per_s")
        arrived = "" if done is None else f"{done:.0f} replies/s arrived inside the window; "
        lines.append(
            f"\n{run['name']}: {arrived}{run['unanswered']} unanswered after a 10 s drain,"
            f" {run['late_sends']} sends over 1 ms behind schedule."
        )
    if len(runs) == 2:
        a, b = (r["throughput"]["purchases_per_s"] for r in runs)
        pa, pb = (r["requests"]["purchase"]["p99"] for r in runs)
        lines += ["", f"Purchases/s: {a:.0f} vs {b:.0f} (**{a / b:.2f}x**);"
                  f" purchase p99 {pa:.1f} ms vs {pb:.1f} ms."]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    for name in sys.argv[1:]:
        print(f"#### {Path(name).stem}\n")
        print(tables(json.loads(Path(name).read_text())))
        print()


if __name__ == "__main__":
    main()
