"""gRPC concerns shared by every service: who calls (credentials, principal),
the authenticating handler and error mapping, request ids, paging."""
