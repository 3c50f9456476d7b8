"""``loadout bench`` end to end, briefly: both cores, a few connections, a few
seconds.  It proves the benchmark runs; it asserts no timing (BENCHMARKS.md
has the figures)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _bench(tmp_path: Path, *args: str, timeout: float = 150) -> dict:  # type: ignore[type-arg]
    out = tmp_path / "result.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOADOUT_", "RAY_ADDRESS"))}
    env.update(PYTHONPATH=str(REPO), RAY_USAGE_STATS_ENABLED="0", COLUMNS="120")
    process = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "bench", *args, "--out", str(out), "--no-plot"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its servers are in its process group: one kill stops all
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail("loadout bench did not finish:\n" + output.decode(errors="replace")[-4000:])
    text = output.decode(errors="replace")
    assert process.returncode == 0, text[-4000:]
    document: dict = json.loads(out.read_text())  # type: ignore[type-arg]
    return document


def _assert_clean(run: dict) -> None:  # type: ignore[type-arg]
    purchases = run["requests"]["purchase"]
    assert purchases["count"] > 0, run
    assert "purchases_per_s" in run["throughput"]  # reported; its value is not judged here
    assert run["errors"] == {}, run["errors"]
    assert run["setup_errors"] == []
    assert run["unanswered"] == 0
    assert {"equip", "unequip", "state"} <= set(run["requests"]), run["requests"].keys()
    assert run["push"]["count"] > 0, "the watched users saw no inventory push"


def test_bench_actor_core_and_lock_baseline_side_by_side(tmp_path: Path) -> None:
    document = _bench(
        tmp_path, "--baseline", "lock", "--hot", "--connections", "4", "--users", "40",
        "--depth", "2", "--duration", "3", "--warmup", "1", "--push-sample", "0.5",
    )  # fmt: skip
    runs = document["runs"]
    assert [r["core"] for r in runs] == ["actors", "lock"]
    for run in runs:
        _assert_clean(run)
        assert run["settings"]["hot_users"] == 1
    assert "purchase_throughput_ratio" in document  # reported, not judged
    assert document["machine"]["cpus"] >= 1
