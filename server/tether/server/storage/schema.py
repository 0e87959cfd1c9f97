"""Imports every area's tables so Base.metadata holds the whole schema."""

from tether.server.admin import tables as admin_tables
from tether.server.binding import tables as binding_tables
from tether.server.guard import tables as guard_tables
from tether.server.provisioning import tables as provisioning_tables
from tether.server.storage.base import Base
from tether.server.transport import idempotency

metadata = Base.metadata

__all__ = [
    "admin_tables",
    "binding_tables",
    "guard_tables",
    "idempotency",
    "metadata",
    "provisioning_tables",
]
