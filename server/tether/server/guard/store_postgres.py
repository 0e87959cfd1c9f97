"""The guard store on PostgreSQL: each batch of the record in one statement."""

from __future__ import annotations

import json
from typing import Any

from tether.server.guard.recorder import Batch
from tether.server.storage.base import utcnow
from tether.server.storage.database import Database


class PostgresGuardStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def write(self, batch: Batch) -> None:
        """The whole batch in one statement (one round trip, its
        own transaction), each table's rows as arrays unnested in SQL, on a
        bare asyncpg connection. The Core upserts, built, compiled and bound
        row by row in a transaction of four statements, cost ~200 us of the
        event loop's CPU per written-behind call in batches of ~10, and
        PostgreSQL ran each row as a statement of its own."""
        identities = [
            (
                ident["identity"],
                # What SQLAlchemy's JSON type binds.
                json.dumps(ident["sketch"]),
                ident["first_seen_time"],
                ident["last_seen_time"],
            )
            for ident in batch.identities
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
        async with self._db.driver_connection() as connection:
            await connection.execute(
                _PG_WRITE,
                *_columns(batch.drops, 5),
                *_columns(batch.puts, 6),
                utcnow(),
                *_columns(links, 7),
                *_columns(identities, 4),
            )


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
        (service_id, action, room_id, identity, member, expire_time, create_time)
    SELECT service_id, action, room_id, identity, member, expire_time, $12
    FROM unnest($6::varchar[], $7::varchar[], $8::varchar[], $9::varchar[], $10::bytea[],
        $11::timestamptz[]) AS t(service_id, action, room_id, identity, member, expire_time)
    ON CONFLICT (service_id, action, room_id, identity, member)
    DO UPDATE SET expire_time = excluded.expire_time
), linked AS (
    INSERT INTO guard_links
        (service_id, identity, account_digest, key_id, last_action, first_seen_time,
        last_seen_time)
    SELECT * FROM unnest($13::varchar[], $14::varchar[], $15::bytea[], $16::varchar[],
        $17::varchar[], $18::timestamptz[], $19::timestamptz[])
    ON CONFLICT (service_id, identity, account_digest)
    DO UPDATE SET key_id = excluded.key_id, last_action = excluded.last_action,
        last_seen_time = excluded.last_seen_time
)
INSERT INTO guard_identities (identity, sketch, first_seen_time, last_seen_time)
SELECT identity, sketch::json, first_seen_time, last_seen_time
FROM unnest($20::varchar[], $21::text[], $22::timestamptz[], $23::timestamptz[])
    AS t(identity, sketch, first_seen_time, last_seen_time)
ON CONFLICT (identity)
DO UPDATE SET sketch = excluded.sketch, last_seen_time = excluded.last_seen_time
"""
