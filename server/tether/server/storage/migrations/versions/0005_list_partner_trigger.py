"""eligible list: the partner reference checked per statement on PostgreSQL

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23

The foreign key from eligible_accounts.partner_id to partners checks every
inserted row with a query of its own: about half of a bulk import's COPY
time. On PostgreSQL, triggers now give the same guarantees per statement:

- an insert or update of list entries fails with foreign_key_violation
  (SQLSTATE 23503, as the foreign key did) when a partner named is missing,
  and locks each partner named FOR KEY SHARE until the transaction ends, so
  that no partner can be deleted under entries being written;
- deleting a partner deletes its list (ON DELETE CASCADE);
- a partner's id cannot change while its list has entries.

SQLite keeps the foreign key: its check costs little there.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FOREIGN_KEY = "fk_eligible_accounts_partner_id_partners"

UPGRADE = [
    f"ALTER TABLE eligible_accounts DROP CONSTRAINT {FOREIGN_KEY}",
    """
CREATE FUNCTION tether_eligible_partners_exist() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    missing text;
BEGIN
    -- The partners named by the statement's rows, each locked as the
    -- foreign key would lock it; a name with no partner is a violation.
    SELECT named.partner_id INTO missing
    FROM (SELECT DISTINCT partner_id FROM written) AS named
    LEFT JOIN (
        SELECT p.partner_id FROM partners AS p
        WHERE p.partner_id IN (SELECT partner_id FROM written)
        FOR KEY SHARE OF p
    ) AS present ON present.partner_id = named.partner_id
    WHERE present.partner_id IS NULL
    LIMIT 1;
    IF FOUND THEN
        RAISE foreign_key_violation USING
            MESSAGE = format('partner %L of a list entry does not exist', missing),
            CONSTRAINT = 'fk_eligible_accounts_partner_id_partners',
            TABLE = 'eligible_accounts';
    END IF;
    RETURN NULL;
END $$
""",
    """
CREATE TRIGGER eligible_accounts_partner_inserted AFTER INSERT ON eligible_accounts
    REFERENCING NEW TABLE AS written FOR EACH STATEMENT
    EXECUTE FUNCTION tether_eligible_partners_exist()
""",
    """
CREATE TRIGGER eligible_accounts_partner_updated AFTER UPDATE ON eligible_accounts
    REFERENCING NEW TABLE AS written FOR EACH STATEMENT
    EXECUTE FUNCTION tether_eligible_partners_exist()
""",
    """
CREATE FUNCTION tether_partner_list_deleted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM eligible_accounts WHERE partner_id = OLD.partner_id;
    RETURN NULL;
END $$
""",
    """
CREATE TRIGGER partners_list_cascade AFTER DELETE ON partners
    FOR EACH ROW EXECUTE FUNCTION tether_partner_list_deleted()
""",
    """
CREATE FUNCTION tether_partner_id_kept() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM eligible_accounts WHERE partner_id = OLD.partner_id) THEN
        RAISE foreign_key_violation USING
            MESSAGE = format('partner %L still has list entries', OLD.partner_id),
            CONSTRAINT = 'fk_eligible_accounts_partner_id_partners',
            TABLE = 'eligible_accounts';
    END IF;
    RETURN NULL;
END $$
""",
    """
CREATE TRIGGER partners_id_kept AFTER UPDATE OF partner_id ON partners
    FOR EACH ROW WHEN (OLD.partner_id IS DISTINCT FROM NEW.partner_id)
    EXECUTE FUNCTION tether_partner_id_kept()
""",
]

DOWNGRADE = [
    "DROP TRIGGER partners_id_kept ON partners",
    "DROP FUNCTION tether_partner_id_kept()",
    "DROP TRIGGER partners_list_cascade ON partners",
    "DROP FUNCTION tether_partner_list_deleted()",
    "DROP TRIGGER eligible_accounts_partner_updated ON eligible_accounts",
    "DROP TRIGGER eligible_accounts_partner_inserted ON eligible_accounts",
    "DROP FUNCTION tether_eligible_partners_exist()",
    f"ALTER TABLE eligible_accounts ADD CONSTRAINT {FOREIGN_KEY} "
    "FOREIGN KEY (partner_id) REFERENCES partners (partner_id) ON DELETE CASCADE",
]


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for statement in UPGRADE:
            op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for statement in DOWNGRADE:
            op.execute(statement)
