"""SQL storage: engine and sessions, migrations, idempotent answers; what
must not be lost lives here."""
