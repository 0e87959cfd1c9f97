"""phonenumbers.is_valid_number for numbers given as country code and digits, faster.

Bulk imports validate hundreds of thousands of numbers, and
is_valid_number spends most of its time on bookkeeping: it looks each
number-type pattern up in a cache and tries up to ten of them one by one
(fixed line and mobile, the common answers, come last). Validity needs only
"some type matches", so per region and number length everything collapses
into one precompiled regular expression, built once from the same metadata
and applied with the same rules:

- a type matches if the length is one of its possible lengths (or it lists
  none) and its pattern matches the whole number;
- a number is valid for a region if the general pattern and some type
  match; the mobile type is skipped where the metadata marks mobile and
  fixed line patterns as the same (is_valid_number skips it there too);
- a country code shared by several regions (+1, +7, +44...) resolves to the
  first region, in phonenumbers' order, whose leading digits start the
  number or, for a region without leading digits, that the number is valid
  for; the number is valid if it is valid for that region.

tests/test_binding_accounts.py checks the answers against is_valid_number
itself for numbers of every country code, valid and invalid.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

from phonenumbers import COUNTRY_CODE_TO_REGION_CODE, PhoneMetadata
from phonenumbers.phonemetadata import REGION_CODE_FOR_NON_GEO_ENTITY, PhoneNumberDesc

# Checks a national significant number of one length: valid for the region or not.
LengthCheck = Callable[[str], object]


@dataclass(frozen=True)
class _Region:
    # A number starting like this belongs to this region (None: decide by validity).
    leading_digits: re.Pattern[str] | None
    # One check per number length that can be valid at all.
    checks: dict[int, LengthCheck]

    def valid(self, national: str) -> bool:
        check = self.checks.get(len(national))
        return check is not None and check(national) is not None


def is_valid(country_code: int, national: str) -> bool:
    """What is_valid_number answers for +country_code national.

    national is the national significant number: digits only, and without
    a leading zero (numbers with one carry it as "italian leading zero"
    state, which this does not model; callers take the slow path for them).
    """
    regions = _regions(country_code)
    if len(regions) == 1:
        return regions[0].valid(national)
    for region in regions:
        if region.leading_digits is not None:
            if region.leading_digits.match(national):
                return region.valid(national)
        elif region.valid(national):
            return True
    return False


@cache
def _regions(country_code: int) -> tuple[_Region, ...]:
    """The regions of a country code, in the order is_valid_number tries them."""
    regions = []
    for region_code in COUNTRY_CODE_TO_REGION_CODE.get(country_code, ()):
        metadata = PhoneMetadata.metadata_for_region_or_calling_code(
            country_code, region_code.upper()
        )
        if metadata is None:
            continue
        if region_code != REGION_CODE_FOR_NON_GEO_ENTITY and metadata.country_code != country_code:
            # is_valid_number_for_region refuses such a region outright.
            checks: dict[int, LengthCheck] = {}
        else:
            checks = _length_checks(metadata)
        leading = metadata.leading_digits
        regions.append(_Region(re.compile(leading) if leading is not None else None, checks))
    return tuple(regions)


def _length_checks(metadata: PhoneMetadata) -> dict[int, LengthCheck]:
    types = [
        metadata.premium_rate,
        metadata.toll_free,
        metadata.shared_cost,
        metadata.voip,
        metadata.personal_number,
        metadata.pager,
        metadata.uan,
        metadata.voicemail,
        metadata.fixed_line,
    ]
    if not metadata.same_mobile_and_fixed_line_pattern:
        types.append(metadata.mobile)
    general = metadata.general_desc
    checks: dict[int, LengthCheck] = {}
    if general is None:
        return checks  # no number matches a missing general description
    # The general description lists every length a number can have; E.164
    # allows at most 17 digits, should it list none.
    for length in general.possible_length or range(1, 18):
        if _pattern_for(general, length) is None:
            continue
        alternatives = [p for p in (_pattern_for(d, length) for d in types) if p is not None]
        if alternatives:
            # The lookahead demands the general pattern over the whole number;
            # the alternation then demands one of the types over it.
            both = f"(?={_pattern_for(general, length)}\\Z)(?:{'|'.join(alternatives)})"
            checks[length] = re.compile(both).fullmatch
    return checks


def _pattern_for(desc: PhoneNumberDesc | None, length: int) -> str | None:
    """The pattern a number of this length must match for desc, None if it cannot."""
    if desc is None or not desc.national_number_pattern:
        return None
    if desc.possible_length and length not in desc.possible_length:
        return None
    return f"(?:{desc.national_number_pattern})"
