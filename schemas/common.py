"""Building blocks every contract shares: the base model, identifiers, bounded JSON payloads."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    StringConstraints,
)

SCHEMA_VERSION = 1

# Tenant, flow and step ids become words of AMQP routing keys (`<tenant>.<flow>.<entity>.<state>`)
# and parts of queue names (`fq.<tenant>`), so they may not contain dots or wildcards. Lower
# case only, so two ids never differ by case alone.
SLUG_PATTERN = r"^[a-z0-9](?:[a-z0-9_-]{0,62}[a-z0-9])?$"
Slug = Annotated[str, StringConstraints(pattern=SLUG_PATTERN)]
TenantId = Annotated[str, StringConstraints(pattern=SLUG_PATTERN), Field(examples=["acme"])]
FlowId = Annotated[str, StringConstraints(pattern=SLUG_PATTERN), Field(examples=["daily-sync"])]
StepId = Annotated[str, StringConstraints(pattern=SLUG_PATTERN), Field(examples=["fetch"])]

# Step types are names of handlers (`http.request`), never routing-key words, so dots are fine.
StepType = Annotated[
    str,
    StringConstraints(pattern=r"^[a-z0-9][a-z0-9_.-]{0,126}[a-z0-9]$"),
    Field(examples=["http.request"]),
]

# Message ids are opaque to consumers, but bounded, printable and without whitespace so they
# survive as AMQP properties, Redis keys and log fields.
MessageId = Annotated[str, StringConstraints(pattern=r"^[\x21-\x7e]{1,256}$")]
ShortText = Annotated[str, StringConstraints(max_length=1024)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=200)]

# A payload (flow input, step output) is bounded so one tenant cannot fill the broker's memory
# or a Redis value with a single message. Big data belongs in object storage, passed by reference.
MAX_PAYLOAD_BYTES = 256 * 1024


def _bounded_json(value: dict[str, JsonValue]) -> dict[str, JsonValue]:
    # allow_nan=False: NaN and Infinity are not JSON (RFC 8259), whatever parsers accept.
    try:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except ValueError:
        raise ValueError("payload holds NaN or Infinity, which JSON does not allow") from None
    size = len(text.encode())
    if size > MAX_PAYLOAD_BYTES:
        raise ValueError(f"payload is {size} bytes, the limit is {MAX_PAYLOAD_BYTES}")
    return value


Payload = Annotated[dict[str, JsonValue], AfterValidator(_bounded_json)]


def _not_bool(value: object) -> object:
    # `true == 1` in Python, and pydantic's Literal[1] matches it even in strict mode; the
    # JSON Schema says integer.
    if isinstance(value, bool):
        raise ValueError("expected the integer 1, got a boolean")  # noqa: TRY004 - pydantic reports ValueError
    return value


SchemaVersion = Annotated[Literal[1], BeforeValidator(_not_bool)]


def utcnow() -> datetime:
    return datetime.now(UTC)


class Contract(BaseModel):
    """Strict base for every model on the wire or in a file: unknown fields are errors."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, str_max_length=64 * 1024, allow_inf_nan=False
    )


class Message(Contract):
    """A message on a broker. `message_type` names it in the AMQP `type` property."""

    message_type: ClassVar[str]
    # The AMQP content type it travels with.
    content_type: ClassVar[str] = "application/json"
    schema_version: SchemaVersion = 1  # SCHEMA_VERSION; bump both together

    def message_id(self) -> str:
        """The stable id consumers deduplicate on (AMQP `message_id`, Kafka key suffix)."""
        raise NotImplementedError

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=False).encode()

    @classmethod
    def from_bytes(cls, body: bytes | str) -> Any:
        return cls.model_validate_json(body)


# RFC 3339, as the JSON Schema's `format: date-time` says: what pydantic would also take
# (a Unix time as a number or a numeric string, a date-time without seconds) is refused.
_RFC3339 = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?(?:[Zz]|[+-]\d{2}:\d{2})$"
)


def _rfc3339(value: object) -> object:
    """Parses RFC 3339 text itself, so strict validation downstream sees a datetime."""
    if isinstance(value, datetime):
        return value
    if isinstance(value, str) and _RFC3339.match(value):
        try:
            return datetime.fromisoformat(value.upper())
        except ValueError:
            pass  # e.g. month 13: refused below
    raise ValueError("expected an RFC 3339 date-time, e.g. 2026-03-29T01:30:00Z")


Timestamp = Annotated[AwareDatetime, BeforeValidator(_rfc3339)]
