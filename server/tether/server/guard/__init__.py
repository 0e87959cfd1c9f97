"""The guard area (see docs/architecture.md)."""
