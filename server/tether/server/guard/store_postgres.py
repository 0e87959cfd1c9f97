"""The guard store on PostgreSQL: each batch of the record in one statement."""

from __future__ import annotations

import json
from typing import Any

import asyncpg

from tether.server.guard.recorder import Batch
from tether.server.storage.base import utcnow
from tether.server.storage.database import Database

WRITE_ATTEMPTS = 3


class PostgresGuardStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def write(self, batch: Batch) -> None:
        """The whole batch in one statement (one round trip, its
        own transaction), each table's rows as arrays unnested in SQL, on a
        bare asyncpg connection. The Core upserts, built, compiled and bound
        row by row in a transaction of several statements, cost ~200 us of
        the event loop's CPU per written-behind call in batches of ~10, and
        PostgreSQL ran each row as a statement of its own."""
        fingerprints = [
            (
                row["fingerprint"],
                # What SQLAlchemy's JSON type binds.
                json.dumps(row["digests"]),
                row["first_seen_time"],
                row["last_seen_time"],
                row["last_network"],
            )
            for row in batch.fingerprints
        ]
        links = [
            (
                link["service_id"],
                link["identity"],
                link["account_digest"],
                link["key_id"],
                link["last_action"],
                link["first_seen_time"],
                link["last_seen_time"],
            )
            for link in batch.links
        ]
        records = [
            (
                row["kind"],
                row["source"],
                row["target"],
                row["confidence"],
                json.dumps(row["changed"]),
                row.get("actor", ""),
                row.get("reason", ""),
                row["create_time"],
            )
            for row in batch.link_records
        ]
        # Each table's rows in key order: processes (workers, replicas)
        # writing overlapping rows at once then lock them in one order.
        arguments = [
            *_columns(sorted(batch.drops), 5),
            *_columns(sorted(batch.puts, key=lambda row: row[:5]), 7),
            utcnow(),
            *_columns(sorted(links, key=lambda row: row[:3]), 7),
            *_columns(sorted(fingerprints), 5),
            *_columns(records, 8),
            *_columns(sorted(batch.sightings), 4),
            *_columns(sorted(batch.farmed), 4),
        ]
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            try:
                async with self._db.driver_connection() as connection:
                    await connection.execute(_PG_WRITE, *arguments)
            except asyncpg.DeadlockDetectedError:
                # Rows of another table still cross another process's
                # batch; the statement rolled back whole, so it may run again.
                if attempt == WRITE_ATTEMPTS:
                    raise
            else:
                return


def _columns(rows: list[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows -> one list per column (width empty lists for no rows)."""
    if not rows:
        return [[] for _ in range(width)]
    return [list(column) for column in zip(*rows, strict=True)]


# write's statement: one array per column. A batch holds one row per
# key (Batch), as ON CONFLICT DO UPDATE needs, and never drops an entry it
# puts, so the parts touch different rows. Every part runs, also with no
# rows, and the statement commits as a whole or not at all.
_PG_WRITE = """
WITH dropped AS (
    DELETE FROM guard_entries AS e
    USING unnest($1::varchar[], $2::varchar[], $3::varchar[], $4::varchar[], $5::bytea[])
        AS d(service_id, action, room_id, identity, member)
    WHERE e.service_id = d.service_id AND e.action = d.action AND e.room_id = d.room_id
        AND e.identity = d.identity AND e.member = d.member
), put AS (
    INSERT INTO guard_entries
        (service_id, action, room_id, identity, member, expire_time, network, create_time)
    SELECT service_id, action, room_id, identity, member, expire_time, network, $13
    FROM unnest($6::varchar[], $7::varchar[], $8::varchar[], $9::varchar[], $10::bytea[],
        $11::timestamptz[], $12::varchar[])
        AS t(service_id, action, room_id, identity, member, expire_time, network)
    ON CONFLICT (service_id, action, room_id, identity, member)
    DO UPDATE SET expire_time = excluded.expire_time, network = excluded.network
), linked AS (
    INSERT INTO guard_links
        (service_id, identity, account_digest, key_id, last_action, first_seen_time,
        last_seen_time)
    SELECT * FROM unnest($14::varchar[], $15::varchar[], $16::bytea[], $17::varchar[],
        $18::varchar[], $19::timestamptz[], $20::timestamptz[])
    ON CONFLICT (service_id, identity, account_digest)
    DO UPDATE SET key_id = excluded.key_id, last_action = excluded.last_action,
        last_seen_time = excluded.last_seen_time
), fingerprinted AS (
    INSERT INTO guard_fingerprints
        (fingerprint, digests, first_seen_time, last_seen_time, last_network)
    SELECT fingerprint, digests::json, first_seen_time, last_seen_time, last_network
    FROM unnest($21::varchar[], $22::text[], $23::timestamptz[], $24::timestamptz[],
        $25::varchar[])
        AS t(fingerprint, digests, first_seen_time, last_seen_time, last_network)
    ON CONFLICT (fingerprint) DO UPDATE SET last_seen_time = excluded.last_seen_time,
        last_network = excluded.last_network
), recorded AS (
    INSERT INTO guard_fingerprint_links
        (kind, source, target, confidence, changed, actor, reason, create_time)
    SELECT kind, source, target, confidence, changed::json, actor, reason, create_time
    FROM unnest($26::varchar[], $27::varchar[], $28::varchar[], $29::float8[], $30::text[],
        $31::varchar[], $32::varchar[], $33::timestamptz[])
        AS t(kind, source, target, confidence, changed, actor, reason, create_time)
), sighted AS (
    INSERT INTO guard_sightings (fingerprint, network, hour, minute)
    SELECT * FROM unnest($34::varchar[], $35::varchar[], $36::int[], $37::int[])
    ON CONFLICT DO NOTHING
)
INSERT INTO guard_farmed (service_id, action, room_id, identity, create_time)
SELECT service_id, action, room_id, identity, $13
FROM unnest($38::varchar[], $39::varchar[], $40::varchar[], $41::varchar[])
    AS t(service_id, action, room_id, identity)
ON CONFLICT DO NOTHING
"""
