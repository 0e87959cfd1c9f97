"""FingerprintGuard: the client library and tether-internal commands."""
