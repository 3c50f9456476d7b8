"""The distributed form: two gateway processes share one set of shard actors
(one Ray cluster, one PostgreSQL, one Redis); a change made through one
gateway is pushed to the user's connections on the other."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.support import Client, ServerProcess, fund, new_user
from tests.e2e.support import two_gateways as start_two


@pytest.fixture
def two_gateways(ray_address: str, tmp_path: Path) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    with start_two(tmp_path, ray_address) as (first, second, _):
        yield first, second


async def test_pushes_and_serial_order_across_gateways(
    two_gateways: tuple[ServerProcess, ServerProcess],
) -> None:
    a, b = two_gateways
    user = new_user()
    await fund(a, user, 10 * 5)
    on_a = await Client.open(a, user)
    on_b = await Client.open(b, user, binary=True)
    try:
        bought = await on_b.request(
            {"type": "purchase", "key": "x", "sku": "plat.booster.xp", "price": 5}
        )
        push = await on_a.push("inventory", version=bought["version"])
        assert push["balance"] == 45
        pending = []
        for n in range(20):  # both gateways, one user, funds for 9 more
            c = on_a if n % 2 else on_b
            buy = {"type": "purchase", "key": f"k{n}", "sku": "plat.booster.xp", "price": 5}
            pending.append((c, await c.send(buy)))
        replies = [await c.reply(rid) for c, rid in pending]
        assert sum(r["type"] == "purchased" for r in replies) == 9
        state_a = await on_a.request({"type": "state"})
        state_b = await on_b.request({"type": "state"})
        assert state_a["balance"] == state_b["balance"] == 0
        assert state_a["version"] == state_b["version"]
    finally:
        await on_a.close()
        await on_b.close()


@pytest.mark.parametrize(
    ("setting", "value"),
    [("LOADOUT_SECRET", "another-secret-" + "y" * 40), ("LOADOUT_PARTITIONS", "128")],
)
def test_a_gateway_that_disagrees_with_the_cluster_refuses_to_start(
    two_gateways: tuple[ServerProcess, ServerProcess], tmp_path: Path, setting: str, value: str
) -> None:
    """PROTOCOL.md §13: the settings every gateway must share are checked at
    start, and the one that differs is named."""
    first, _ = two_gateways
    services = json.loads((first.data_dir / "run" / "services.json").read_text())
    odd = ServerProcess(
        tmp_path / "odd",
        first.ray_address,
        env={
            "LOADOUT_DATABASE_URL": services["database_url"],
            "LOADOUT_REDIS_URL": services["redis_url"],
            setting: value,
        },
    )
    with pytest.raises(RuntimeError, match="server exited 1") as refused:
        odd.start(namespace=first.namespace)
    assert setting in str(refused.value)
    assert "Traceback" not in str(refused.value)
