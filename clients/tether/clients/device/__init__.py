"""Client library and CLI for device callers."""
