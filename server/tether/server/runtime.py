"""What every area shares: settings, the database, Redis, the digester,
and the credential verifier."""

from __future__ import annotations

from dataclasses import dataclass

from tether.server.counters.connection import Client
from tether.server.settings import Settings
from tether.server.shared.digests import Digester
from tether.server.storage.database import Database
from tether.server.transport.credentials import CredentialVerifier


@dataclass(frozen=True)
class Runtime:
    settings: Settings
    db: Database
    # A single Redis or a cluster (counters.connection).
    redis: Client
    digester: Digester
    credentials: CredentialVerifier
