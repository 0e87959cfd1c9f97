"""The E.164 fast path of phone number normalization agrees with phonenumbers."""

from __future__ import annotations

import random

import phonenumbers
import pytest

from tether.server.shared import phone_validity
from tether.server.shared.accounts import normalize_account


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


def _examples() -> list[phonenumbers.PhoneNumber]:
    """An example number of every type of every region and non-geographic code."""
    examples = []
    for region in sorted(phonenumbers.SUPPORTED_REGIONS):
        for kind in phonenumbers.PhoneNumberType.values():
            examples.append(phonenumbers.example_number_for_type(region, kind))
    for code in sorted(phonenumbers.COUNTRY_CODES_FOR_NON_GEO_REGIONS):
        examples.append(phonenumbers.example_number_for_non_geo_entity(code))
    return [e for e in examples if e is not None]


def _variants(rng: random.Random) -> list[str]:
    """Example numbers with their last digits changed, shortened, lengthened,
    given a leading zero; and random digits after every country code."""
    values = []
    for example in _examples():
        e164 = phonenumbers.format_number(example, phonenumbers.PhoneNumberFormat.E164)
        code = f"+{example.country_code}"
        national = e164.removeprefix(code)
        values += [e164, e164[:-1], e164 + "7", code + "0" + national]
        for changed in (1, 2, 3, 4, 6):
            values.append(e164[:-changed] + "".join(rng.choices("0123456789", k=changed)))
    for country_code in sorted(phonenumbers.COUNTRY_CODE_TO_REGION_CODE):
        for _ in range(40):
            length = rng.randrange(4, 15)
            values.append(f"+{country_code}" + "".join(rng.choices("0123456789", k=length)))
    return values


def test_every_region_normalizes_as_phonenumbers_does() -> None:
    values = _variants(random.Random(7))
    assert len(values) > 20_000
    mismatches = [(v, _fast(v), _slow(v)) for v in values if _fast(v) != _slow(v)]
    assert mismatches == []
    # Not vacuous: the sample holds many valid and many invalid numbers.
    valid = sum(_slow(v) is not None for v in values)
    assert 5_000 < valid < len(values) - 5_000


def test_validity_check_answers_as_is_valid_number() -> None:
    rng = random.Random(11)
    numbers = [phonenumbers.parse(v) for v in _variants(rng) if _parses(v)]
    for example in _examples():
        assert example.country_code is not None
        # Every national number length around the example's, with leading zeros too.
        digits = phonenumbers.national_significant_number(example)
        for length in range(max(len(digits) - 3, 2), len(digits) + 3):
            for first in ("0", "00", digits[0], str(rng.randrange(1, 10))):
                tail = "".join(rng.choices("0123456789", k=max(length - len(first), 0)))
                numbers.append(_number(example.country_code, first + tail))
    mismatches = [
        (n.country_code, phonenumbers.national_significant_number(n))
        for n in numbers
        if phone_validity.is_valid(n.country_code or 0, phonenumbers.national_significant_number(n))
        != phonenumbers.is_valid_number(n)
    ]
    assert mismatches == []
    valid = sum(map(phonenumbers.is_valid_number, numbers))
    assert 10_000 < valid < len(numbers) - 10_000


def _parses(value: str) -> bool:
    try:
        phonenumbers.parse(value)
    except phonenumbers.NumberParseException:
        return False
    return True


def _number(country_code: int, national: str) -> phonenumbers.PhoneNumber:
    """The number parse makes of +country_code national, leading zeros included."""
    number = phonenumbers.PhoneNumber(country_code=country_code, national_number=int(national))
    zeros = len(national) - len(national.lstrip("0"))
    if zeros and len(national) > 1:
        number.italian_leading_zero = True
        number.number_of_leading_zeros = min(zeros, len(national) - 1)
    return number


@pytest.mark.parametrize(
    "value", ["+4915112345678", "+390612345678", "+12015550123", "+8613800138000"]
)
def test_numbers_in_e164_stay_as_they_are(value: str) -> None:
    assert normalize_account("phone_number", value) == _slow(value) == value
