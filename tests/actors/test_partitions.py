"""The pure partition rules: the hash, the first map, and the plans for
scaling (``balance``) and spreading over nodes (``spread``)."""

from __future__ import annotations

import hashlib
from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from actors.partitions import PartitionMap, balance, initial_owners, partition_of, spread


def test_the_first_map_keeps_users_where_the_shard_hash_put_them() -> None:
    owners = initial_owners(256, 4)
    for user in (f"user-{i}" for i in range(500)):
        digest = hashlib.blake2b(user.encode(), digest_size=8).digest()
        assert owners[partition_of(user, 256)] == int.from_bytes(digest, "big") % 4


@given(
    st.integers(1, 300),
    st.lists(st.integers(0, 12), min_size=1, max_size=300),
    st.sets(st.integers(0, 15), min_size=1, max_size=10),
)
def test_balance_moves_the_fewest_partitions_to_an_even_spread(
    partitions: int, raw: list[int], wanted: set[int]
) -> None:
    owners = tuple(raw[p % len(raw)] for p in range(partitions))
    moves = balance(owners, wanted)
    after = [moves.get(p, s) for p, s in enumerate(owners)]
    load = Counter(after)
    assert set(load) <= wanted
    counts = [load.get(s, 0) for s in wanted]
    assert max(counts) - min(counts) <= 1
    assert all(owners[p] != s for p, s in moves.items())  # no move to where it is
    # The fewest: a partition moves only off a shard that leaves or has too many.
    base = partitions // len(wanted)
    needed = sum(c for s, c in Counter(owners).items() if s not in wanted) + sum(
        max(0, c - (base + 1)) for s, c in Counter(owners).items() if s in wanted
    )
    assert len(moves) <= needed + len(wanted)


def test_scaling_two_to_four_to_three_moves_what_it_must() -> None:
    two = initial_owners(256, 2)
    four = balance(two, [0, 1, 2, 3])
    assert len(four) == 128
    after = tuple(four.get(p, s) for p, s in enumerate(two))
    three = balance(after, [0, 1, 2])
    assert len(three) == 64 and set(three.values()) <= {0, 1, 2}
    assert PartitionMap(2, after).load() == Counter({0: 64, 1: 64, 2: 64, 3: 64})


def test_spread_replaces_shards_on_crowded_or_dead_nodes() -> None:
    # Four shards on node a; b joins: two move to b.
    plan = spread({0: "a", 1: "a", 2: "a", 3: "a"}, ["a", "b"])
    assert len(plan) == 2 and {node for _, node in plan} == {"b"}
    # A shard on a dead node goes to a live one; balanced nodes stay.
    assert spread({0: "a", 1: "b", 2: "gone"}, ["a", "b"]) in ([(2, "a")], [(2, "b")])
    assert spread({0: "a", 1: "b"}, ["a", "b"]) == []
