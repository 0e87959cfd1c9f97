"""Client library and CLI for internal callers."""
