"""The E.164 fast path of phone number normalization agrees with phonenumbers."""

from __future__ import annotations

import random

import phonenumbers
import pytest

from tether.server.binding.accounts import normalize_account


def _slow(value: str) -> str | None:
    """What phonenumbers alone makes of a value: its E.164 form, or None if invalid."""
    try:
        number = phonenumbers.parse(value, None)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(number):
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def _fast(value: str) -> str | None:
    try:
        return normalize_account("phone_number", value)
    except ValueError:
        return None


def _variants(rng: random.Random) -> list[str]:
    """Example numbers of every region and type, with their last digits changed."""
    values = []
    for region in sorted(phonenumbers.SUPPORTED_REGIONS):
        for kind in phonenumbers.PhoneNumberType.values():
            example = phonenumbers.example_number_for_type(region, kind)
            if example is None:
                continue
            e164 = phonenumbers.format_number(example, phonenumbers.PhoneNumberFormat.E164)
            values += [e164, e164[:-1], e164 + "7", e164[:-3] + f"{rng.randrange(1000):03d}"]
    return values


def test_every_region_normalizes_as_phonenumbers_does() -> None:
    values = _variants(random.Random(7))
    assert len(values) > 1000
    mismatches = [(v, _fast(v), _slow(v)) for v in values if _fast(v) != _slow(v)]
    assert mismatches == []


@pytest.mark.parametrize(
    "value", ["+4915112345678", "+390612345678", "+12015550123", "+8613800138000"]
)
def test_numbers_in_e164_stay_as_they_are(value: str) -> None:
    assert normalize_account("phone_number", value) == _slow(value) == value
