"""Checks shared by every area: ids, names, free text."""

from __future__ import annotations

import re

from tether.server.errors import Violations

SLUG = re.compile(r"^[a-z][a-z0-9-]{2,62}\Z")


def check_slug(value: str, path: str, violations: Violations) -> None:
    if not value:
        violations.add(path, "required")
    elif not SLUG.match(value):
        violations.add(path, "3-63 characters of a-z, 0-9 and '-', starting with a letter")


def check_text(
    value: str, path: str, violations: Violations, *, max_len: int, required: bool = False
) -> None:
    if required and not value.strip():
        violations.add(path, "required")
    elif len(value) > max_len:
        violations.add(path, f"at most {max_len} characters")
    elif any(not c.isprintable() and c not in "\n\t" for c in value):
        violations.add(path, "control characters are not allowed")
