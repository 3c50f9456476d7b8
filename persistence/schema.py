"""Schema and migrations.

Migrations are numbered SQL scripts applied in order, each in its own
transaction, under an advisory lock so that several gateways starting at once
migrate exactly once.  A migration's effect on tables is never changed once
released; a change is a new migration.  Functions are not migrations: each is
defined once (``FUNCTIONS``) and installed after the migrations whenever the
database's copy differs, so a changed function is one edit, not a copy in a
new migration (migrations 2, 4 and 5 used to carry copies of the flush).

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
``reservation_outcomes`` how each reservation of a limited item or promo
                     code ended (sold or released): once.
``cluster_settings`` what every process of the cluster must agree on (the
                     partition count, a digest of the secret).
``orders``           the fulfillment outbox (PROTOCOL.md §12): one row per
                     order, created in the flush of the purchase that opened
                     it; its status moves only in its user's flushes, the
                     worker's columns (attempts, next_attempt_at, voucher,
                     shop_order, last_error) only by the fulfillment worker.
``webhook_events``   the shop's and the payment provider's deliveries seen.
``cluster_map``,     the partition map: which shard owns each partition, and
``partition_map``    the epoch of the map (bumped by every change) and of each
                     partition's last move.  A flush writes an entity only
                     while the map gives its partition to the writing shard.
"""

from __future__ import annotations

import logging

import asyncpg

__all__ = ["FLUSH_FUNCTION", "MIGRATIONS", "migrate"]

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
    # 2: (the journal flush function, ``loadout_flush``; functions are now
    # installed from one definition after the migrations: FUNCTIONS below).
    "SELECT 1",
    # 3: (the lock baseline's tables; the baseline and its schema live in
    # bench/ now, and migration 6 drops them from databases that had them).
    "SELECT 1",
    # 4: when each user's next time-limited item expires, so that a shard
    # starting up (after a crash or a restart) expires items of users it has
    # not loaded, without waiting for a request (PROTOCOL.md §10).
    """
    ALTER TABLE users ADD COLUMN next_expiry bigint;
    CREATE INDEX users_next_expiry ON users (next_expiry) WHERE next_expiry IS NOT NULL;
    """,
    # 5: a reservation ends once: sold (with the purchase) or released (by the
    # sweeper, for a purchase it did not find).
    """
    CREATE TABLE reservation_outcomes (
        res       text NOT NULL,
        deadline  bigint NOT NULL,
        outcome   text NOT NULL CHECK (outcome IN ('sold', 'released')),
        at        timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (res, deadline)
    );
    """,
    # 6: the lock baseline moved to bench/ with its own schema.
    """
    DROP TABLE IF EXISTS lock_equipped, lock_profiles, lock_grants, lock_ledger,
        lock_inventory, lock_purchases, lock_wallets;
    """,
    # 7: partitions (PROTOCOL.md §13): the settings every process of a cluster
    # must agree on, and the map of partitions to shards with its epoch.
    """
    CREATE TABLE cluster_settings (
        name        text PRIMARY KEY,
        value       text NOT NULL
    );
    CREATE TABLE cluster_map (
        one         boolean PRIMARY KEY DEFAULT true CHECK (one),
        epoch       bigint NOT NULL,
        partitions  integer NOT NULL CHECK (partitions >= 1),
        updated_at  timestamptz NOT NULL DEFAULT now()
    );
    CREATE TABLE partition_map (
        partition   integer PRIMARY KEY CHECK (partition >= 0),
        shard       integer NOT NULL,
        epoch       bigint NOT NULL
    );
    """,
    # 8: fulfillment (PROTOCOL.md §12): the orders outbox, written in the same
    # flush as the purchase's debit, and inbound webhook deliveries.
    """
    CREATE TABLE orders (
        order_id        text PRIMARY KEY,
        user_id         text NOT NULL,
        purchase        text NOT NULL,
        sku             text NOT NULL,
        delivery        text NOT NULL,
        quantity        integer NOT NULL,
        total           bigint NOT NULL,
        status          text NOT NULL,
        email           text,
        address         jsonb,
        voucher         text UNIQUE,
        tracking        jsonb,
        shop_order      text,
        shop_cancelled  boolean NOT NULL DEFAULT false,
        attempts        integer NOT NULL DEFAULT 0,
        next_attempt_at timestamptz NOT NULL DEFAULT now(),
        last_error      text,
        created_at      bigint NOT NULL,
        updated_at      bigint NOT NULL
    );
    CREATE INDEX orders_by_user ON orders (user_id, created_at DESC, order_id DESC);
    CREATE INDEX orders_due ON orders (next_attempt_at)
        WHERE status IN ('pending', 'processing')
           OR (status = 'cancelled' AND shop_order IS NOT NULL AND NOT shop_cancelled);
    CREATE INDEX orders_by_shop_order ON orders (shop_order) WHERE shop_order IS NOT NULL;
    CREATE INDEX orders_by_status ON orders (status, created_at);
    CREATE TABLE webhook_events (
        source      text NOT NULL,
        event_id    text NOT NULL,
        received_at timestamptz NOT NULL DEFAULT now(),
        outcome     text NOT NULL,
        PRIMARY KEY (source, event_id)
    );
    """,
]

