"""The lock baseline's tables, created by the baseline itself when it starts.

They belong to the benchmark, not to the product: ``python -m
bench.lock_server`` creates them in the database of the server it runs (the
bench's temporary one), so a production database migrated by ``loadout
serve`` never gets them.  Every statement is ``IF NOT EXISTS``, so a
restart, or a database that already has them, changes nothing.

The tables follow battlebucks-design.md §1 and §4.3: a wallet row per user
that every write takes ``FOR UPDATE``, a purchase row per ``transaction_id``
(its idempotency key), an inventory row per user and item, and a ledger.
"""

from __future__ import annotations

import asyncpg

__all__ = ["create_lock_tables"]

#: Held while creating them: ``IF NOT EXISTS`` does not stop two baselines
#: starting at once on one database from both trying to create a table.
_LOCK = 0x6C6F636B5F746273  # b"lock_tbs"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS lock_wallets (
    user_id     text PRIMARY KEY,
    balance     bigint NOT NULL CHECK (balance >= 0),
    version     bigint NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS lock_purchases (
    id              bigserial PRIMARY KEY,
    user_id         text NOT NULL,
    transaction_id  text NOT NULL,
    sku             text NOT NULL,
    quantity        integer NOT NULL,
    unit_price      bigint NOT NULL,
    total           bigint NOT NULL,
    balance         bigint NOT NULL,
    version         bigint NOT NULL,
    status          text NOT NULL DEFAULT 'completed',
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (user_id, transaction_id)
);
CREATE TABLE IF NOT EXISTS lock_inventory (
    user_id     text NOT NULL,
    sku         text NOT NULL,
    quantity    integer NOT NULL CHECK (quantity >= 0),
    acquired_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, sku)
);
CREATE TABLE IF NOT EXISTS lock_ledger (
    id          bigserial PRIMARY KEY,
    user_id     text NOT NULL,
    at          timestamptz NOT NULL DEFAULT now(),
    kind        text NOT NULL,
    amount      bigint NOT NULL,
    balance     bigint NOT NULL CHECK (balance >= 0),
    sku         text,
    quantity    integer,
    key         text
);
CREATE INDEX IF NOT EXISTS lock_ledger_user ON lock_ledger (user_id, id);
CREATE TABLE IF NOT EXISTS lock_grants (
    user_id     text NOT NULL,
    key         text NOT NULL,
    amount      bigint NOT NULL,
    balance     bigint NOT NULL,
    version     bigint NOT NULL,
    PRIMARY KEY (user_id, key)
);
CREATE TABLE IF NOT EXISTS lock_profiles (
    user_id     text NOT NULL,
    profile     text NOT NULL,
    game        text,
    PRIMARY KEY (user_id, profile)
);
CREATE TABLE IF NOT EXISTS lock_equipped (
    user_id     text NOT NULL,
    profile     text NOT NULL,
    slot        text NOT NULL,
    sku         text NOT NULL,
    equipped_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, profile, slot),
    FOREIGN KEY (user_id, profile) REFERENCES lock_profiles ON DELETE CASCADE
);
"""


async def create_lock_tables(con: asyncpg.Connection) -> None:
    """Create the lock baseline's tables that do not exist yet, in one transaction."""
    async with con.transaction():
        await con.execute("SELECT pg_advisory_xact_lock($1)", _LOCK)
        await con.execute(_SCHEMA)
