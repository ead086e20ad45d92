"""Unit tests of consumer.handler: payload decoding, idempotency keys and declaration checks."""

from __future__ import annotations

from typing import Any, ClassVar

import pydantic
import pytest

from consumer import errors
from consumer.handler import MAX_KEY_LENGTH, Handler, build_message
from consumer.message import RawMessage

pytestmark = pytest.mark.unit


class Order(pydantic.BaseModel):
    order_id: str
    amount: int


class JsonHandler(Handler[Any]):
    topics: ClassVar[list[str]] = ["orders"]
    group_id = "unit"


class TextHandler(JsonHandler):
    payload_format = "text"


class BytesHandler(JsonHandler):
    payload_format = "bytes"


class ModelHandler(JsonHandler):
    payload_model = Order


def raw(value: bytes | None, headers: tuple[tuple[str, bytes | None], ...] = ()) -> RawMessage:
    return RawMessage(topic="orders", partition=2, offset=17, key=b"k", value=value, headers=headers)


def decode_error(handler: Handler[Any], value: bytes) -> errors.DecodeError:
    with pytest.raises(errors.DecodeError) as raised:
        handler.decode(raw(value))
    return raised.value


def test_decode_json() -> None:
    assert JsonHandler().decode(raw(b'{"a": [1, 2]}')) == {"a": [1, 2]}


def test_decode_text() -> None:
    assert TextHandler().decode(raw("caf\u00e9".encode())) == "caf\u00e9"


def test_decode_bytes_unchanged() -> None:
    value = b"\xff\x00\xfe"

    assert BytesHandler().decode(raw(value)) == value


def test_decode_payload_model() -> None:
    assert ModelHandler().decode(raw(b'{"order_id": "o-1", "amount": 3}')) == Order(order_id="o-1", amount=3)


@pytest.mark.parametrize("handler", [JsonHandler(), TextHandler(), ModelHandler()], ids=type)
def test_decode_null_value_is_none(handler: Handler[Any]) -> None:
    assert handler.decode(raw(None)) is None


def test_decode_invalid_utf8_is_decode_error() -> None:
    for handler in (JsonHandler(), TextHandler()):
        error = decode_error(handler, b"\xff\xfe{not json")

        assert error.reason == "decode"
        assert "not UTF-8" in str(error)


def test_decode_invalid_json_is_decode_error() -> None:
    error = decode_error(JsonHandler(), b"{not json")

    assert error.reason == "decode"
    assert "not JSON" in str(error)
    assert "line 1 column 2" in str(error)


def test_decode_model_invalid_json_is_decode_error() -> None:
    for value in (b"{not json", b"\xff\xfe{not json"):
        error = decode_error(ModelHandler(), value)

        assert error.reason == "decode", value
        assert "not valid JSON" in str(error), value


def test_decode_model_schema_mismatch_is_validation_error() -> None:
    error = decode_error(ModelHandler(), b'{"order_id": 4}')

    assert error.reason == "validation"
    assert "Order" in str(error)
    assert "order_id" in str(error)
    assert "(2 error(s))" in str(error)


def test_decode_error_omits_payload() -> None:
    error = decode_error(ModelHandler(), b'{"order_id": "secret-card-4111", "amount": "many"}')

    assert "secret-card-4111" not in str(error)


def test_key_from_header_ignoring_case() -> None:
    message = build_message(JsonHandler(), raw(b"{}", headers=(("idempotency-key", b"order-9"),)))

    assert message.idempotency_key == "order-9"
    assert message.keyed is True


def test_key_defaults_to_position() -> None:
    message = build_message(JsonHandler(), raw(b"{}"))

    assert message.idempotency_key == "orders/2/17"
    assert message.keyed is False


def test_key_header_not_utf8_is_decode_error() -> None:
    with pytest.raises(errors.DecodeError, match="not UTF-8"):
        build_message(JsonHandler(), raw(b"{}", headers=(("Idempotency-Key", b"\xff"),)))


def test_key_too_long_is_validation_error() -> None:
    long_key = ("k" * (MAX_KEY_LENGTH + 1)).encode()

    with pytest.raises(errors.DecodeError) as raised:
        build_message(JsonHandler(), raw(b"{}", headers=(("Idempotency-Key", long_key),)))

    assert raised.value.reason == "validation"
    assert str(MAX_KEY_LENGTH) in str(raised.value)


def test_key_of_max_length_accepted() -> None:
    key = "k" * MAX_KEY_LENGTH

    message = build_message(JsonHandler(), raw(b"{}", headers=(("Idempotency-Key", key.encode()),)))

    assert message.idempotency_key == key


def test_empty_key_from_override_is_validation_error() -> None:
    class EmptyKeyHandler(JsonHandler):
        def idempotency_key(self, message: Any) -> str | None:
            return ""

    with pytest.raises(errors.DecodeError) as raised:
        build_message(EmptyKeyHandler(), raw(b"{}"))

    assert raised.value.reason == "validation"


def test_tombstone_policy_defaults() -> None:
    assert JsonHandler.tombstone_policy() == "handle"
    assert ModelHandler.tombstone_policy() == "dead_letter"


def declaration_error(**attributes: Any) -> str:
    handler_class: type[Handler[Any]] = type("Declared", (JsonHandler,), attributes)
    with pytest.raises(errors.HandlerRegistrationError) as raised:
        handler_class.validate_declaration()
    return str(raised.value)


def test_declaration_valid() -> None:
    JsonHandler.validate_declaration()
    ModelHandler.validate_declaration()


def test_declaration_topics_string_rejected() -> None:
    message = declaration_error(topics="orders")

    assert "string 'orders'" in message
    assert "['orders']" in message


@pytest.mark.parametrize("topics", [[], (), [""]], ids=["empty-list", "empty-tuple", "blank-name"])
def test_declaration_empty_topics_rejected(topics: Any) -> None:
    assert "topics is empty" in declaration_error(topics=topics)


def test_declaration_duplicate_topic_rejected() -> None:
    assert "lists a topic twice" in declaration_error(topics=["orders", "refunds", "orders"])


def test_declaration_missing_group_rejected() -> None:
    assert "group_id is empty" in declaration_error(group_id="")


@pytest.mark.parametrize(
    ("attribute", "value"),
    [
        ("payload_format", "xml"),
        ("failure_mode", "skip"),
        ("on_key_conflict", "ignore"),
        ("tombstones", "drop"),
    ],
)
def test_declaration_invalid_choice_rejected(attribute: str, value: str) -> None:
    message = declaration_error(**{attribute: value})

    assert attribute in message
    assert repr(value) in message
