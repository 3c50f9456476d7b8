"""A Ray node hosting a shard dies (PROTOCOL.md §13, issue "resilience"):
shards are spread over the nodes of a real two-node Ray cluster on this
machine; under retrying load with keys the worker node is killed; the
gateway answers what was in flight, Ray starts the lost shard on the
surviving node, and every acknowledged change is there exactly once."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.chaos import ChaosServer, cluster_command, run_chaos

#: Ray declares a node dead after about period x threshold without an answer.
HEALTH = {"health_check_period_ms": 500, "health_check_failure_threshold": 4}


@pytest.fixture
def head_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A Ray head node, with Ray's token authentication on, as `ray start`
    has it (the token in Ray's default place, made if missing)."""
    ray_cli = Path(sys.executable).parent / "ray"
    subprocess.run([ray_cli, "get-auth-token", "--generate"], check=True, capture_output=True)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # before Ray is imported here
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False, "_system_config": HEALTH},
    )
    try:
        yield cluster
    finally:
        cluster.shutdown()


@pytest.fixture
def two_nodes(head_only: Any) -> tuple[Any, Any]:
    worker = head_only.add_node(num_cpus=1)
    head_only.wait_for_nodes()
    return head_only, worker


async def test_a_lost_node_loses_nothing_and_its_shard_serves_again(
    two_nodes: tuple[Any, Any], tmp_path: Path
) -> None:
    cluster, worker = two_nodes
    placed: list[dict[str, Any]] = []

    async def kill_node(server: ChaosServer) -> None:
        status = json.loads(await cluster_command(server, "status", "--json"))
        placed.append(status)
        await asyncio.to_thread(cluster.remove_node, worker, False)

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    report = await run_chaos(
        data_dir, users=8, rounds=1, spacing=4.0, log=print,
        faults=[("node", kill_node)],
        env={"RAY_ADDRESS": cluster.address, "RAY_AUTH_MODE": "token"},
    )  # fmt: skip
    print("recovery after the node's loss (s):", report.recovery)
    (before,) = placed
    assert len({s["node"] for s in before["shards"]}) == 2  # one shard on each node
    assert report.acknowledged > 50
    assert (report.lost, report.doubled, report.unexplained) == (0, 0, [])
    assert report.verify_exit == 0, report.verify_report


async def test_rebalance_spreads_shards_over_a_node_that_joined(
    head_only: Any, tmp_path: Path
) -> None:
    """Both shards start on the only node; a node joins; ``loadout cluster
    rebalance`` moves one shard there, live, losing nothing."""
    statuses: list[dict[str, Any]] = []

    async def join(server: ChaosServer) -> None:
        statuses.append(json.loads(await cluster_command(server, "status", "--json")))
        head_only.add_node(num_cpus=1)  # (Ray wants its main thread for this)
        head_only.wait_for_nodes()

    async def rebalance(server: ChaosServer) -> None:
        await cluster_command(server, "rebalance")
        statuses.append(json.loads(await cluster_command(server, "status", "--json")))

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    report = await run_chaos(
        data_dir, users=8, rounds=1, spacing=3.0, log=print,
        faults=[("join", join), ("rebalance", rebalance)],
        env={"RAY_ADDRESS": head_only.address, "RAY_AUTH_MODE": "token"},
    )  # fmt: skip
    before, after = statuses
    assert len({s["node"] for s in before["shards"]}) == 1
    assert len(after["nodes"]) == 2
    assert len({s["node"] for s in after["shards"]}) == 2  # one shard on each node
    assert sorted(s["partitions"] for s in after["shards"]) == [128, 128]
    assert report.acknowledged > 50
    assert (report.lost, report.doubled, report.unexplained) == (0, 0, [])
    assert report.verify_exit == 0, report.verify_report
