"""Responses as the command-line tools print them: the proto JSON mapping
(camelCase names, enum names, every field shown), except that 64-bit
integers are numbers. The mapping writes them as strings for JavaScript's
sake; a person or `jq` reading a count wants a number."""

from __future__ import annotations

from typing import Any, cast

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

_INT64 = frozenset(
    {
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED64,
    }
)


def as_dict(message: Message) -> dict[str, Any]:
    data = json_format.MessageToDict(message, always_print_fields_with_no_presence=True)
    _numbers(cast(Descriptor, message.DESCRIPTOR), data)
    return data


def _numbers(descriptor: Descriptor, data: dict[str, Any]) -> None:
    """Turns the 64-bit integer strings of data (a message's JSON) into ints."""
    for field in descriptor.fields:
        value = data.get(field.json_name)
        if value is None:
            continue
        data[field.json_name] = _field_value(field, value)


def _field_value(field: FieldDescriptor, value: Any) -> Any:
    kind = field.message_type
    if kind is not None and kind.GetOptions().map_entry:
        value_field = kind.fields_by_name["value"]
        return {k: _single(value_field, v) for k, v in value.items()}
    if field.is_repeated:
        return [_single(field, v) for v in value]
    return _single(field, value)


def _single(field: FieldDescriptor, value: Any) -> Any:
    if field.type in _INT64:
        return int(value)
    kind = field.message_type
    # Well-known types (timestamps, durations...) have JSON forms of their own.
    if kind is not None and not kind.full_name.startswith("google.protobuf."):
        _numbers(kind, value)
    return value
