"""Schema and migrations.

Migrations are numbered SQL scripts applied in order, each in its own
transaction, under an advisory lock so that several gateways starting at once
migrate exactly once.  A migration is never edited once released; a change is
a new migration.

Tables:

``users``            one row per user: version, balance, and a snapshot of the
                     inventory and profiles (msgpack).  Written by the journal
                     in the same transaction as the user's journal rows, only
                     if the row still has the version the writer read (fencing).
``journal``          one row per change of a user, ``(user_id, version)``
                     unique; a change's idempotency key is unique per user, so
                     the journal also answers replays after a restart.
``ledger``           every movement of gems, with the balance after it.
``shard_epochs``     the current owner epoch of every shard: a shard actor takes
                     a new epoch when it starts, and a flush from an older
                     epoch fails, so a leftover actor can never write.
``catalog_versions`` every published catalog document; the newest is live.
``games``, ``items`` the published catalogs in relational form, for operators'
                     SQL and for the retired-item lookup.
``lock_*``           the lock baseline's own tables (``LOADOUT_CORE=lock``, used
                     by ``loadout bench --baseline lock``); the actor core never
                     reads them.
"""

from __future__ import annotations

import logging

import asyncpg

__all__ = ["MIGRATIONS", "migrate"]

log = logging.getLogger("loadout.schema")

