"""Client libraries and command-line tools for Tether's callers: devices,
partners, internal services and administrators. Thin layers over the
generated stubs."""
