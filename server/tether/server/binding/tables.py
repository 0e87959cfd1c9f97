"""SQL tables of this area (none yet)."""
