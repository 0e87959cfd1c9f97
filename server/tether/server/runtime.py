"""What every servicer shares: settings, the database, Redis, the digester."""

from __future__ import annotations

from dataclasses import dataclass, field

import redis.asyncio as redis

from tether.server.transport.credentials import CredentialVerifier
from tether.server.shared.bindings import BindingListener
from tether.server.shared.digests import Digester
from tether.server.settings import Settings
from tether.server.storage.database import Database


@dataclass
class Runtime:
    settings: Settings
    db: Database
    redis: redis.Redis
    digester: Digester
    credentials: CredentialVerifier
    # Told of every binding change inside its transaction (provisioning's outbox).
    binding_listeners: list[BindingListener] = field(default_factory=list)
