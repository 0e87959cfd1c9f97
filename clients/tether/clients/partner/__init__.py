"""Client library and CLI for partner callers."""
