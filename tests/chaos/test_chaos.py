"""One short round of the chaos scenario (bench/chaos.py): retrying clients
with keys while a shard, Redis, PostgreSQL and the whole server are killed
and the server is stopped with SIGTERM; then every acknowledged change is
there exactly once, every refused one absent, and ``loadout verify`` finds
the database consistent.  ``python -m bench.chaos --minutes N`` is the soak."""

from __future__ import annotations

from pathlib import Path

from bench.chaos import FAULTS, run_chaos


async def test_nothing_acknowledged_is_lost_or_doubled_whatever_dies(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    report = await run_chaos(data_dir, users=8, rounds=1, spacing=5.0, log=lambda line: None)
    assert report.acknowledged > 100
    assert (report.lost, report.doubled, report.unexplained) == (0, 0, [])
    assert set(report.recovery) == {name for name, _ in FAULTS}  # each fault healed
    assert report.verify_exit == 0, report.verify_report
