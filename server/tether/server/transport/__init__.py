"""gRPC wiring shared by every service: auth, error mapping, idempotency, paging."""
