"""Accounts and devices, checked and brought to their canonical form.

A Subject is what gets digested: the kind and the normalized value. The
checks collect every bad field into a Violations, so a caller sees them all.
"""

from __future__ import annotations

from dataclasses import dataclass

from tether.server.errors import Violations
from tether.server.shared import accounts
from tether.server.shared.digests import Digester


@dataclass(frozen=True)
class Subject:
    # An account kind ("phone_number") or a terminal id kind ("imei").
    kind: str
    # Normalized; never stored, only digested.
    value: str

    def digest(self, digester: Digester) -> bytes:
        """The digest new rows store."""
        return digester.digest(self.kind, self.value)

    def candidates(self, digester: Digester) -> list[bytes]:
        """Every digest a stored row of this subject may carry (key rotation)."""
        return digester.candidates(self.kind, self.value)


def account(
    kind: str, value: str, region_hint: str, path: str, violations: Violations
) -> Subject | None:
    """kind is "" when the caller left it unspecified."""
    if kind not in accounts.ACCOUNT_KINDS:
        violations.add(f"{path}.kind", "required: one of the ACCOUNT_KIND_* values")
        return None
    try:
        return Subject(kind, accounts.normalize_account(kind, value, region_hint))
    except ValueError as exc:
        violations.add(f"{path}.value", str(exc))
        return None


def device(kind: str, terminal_id: str, path: str, violations: Violations) -> Subject | None:
    if not kind and not terminal_id:
        violations.add(path, "required")
        return None
    if kind not in accounts.TERMINAL_ID_KINDS:
        violations.add(f"{path}.kind", "required: one of the TERMINAL_ID_KIND_* values")
        return None
    try:
        return Subject(kind, accounts.normalize_terminal_id(kind, terminal_id))
    except ValueError as exc:
        violations.add(f"{path}.terminal_id", str(exc))
        return None
