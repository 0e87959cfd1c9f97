"""The provisioning area (see docs/architecture.md)."""
