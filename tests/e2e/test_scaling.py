"""Scaling live (PROTOCOL.md §13): under retrying load with keys, the shard
count goes 2 -> 4 -> 3 -> 2 with ``loadout cluster scale``; every
acknowledged change is there exactly once, every refused one absent, and
``loadout verify`` finds the database consistent."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from pathlib import Path

from bench.chaos import ChaosServer, cluster_command, run_chaos, scaling


async def test_scaling_live_loses_and_doubles_nothing(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    seen: list[str] = []
    statuses: list[dict[str, object]] = []
    metrics: list[str] = []

    async def status(server: ChaosServer) -> None:
        statuses.append(json.loads(await cluster_command(server, "status", "--json")))
        # The gateway's /metrics follows the shards (within its 10 s poll).
        for _ in range(40):
            text = await asyncio.to_thread(_metrics, server)
            if len(re.findall(r"^loadout_shard_partitions\{", text, re.M)) == 3:
                break
            await asyncio.sleep(0.5)
        metrics.append(text)

    faults = [*scaling([4, 3], seen), ("status", status), *scaling([2], seen)]
    report = await run_chaos(
        data_dir, users=8, rounds=1, spacing=3.0, log=lambda line: None, faults=faults
    )
    assert report.acknowledged > 100
    assert (report.lost, report.doubled, report.unexplained) == (0, 0, [])
    assert report.verify_exit == 0, report.verify_report
    assert len(seen) == 3
    moved = [int(m.group(1)) for out in seen if (m := re.search(r"moved (\d+) partitions", out))]
    # 2 -> 4: half the partitions; 4 -> 3: the fourth shard's; 3 -> 2: the third's.
    assert moved[:2] == [128, 64] and moved[2] in (85, 86), seen
    (after_three,) = statuses
    shards = after_three["shards"]
    assert isinstance(shards, list) and len(shards) == 3
    assert sorted(s["partitions"] for s in shards) == [85, 85, 86]
    assert all(s["answering"] for s in shards)
    gateways = after_three["gateways"]
    assert isinstance(gateways, list) and len(gateways) == 1 and gateways[0]["pid"] > 0
    (text,) = metrics
    partitions = re.findall(
        r'^loadout_shard_partitions\{node="(\w+)",shard="(\d+)"\} (\S+)', text, re.M
    )
    assert sorted(float(n) for _, _, n in partitions) == [85, 85, 86], text
    paused = re.search(r"^loadout_partition_pause_seconds_count (\S+)", text, re.M)
    assert paused is not None and float(paused.group(1)) > 0  # requests followed the moves


def _metrics(server: ChaosServer) -> str:
    url = f"http://127.0.0.1:{server.http_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()