MIGRATIONS: list[str] = [
    # 1: the core slice.
    """
    CREATE TABLE users (
        user_id     text PRIMARY KEY,
        version     bigint NOT NULL CHECK (version >= 1),
        balance     bigint NOT NULL CHECK (balance >= 0),
        state       bytea NOT NULL,
        updated_at  timestamptz NOT NULL DEFAULT now()
    );
    CREATE TABLE journal (
        user_id     text NOT NULL,
        version     bigint NOT NULL,
        at          bigint NOT NULL,
        kind        text NOT NULL,
        key         text,
        change      bytea NOT NULL,
        PRIMARY KEY (user_id, version)
    );
    CREATE UNIQUE INDEX journal_key ON journal (user_id, key) WHERE key IS NOT NULL;
    CREATE TABLE ledger (
        user_id     text NOT NULL,
        seq         bigint NOT NULL,
        at          bigint NOT NULL,
        kind        text NOT NULL,
        amount      bigint NOT NULL,
        balance     bigint NOT NULL CHECK (balance >= 0),
        sku         text,
        quantity    integer,
        key         text,
        PRIMARY KEY (user_id, seq)
    );
    CREATE TABLE shard_epochs (
        shard       integer PRIMARY KEY,
        epoch       bigint NOT NULL
    );
    CREATE TABLE catalog_versions (
        version      bigserial PRIMARY KEY,
        published_at timestamptz NOT NULL DEFAULT now(),
        source       text NOT NULL,
        document     bytea NOT NULL
    );
    CREATE TABLE games (
        catalog_version bigint NOT NULL REFERENCES catalog_versions,
        code            text NOT NULL,
        name            text NOT NULL,
        PRIMARY KEY (catalog_version, code)
    );
    CREATE TABLE items (
        catalog_version bigint NOT NULL REFERENCES catalog_versions,
        sku             text NOT NULL,
        game            text,
        category        text NOT NULL,
        kind            text NOT NULL,
        status          text NOT NULL,
        price           bigint NOT NULL,
        definition      bytea NOT NULL,
        PRIMARY KEY (catalog_version, sku)
    );
    CREATE INDEX items_sku ON items (sku, catalog_version DESC);
    """,
    # 2: the whole journal flush in one statement, so one round trip and one
    # transaction: fence on the shard epoch, append journal and ledger rows,
    # move the users' state rows only from the version this writer read.
    """
    CREATE FUNCTION loadout_flush(
        p_shard integer, p_epoch bigint,
        j_user text[], j_version bigint[], j_at bigint[], j_kind text[], j_key text[],
        j_change bytea[],
        l_user text[], l_seq bigint[], l_at bigint[], l_kind text[], l_amount bigint[],
        l_balance bigint[], l_sku text[], l_quantity integer[], l_key text[],
        u_user text[], u_base bigint[], u_version bigint[], u_balance bigint[], u_state bytea[]
    ) RETURNS void LANGUAGE plpgsql AS $$
    DECLARE
        owner bigint;
        moved integer;
    BEGIN
        SELECT epoch INTO owner FROM shard_epochs WHERE shard = p_shard FOR SHARE;
        IF owner IS DISTINCT FROM p_epoch THEN
            RAISE EXCEPTION 'shard % epoch % was replaced by epoch %', p_shard, p_epoch, owner
                USING ERRCODE = 'LF001';
        END IF;
        INSERT INTO journal (user_id, version, at, kind, key, change)
            SELECT * FROM unnest(j_user, j_version, j_at, j_kind, j_key, j_change);
        INSERT INTO ledger (user_id, seq, at, kind, amount, balance, sku, quantity, key)
            SELECT * FROM unnest(l_user, l_seq, l_at, l_kind, l_amount, l_balance, l_sku,
                                 l_quantity, l_key);
        UPDATE users AS u
           SET version = n.version, balance = n.balance, state = n.state, updated_at = now()
          FROM unnest(u_user, u_base, u_version, u_balance, u_state)
               AS n(user_id, base, version, balance, state)
         WHERE n.base > 0 AND u.user_id = n.user_id AND u.version = n.base;
        GET DIAGNOSTICS moved = ROW_COUNT;
        IF moved <> (SELECT count(*) FROM unnest(u_base) AS b WHERE b > 0) THEN
            RAISE EXCEPTION 'user rows moved under this writer' USING ERRCODE = 'LF002';
        END IF;
        INSERT INTO users (user_id, version, balance, state)
            SELECT n.user_id, n.version, n.balance, n.state
              FROM unnest(u_user, u_base, u_version, u_balance, u_state)
                   AS n(user_id, base, version, balance, state)
             WHERE n.base = 0;
    END
    $$;
    """,
    # 3: the lock baseline (``LOADOUT_CORE=lock``, server/lock_core.py): the
    # BattleBucks design (battlebucks-design.md §1, §4.3) on tables of its own,
    # one transaction per request that takes the wallet row FOR UPDATE.
    """
    CREATE TABLE lock_wallets (
        user_id     text PRIMARY KEY,
        balance     bigint NOT NULL CHECK (balance >= 0),
        version     bigint NOT NULL,
        updated_at  timestamptz NOT NULL DEFAULT now()
    );
    CREATE TABLE lock_purchases (
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
    CREATE TABLE lock_inventory (
        user_id     text NOT NULL,
        sku         text NOT NULL,
        quantity    integer NOT NULL CHECK (quantity >= 0),
        acquired_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (user_id, sku)
    );
    CREATE TABLE lock_ledger (
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
    CREATE INDEX lock_ledger_user ON lock_ledger (user_id, id);
    CREATE TABLE lock_grants (
        user_id     text NOT NULL,
        key         text NOT NULL,
        amount      bigint NOT NULL,
        balance     bigint NOT NULL,
        version     bigint NOT NULL,
        PRIMARY KEY (user_id, key)
    );
    CREATE TABLE lock_profiles (
        user_id     text NOT NULL,
        profile     text NOT NULL,
        game        text,
        PRIMARY KEY (user_id, profile)
    );
    CREATE TABLE lock_equipped (
        user_id     text NOT NULL,
        profile     text NOT NULL,
        slot        text NOT NULL,
        sku         text NOT NULL,
        equipped_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (user_id, profile, slot),
        FOREIGN KEY (user_id, profile) REFERENCES lock_profiles ON DELETE CASCADE
    );
    """,
    # 4: when each user's next time-limited item expires, so that a shard
    # starting up (after a crash or a restart) expires items of users it has
    # not loaded, without waiting for a request (PROTOCOL.md §10).
    """
    ALTER TABLE users ADD COLUMN next_expiry bigint;
    CREATE INDEX users_next_expiry ON users (next_expiry) WHERE next_expiry IS NOT NULL;
    DROP FUNCTION loadout_flush(
        integer, bigint, text[], bigint[], bigint[], text[], text[], bytea[],
        text[], bigint[], bigint[], text[], bigint[], bigint[], text[], integer[], text[],
        text[], bigint[], bigint[], bigint[], bytea[]
    );
    CREATE FUNCTION loadout_flush(
        p_shard integer, p_epoch bigint,
        j_user text[], j_version bigint[], j_at bigint[], j_kind text[], j_key text[],
        j_change bytea[],
        l_user text[], l_seq bigint[], l_at bigint[], l_kind text[], l_amount bigint[],
        l_balance bigint[], l_sku text[], l_quantity integer[], l_key text[],
        u_user text[], u_base bigint[], u_version bigint[], u_balance bigint[], u_state bytea[],
        u_next_expiry bigint[]
    ) RETURNS void LANGUAGE plpgsql AS $$
    DECLARE
        owner bigint;
        moved integer;
    BEGIN
        SELECT epoch INTO owner FROM shard_epochs WHERE shard = p_shard FOR SHARE;
        IF owner IS DISTINCT FROM p_epoch THEN
            RAISE EXCEPTION 'shard % epoch % was replaced by epoch %', p_shard, p_epoch, owner
                USING ERRCODE = 'LF001';
        END IF;
        INSERT INTO journal (user_id, version, at, kind, key, change)
            SELECT * FROM unnest(j_user, j_version, j_at, j_kind, j_key, j_change);
        INSERT INTO ledger (user_id, seq, at, kind, amount, balance, sku, quantity, key)
            SELECT * FROM unnest(l_user, l_seq, l_at, l_kind, l_amount, l_balance, l_sku,
                                 l_quantity, l_key);
        UPDATE users AS u
           SET version = n.version, balance = n.balance, state = n.state,
               next_expiry = n.next_expiry, updated_at = now()
          FROM unnest(u_user, u_base, u_version, u_balance, u_state, u_next_expiry)
               AS n(user_id, base, version, balance, state, next_expiry)
         WHERE n.base > 0 AND u.user_id = n.user_id AND u.version = n.base;
        GET DIAGNOSTICS moved = ROW_COUNT;
        IF moved <> (SELECT count(*) FROM unnest(u_base) AS b WHERE b > 0) THEN
            RAISE EXCEPTION 'user rows moved under this writer' USING ERRCODE = 'LF002';
        END IF;
        INSERT INTO users (user_id, version, balance, state, next_expiry)
            SELECT n.user_id, n.version, n.balance, n.state, n.next_expiry
              FROM unnest(u_user, u_base, u_version, u_balance, u_state, u_next_expiry)
                   AS n(user_id, base, version, balance, state, next_expiry)
             WHERE n.base = 0;
    END
    $$;
    """,
    # 5: a reservation ends once: sold (with the purchase) or released (by the
    # sweeper, for a purchase it did not find). Whichever commits second
    # fails, so a purchase stalled in COMMIT can never outlive its release.
    """
    CREATE TABLE reservation_outcomes (
        res       text NOT NULL,
        deadline  bigint NOT NULL,
        outcome   text NOT NULL CHECK (outcome IN ('sold', 'released')),
        at        timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (res, deadline)
    );
    DROP FUNCTION loadout_flush(
        integer, bigint, text[], bigint[], bigint[], text[], text[], bytea[],
        text[], bigint[], bigint[], text[], bigint[], bigint[], text[], integer[], text[],
        text[], bigint[], bigint[], bigint[], bytea[], bigint[]
    );
    CREATE FUNCTION loadout_flush(
        p_shard integer, p_epoch bigint,
        j_user text[], j_version bigint[], j_at bigint[], j_kind text[], j_key text[],
        j_change bytea[],
        l_user text[], l_seq bigint[], l_at bigint[], l_kind text[], l_amount bigint[],
        l_balance bigint[], l_sku text[], l_quantity integer[], l_key text[],
        u_user text[], u_base bigint[], u_version bigint[], u_balance bigint[], u_state bytea[],
        u_next_expiry bigint[],
        o_res text[], o_deadline bigint[], o_outcome text[]
    ) RETURNS void LANGUAGE plpgsql AS $$
    DECLARE
        owner bigint;
        moved integer;
    BEGIN
        SELECT epoch INTO owner FROM shard_epochs WHERE shard = p_shard FOR SHARE;
        IF owner IS DISTINCT FROM p_epoch THEN
            RAISE EXCEPTION 'shard % epoch % was replaced by epoch %', p_shard, p_epoch, owner
                USING ERRCODE = 'LF001';
        END IF;
        INSERT INTO reservation_outcomes (res, deadline, outcome)
            SELECT * FROM unnest(o_res, o_deadline, o_outcome);
        INSERT INTO journal (user_id, version, at, kind, key, change)
            SELECT * FROM unnest(j_user, j_version, j_at, j_kind, j_key, j_change);
        INSERT INTO ledger (user_id, seq, at, kind, amount, balance, sku, quantity, key)
            SELECT * FROM unnest(l_user, l_seq, l_at, l_kind, l_amount, l_balance, l_sku,
                                 l_quantity, l_key);
        UPDATE users AS u
           SET version = n.version, balance = n.balance, state = n.state,
               next_expiry = n.next_expiry, updated_at = now()
          FROM unnest(u_user, u_base, u_version, u_balance, u_state, u_next_expiry)
               AS n(user_id, base, version, balance, state, next_expiry)
         WHERE n.base > 0 AND u.user_id = n.user_id AND u.version = n.base;
        GET DIAGNOSTICS moved = ROW_COUNT;
        IF moved <> (SELECT count(*) FROM unnest(u_base) AS b WHERE b > 0) THEN
            RAISE EXCEPTION 'user rows moved under this writer' USING ERRCODE = 'LF002';
        END IF;
        INSERT INTO users (user_id, version, balance, state, next_expiry)
            SELECT n.user_id, n.version, n.balance, n.state, n.next_expiry
              FROM unnest(u_user, u_base, u_version, u_balance, u_state, u_next_expiry)
                   AS n(user_id, base, version, balance, state, next_expiry)
             WHERE n.base = 0;
    END
    $$;
    """,
]

_LOCK = 0x10AD0_0001


async def migrate(pool: asyncpg.Pool) -> int:
    """Apply pending migrations; return the schema version now in force."""
    async with pool.acquire() as con:
        await con.execute("SELECT pg_advisory_lock($1)", _LOCK)
        try:
            await con.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = await con.fetchval("SELECT coalesce(max(version), 0) FROM schema_migrations")
            for number, script in enumerate(MIGRATIONS, start=1):
                if number <= done:
                    continue
                async with con.transaction():
                    await con.execute(script)
                    await con.execute("INSERT INTO schema_migrations (version) VALUES ($1)", number)
                log.info("applied migration %d", number)
            return len(MIGRATIONS)
        finally:
            await con.execute("SELECT pg_advisory_unlock($1)", _LOCK)
