"""SQL storage: what must not be lost lives here."""
