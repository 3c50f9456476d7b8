"""``python -m bench.cold`` end to end with a handful of users: it proves the
measurement runs (passivation, then a cold and a warm request per user); it
asserts no timing (BENCHMARKS.md has the figures)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_cold_activation_is_measured_for_every_user(tmp_path: Path) -> None:
    out = tmp_path / "cold.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOADOUT_", "RAY_ADDRESS"))}
    env.update(PYTHONPATH=str(REPO), RAY_USAGE_STATS_ENABLED="0")
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.cold", "--users", "6", "--idle-seconds", "1",
         "--out", str(out)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its server is in its process group: one kill stops all
    )  # fmt: skip
    try:
        output, _ = process.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail("bench.cold did not finish:\n" + output.decode(errors="replace")[-4000:])
    assert process.returncode == 0, output.decode(errors="replace")[-4000:]
    result = json.loads(out.read_text())
    assert result["users"] == 6 and result["idle_seconds"] == 1
    for name in ("cold_ms", "warm_ms", "cold_minus_warm_ms"):
        assert result[name]["count"] == 6, result
        assert result[name]["p50"] is not None
    assert result["cold_ms"]["p50"] > 0 and result["warm_ms"]["p50"] > 0
