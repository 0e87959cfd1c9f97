"""The binding area (see docs/architecture.md)."""
