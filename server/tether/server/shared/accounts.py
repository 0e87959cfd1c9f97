"""Validation and normalization of accounts and terminal ids.

Two spellings of one account must give one digest, so everything is brought
to a canonical form first: phone numbers to E.164, e-mail addresses to lower
case, IMEIs to their 15 digits. Each function raises ValueError with a
description a caller can act on.
"""

from __future__ import annotations

import re
from functools import cache

import phonenumbers
from email_validator import EmailNotValidError, validate_email
from phonenumbers import COUNTRY_CODE_TO_REGION_CODE, PhoneMetadata
from stdnum import imei, meid

from tether.server.shared import phone_validity

ACCOUNT_KINDS = ("phone_number", "member_id", "email", "social_id", "login_id")
TERMINAL_ID_KINDS = ("imei", "meid", "serial_number")

MAX_VALUE = 254
_OPAQUE_ID = re.compile(r"^[A-Za-z0-9._:@+-]{1,128}\Z")
_SERIAL = re.compile(r"^[A-Za-z0-9._:-]{4,64}\Z")
_SEPARATORS = re.compile(r"[\s-]")
# "+", a country code and a national number, digits only: the shape partners
# usually send, and the one the fast path below understands.
_E164_SHAPE = re.compile(r"^\+[1-9][0-9]{6,16}\Z")


def normalize_account(kind: str, value: str, region_hint: str = "") -> str:
    if not value:
        raise ValueError("required")
    if len(value) > MAX_VALUE:
        raise ValueError(f"at most {MAX_VALUE} characters")
    if kind == "phone_number":
        return _phone(value, region_hint)
    if kind == "email":
        return _email(value)
    if kind in ("member_id", "social_id", "login_id"):
        if not _OPAQUE_ID.match(value):
            raise ValueError("1-128 characters of A-Z, a-z, 0-9 and . _ : @ + -")
        return value
    raise ValueError(f"unknown account kind {kind!r}")


def _phone(value: str, region_hint: str) -> str:
    region = region_hint.upper() or None
    if region is not None and region not in phonenumbers.SUPPORTED_REGIONS:
        raise ValueError(f"unknown region_hint {region_hint!r}")
    if _E164_SHAPE.match(value):
        fast = _e164_fast(value)
        if fast is not None:
            return fast
    try:
        number = phonenumbers.parse(value, region)
    except phonenumbers.NumberParseException as exc:
        raise ValueError(
            "not a phone number; use E.164 (+4915112345678) or give region_hint"
        ) from exc
    if not phonenumbers.is_valid_number(number):
        raise ValueError("not a valid phone number for its region")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def _e164_fast(value: str) -> str | None:
    """The E.164 form of an already E.164-looking number, or None to take the slow path.

    phonenumbers.parse spends most of its time on inputs this shape never
    has (letters, extensions, national formats). Here the country code is
    read directly and the number still goes through the full is_valid_number
    check (phone_validity's faster equivalent), so nothing invalid gets in.
    Whenever parse could read the digits differently (a national prefix it
    might strip), or the number looks invalid, we answer None and let parse
    decide, so both paths always agree. Leading zeros (Italian numbers) need
    no care: parse keeps them as "italian leading zero" state, and both
    validation and E.164 formatting put them back in front of the digits.
    """
    digits = value[1:]
    for length in (1, 2, 3):
        country_code = int(digits[:length])
        if country_code in COUNTRY_CODE_TO_REGION_CODE:
            national = digits[length:]
            break
    else:
        return None
    if not national or _national_prefix(country_code, national):
        return None
    if not phone_validity.is_valid(country_code, national):
        return None
    return value


def _national_prefix(country_code: int, national: str) -> bool:
    return any(p.match(national) for p in _national_prefix_patterns(country_code))


@cache
def _national_prefix_patterns(country_code: int) -> tuple[re.Pattern[str], ...]:
    """What parse may strip as a national prefix, for every region of the code."""
    patterns: dict[str, None] = {}  # the distinct ones, in order: +1 has 25 regions of "1"
    for region in COUNTRY_CODE_TO_REGION_CODE[country_code]:
        metadata = PhoneMetadata.metadata_for_region_or_calling_code(country_code, region)
        if metadata is None:
            continue
        for prefix in (metadata.national_prefix_for_parsing, metadata.national_prefix):
            if prefix:
                patterns[prefix] = None
    return tuple(re.compile(prefix) for prefix in patterns)


def _email(value: str) -> str:
    try:
        parsed = validate_email(value, check_deliverability=False)
    except EmailNotValidError as exc:
        raise ValueError(f"not an e-mail address: {exc}") from exc
    # Providers treat the local part case-insensitively in practice; one
    # spelling per mailbox is what makes list matching work.
    return parsed.normalized.lower()


def normalize_terminal_id(kind: str, value: str) -> str:
    if not value:
        raise ValueError("required")
    if len(value) > 64:
        raise ValueError("at most 64 characters")
    if kind == "imei":
        digits = _SEPARATORS.sub("", value)
        if not (len(digits) == 15 and digits.isdigit()):
            raise ValueError("an IMEI has 15 digits")
        if not imei.is_valid(digits):
            raise ValueError("IMEI check digit (Luhn) does not match")
        return digits
    if kind == "meid":
        compact = _SEPARATORS.sub("", value).upper()
        if len(compact) != 14 or not meid.is_valid(compact):
            raise ValueError("a MEID has 14 hexadecimal digits")
        return compact
    if kind == "serial_number":
        if not _SERIAL.match(value):
            raise ValueError("4-64 characters of A-Z, a-z, 0-9 and . _ : -")
        return value
    raise ValueError(f"unknown terminal id kind {kind!r}")