#: The journal flush in one statement, so one round trip and one transaction
#: (persistence.journal): fence on the shard epoch; append journal, ledger and
#: reservation-outcome rows; move the state rows only from the version this
#: writer read.  When something cannot be written as it is (a unique index or
#: the state-row check says so), the attempt is rolled back to its savepoint,
#: the entities at fault are found, and the flush is written again without
#: their rows; their ids are returned.  So the checks cost nothing on the
#: usual path, and one entity's conflict never fails the others.  Defined
#: here once and installed by ``migrate`` whenever it differs from the
#: database's copy.
FLUSH_FUNCTION = """
CREATE FUNCTION loadout_flush(
    p_shard integer, p_epoch bigint,
    j_user text[], j_version bigint[], j_at bigint[], j_kind text[], j_key text[],
    j_change bytea[],
    l_user text[], l_seq bigint[], l_at bigint[], l_kind text[], l_amount bigint[],
    l_balance bigint[], l_sku text[], l_quantity integer[], l_key text[],
    u_user text[], u_base bigint[], u_version bigint[], u_balance bigint[], u_state bytea[],
    u_next_expiry bigint[], u_partition integer[],
    o_user text[], o_res text[], o_deadline bigint[], o_outcome text[],
    r_user text[], r_order text[], r_purchase text[], r_sku text[], r_delivery text[],
    r_quantity integer[], r_total bigint[], r_email text[], r_address text[], r_at bigint[],
    m_user text[], m_order text[], m_status text[], m_voucher text[], m_tracking text[],
    m_shop text[], m_at bigint[]
) RETURNS text[] LANGUAGE plpgsql AS $$
DECLARE
    owner bigint;
    elsewhere text[];
    rejected text[];
    checked boolean := false;
    moved integer;
BEGIN
    SELECT epoch INTO owner FROM shard_epochs WHERE shard = p_shard FOR SHARE;
    IF owner IS DISTINCT FROM p_epoch THEN
        RAISE EXCEPTION 'shard % epoch % was replaced by epoch %', p_shard, p_epoch, owner
            USING ERRCODE = 'LF001';
    END IF;
    -- Entities of partitions the map gives to another shard are left out (a
    -- move this shard did not hand over: it is fenced out).  A move takes the
    -- shard's epoch row FOR UPDATE, so it waits for this flush (which holds
    -- it FOR SHARE), and a later flush reads the moved map.
    IF EXISTS (SELECT 1 FROM partition_map
                WHERE partition = ANY (u_partition) AND shard <> p_shard) THEN
        elsewhere := ARRAY(
            SELECT n.user_id FROM unnest(u_user, u_partition) AS n(user_id, part)
              JOIN partition_map m ON m.partition = n.part
             WHERE m.shard <> p_shard);
    ELSE
        elsewhere := '{}';
    END IF;
    rejected := elsewhere;
    LOOP
        BEGIN
            IF cardinality(o_res) > 0 THEN  -- only limited items' and promos' changes
                INSERT INTO reservation_outcomes (res, deadline, outcome)
                    SELECT o.res, o.deadline, o.outcome
                      FROM unnest(o_user, o_res, o_deadline, o_outcome)
                           AS o(user_id, res, deadline, outcome)
                     WHERE o.user_id <> ALL (rejected);
            END IF;
            INSERT INTO journal (user_id, version, at, kind, key, change)
                SELECT r.user_id, r.version, r.at, r.kind, r.key, r.change
                  FROM unnest(j_user, j_version, j_at, j_kind, j_key, j_change)
                       AS r(user_id, version, at, kind, key, change)
                 WHERE r.user_id <> ALL (rejected);
            INSERT INTO ledger (user_id, seq, at, kind, amount, balance, sku, quantity, key)
                SELECT l.user_id, l.seq, l.at, l.kind, l.amount, l.balance, l.sku, l.quantity,
                       l.key
                  FROM unnest(l_user, l_seq, l_at, l_kind, l_amount, l_balance, l_sku,
                              l_quantity, l_key)
                       AS l(user_id, seq, at, kind, amount, balance, sku, quantity, key)
                 WHERE l.user_id <> ALL (rejected);
            -- Orders (PROTOCOL.md §12): most flushes have none, and skip both.
            IF cardinality(r_order) > 0 THEN
                INSERT INTO orders (order_id, user_id, purchase, sku, delivery, quantity, total,
                                    status, email, address, created_at, updated_at)
                    SELECT r.order_id, r.user_id, r.purchase, r.sku, r.delivery, r.quantity,
                           r.total, 'pending', r.email, r.address::jsonb, r.at, r.at
                      FROM unnest(r_user, r_order, r_purchase, r_sku, r_delivery, r_quantity,
                                  r_total, r_email, r_address, r_at)
                           AS r(user_id, order_id, purchase, sku, delivery, quantity, total, email,
                                address, at)
                     WHERE r.user_id <> ALL (rejected);
            END IF;
            IF cardinality(m_order) > 0 THEN
                UPDATE orders AS o
                   SET status = m.status, voucher = coalesce(m.voucher, o.voucher),
                       tracking = coalesce(m.tracking::jsonb, o.tracking),
                       shop_order = coalesce(m.shop, o.shop_order), updated_at = m.at,
                       attempts = CASE WHEN m.status = 'pending' THEN 0 ELSE o.attempts END,
                       next_attempt_at = CASE WHEN m.status IN ('pending', 'cancelled') THEN now()
                                              ELSE o.next_attempt_at END
                  FROM unnest(m_user, m_order, m_status, m_voucher, m_tracking, m_shop, m_at)
                       AS m(user_id, order_id, status, voucher, tracking, shop, at)
                 WHERE m.user_id <> ALL (rejected) AND o.order_id = m.order_id;
            END IF;
            UPDATE users AS u
               SET version = n.version, balance = n.balance, state = n.state,
                   next_expiry = n.next_expiry, updated_at = now()
              FROM unnest(u_user, u_base, u_version, u_balance, u_state, u_next_expiry)
                   AS n(user_id, base, version, balance, state, next_expiry)
             WHERE n.base > 0 AND n.user_id <> ALL (rejected)
               AND u.user_id = n.user_id AND u.version = n.base;
            GET DIAGNOSTICS moved = ROW_COUNT;
            IF moved <> (SELECT count(*) FROM unnest(u_user, u_base) AS b(user_id, base)
                          WHERE b.base > 0 AND b.user_id <> ALL (rejected)) THEN
                RAISE EXCEPTION 'user rows moved under this writer' USING ERRCODE = 'LF002';
            END IF;
            INSERT INTO users (user_id, version, balance, state, next_expiry)
                SELECT n.user_id, n.version, n.balance, n.state, n.next_expiry
                  FROM unnest(u_user, u_base, u_version, u_balance, u_state, u_next_expiry)
                       AS n(user_id, base, version, balance, state, next_expiry)
                 WHERE n.base = 0 AND n.user_id <> ALL (rejected);
            RETURN rejected;
        EXCEPTION WHEN unique_violation OR SQLSTATE 'LF002' THEN
            IF checked THEN
                RAISE;  -- not foreseen by the checks: a writer racing this one
            END IF;
        END;
        checked := true;
        rejected := elsewhere || ARRAY(
            -- a key the entity used before (a replay applied as new), or twice here
            SELECT r.user_id FROM unnest(j_user, j_key) AS r(user_id, key)
             WHERE r.key IS NOT NULL AND EXISTS (
                   SELECT 1 FROM journal j WHERE j.user_id = r.user_id AND j.key = r.key)
            UNION
            SELECT r.user_id FROM unnest(j_user, j_key) AS r(user_id, key)
             WHERE r.key IS NOT NULL GROUP BY r.user_id, r.key HAVING count(*) > 1
            UNION
            -- a reservation that has ended already, or ends twice here
            SELECT o.user_id FROM unnest(o_user, o_res, o_deadline) AS o(user_id, res, deadline)
             WHERE EXISTS (SELECT 1 FROM reservation_outcomes x
                            WHERE x.res = o.res AND x.deadline = o.deadline)
            UNION
            SELECT min(o.user_id)
              FROM unnest(o_user, o_res, o_deadline) AS o(user_id, res, deadline)
             GROUP BY o.res, o.deadline HAVING count(*) > 1
            UNION
            -- a row another writer moved (or made, for an entity new to this
            -- writer), or records another writer added past the row
            SELECT n.user_id FROM unnest(u_user, u_base) AS n(user_id, base)
              LEFT JOIN users u ON u.user_id = n.user_id
             WHERE u.version IS DISTINCT FROM nullif(n.base, 0)
                OR EXISTS (SELECT 1 FROM journal j
                            WHERE j.user_id = n.user_id AND j.version > n.base)
        );
    END LOOP;
END
$$;
"""

#: Functions the code calls, by name: each is installed from its one definition.
FUNCTIONS: dict[str, str] = {"loadout_flush": FLUSH_FUNCTION}


async def _install_functions(con: asyncpg.Connection) -> None:
    """(Re)create each function whose definition differs from the database's;
    older overloads are dropped.  Runs under the migration lock."""
    for name, definition in FUNCTIONS.items():
        body = definition.split("$$")[1]
        rows = await con.fetch(
            "SELECT p.oid::regprocedure::text AS signature, p.prosrc FROM pg_proc p"
            " JOIN pg_namespace n ON n.oid = p.pronamespace"
            " WHERE p.proname = $1 AND n.nspname = current_schema()",
            name,
        )
        if len(rows) == 1 and rows[0]["prosrc"] == body:
            continue
        async with con.transaction():
            for row in rows:
                await con.execute(f"DROP FUNCTION {row['signature']}")
            await con.execute(definition)
        log.info("installed function %s", name)


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
            await _install_functions(con)
            return len(MIGRATIONS)
        finally:
            await con.execute("SELECT pg_advisory_unlock($1)", _LOCK)
