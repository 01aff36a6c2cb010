"""Fuzzing every consuming queue with malformed messages, mixed with valid flow starts.

Hypothesis generates a corpus of messages that are invalid *by construction* for the queue
they are sent to: each one breaks its body (against the published JSON Schema in
`schemas/json/`, or JSON itself) or an AMQP property (one the frame reader cannot decode, a
wrong content type or message type), and carries odd but legal properties besides (empty,
non-ASCII or duplicate message ids, strange header tables, priorities, routing keys). A raw
AMQP client (tests/rawamqp.py) publishes them, interleaved with valid flow-start requests for
a registered flow. Every kind of breakage is tried on every queue first (the coverage plan:
so huge bodies and deep nesting are always in), then Hypothesis draws the rest. Then:

- every bad message is in the DLQ of the queue it was sent to (read by consuming the DLQs),
  with `orch-reason` (a reason of the decoder: no handler ever ran on it), `orch-detail` and
  `orch-queue`; the copies of bad step results on `dispatcher.completions` (consumed without
  acks) are counted as dropped instead;
- nothing else is in a DLQ: no valid message was dead-lettered;
- every valid request was accepted and its execution ended exactly once, succeeded;
- the services' connection never reconnected, no service task ended, nothing logged a
  failed consumer callback or an unretrieved task exception.

Reproduce a run (the seed and the count are printed in the summary line):

    eval "$(scripts/infra env)"
    CI=true ORCH_FUZZ_SEED=20260329 ORCH_FUZZ_COUNT=1000 .venv/bin/pytest tests/fuzz -s

`ORCH_FUZZ_COUNT` is the number of distinct bad messages (default 1000; some are sent twice),
`ORCH_FUZZ_SEED` the Hypothesis seed (default fixed, so CI runs the same corpus; any integer
gives another corpus, reproducibly).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import struct
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hypothesis
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from hypothesis import HealthCheck, Phase, given
from hypothesis import strategies as st
from pamqp import commands

import schemas
from orchestrator import topology
from orchestrator.amqp import DETAIL_HEADER, QUEUE_HEADER, REASON_HEADER, publish
from orchestrator.config import Settings
from orchestrator.consumer import DROPPED
from orchestrator.frames import BAD_PROPERTIES_HEADER
from schemas import MESSAGES, FlowStartRequested
from tests.factories import sample
from tests.integration.helpers import fresh_settings, purged
from tests.integration.system import running_system
from tests.rawamqp import FRAME_END, RawProperties, RawPublisher, shortstr

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.integration]

COUNT = int(os.environ.get("ORCH_FUZZ_COUNT", "1000"))
SEED = int(os.environ.get("ORCH_FUZZ_SEED", "20260329"))
VALID_EVERY = 8  # one valid flow start after every 8 bad messages
WAIT_S = 120.0

FLOW = {
    "tenant": "acme",
    "id": "echo",
    "overlap": "allow",
    "steps": [{"id": "a", "type": "demo.echo"}],
}

# Reasons `decode` / `decode_any` give (orchestrator.amqp). A bad message must be refused by the
# decoder: a handler-level reason (unknown_flow, handler_error, ...) means it got past it.
BODY = frozenset({"malformed_json", "schema_violation", "too_deep"})
BAD_PROPERTIES = frozenset({"bad_properties"})
TOO_LARGE = frozenset({"too_large"})
BAD_CONTENT_TYPE = frozenset({"bad_content_type"})
WRONG_TYPE = frozenset({"wrong_message_type"})
# The order decode checks in: the first defect a message has decides its reason.
PRECEDENCE = (BAD_PROPERTIES, TOO_LARGE, BAD_CONTENT_TYPE, WRONG_TYPE, BODY)

MIB = 1024 * 1024
PAYLOAD_LIMIT = 256 * 1024


# ------------------------------------------------------------------------------ the queues
@dataclass(frozen=True)
class Target:
    queue: str
    exchange: str
    keys: tuple[bytes, ...]
    types: tuple[str, ...]  # the message types the queue accepts


CONTROL_TYPES = ("control.penalty", "control.quarantine", "control.release")
TARGETS = (
    Target(
        topology.ingress_queue_name("acme"),
        topology.COMMANDS,
        (topology.flow_start_key("acme").encode(),),
        ("flow.start.requested",),
    ),
    Target(
        topology.EXECUTIONS_QUEUE,
        topology.COMMANDS,
        (b"execution.requested",),
        ("execution.requested",),
    ),
    Target(
        topology.QUERIES_QUEUE,
        topology.COMMANDS,
        (topology.query_key("acme").encode(), topology.query_key(topology.NO_TENANT).encode()),
        ("execution.query", "execution.list"),
    ),
    Target(
        topology.CANCELS_QUEUE,
        topology.COMMANDS,
        (topology.cancel_key("acme").encode(),),
        ("execution.cancel",),
    ),
    # Also routed to dispatcher.completions, where bad ones are dropped (no DLQ).
    Target(topology.RESULTS_QUEUE, topology.COMMANDS, (b"step.result",), ("step.result",)),
    Target(
        topology.CONTROL_QUEUE,
        topology.CONTROL,  # bound with `#`: any routing key arrives
        (
            b"penalty.acme",
            b"quarantine.acme",
            b"release.acme",
            b"penalty.globex",
            b"",
            b"#",
            b"penalty.\xff\xfe",  # not UTF-8: the frame reader's lenient basic.deliver
            "release.\u202eemca".encode(),
            b"x" * 255,
        ),
        CONTROL_TYPES,
    ),
    Target(topology.tenant_queue_name("acme"), topology.STEPS, (b"acme",), ("step.task",)),
    Target(topology.work_queue_name("default"), topology.WORK, (b"default",), ("step.task",)),
    Target(
        topology.express_queue_name("default"),
        topology.WORK,
        (b"default.express",),
        ("step.task",),
    ),
)


# -------------------------------------------------------------------- the published contract
def _schema(message_type: str) -> dict[str, Any]:
    path = Path(schemas.__file__).parent / "json" / f"{message_type}.json"
    loaded: dict[str, Any] = json.loads(path.read_text())
    return loaded


SCHEMAS = {t: _schema(t) for target in TARGETS for t in target.types}
JSON_TYPES = frozenset({"string", "integer", "number", "boolean", "null", "object", "array"})


def _branches(prop: dict[str, Any], defs: dict[str, Any]) -> list[dict[str, Any]]:
    """The alternatives a property schema allows (anyOf / oneOf flattened, $ref resolved)."""
    if "$ref" in prop:
        return _branches(defs[prop["$ref"].rsplit("/", 1)[1]], defs)
    for key in ("anyOf", "oneOf"):
        if key in prop:
            return [b for sub in prop[key] for b in _branches(sub, defs)]
    return [prop]


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def allowed_types(prop: dict[str, Any], defs: dict[str, Any]) -> frozenset[str]:
    """JSON types a property accepts; a schema without `type` (JsonValue) accepts all."""
    allowed: set[str] = set()
    for branch in _branches(prop, defs):
        if "type" in branch:
            kinds = branch["type"]
            allowed.update(kinds if isinstance(kinds, list) else [kinds])
        elif "const" in branch:
            allowed.add(_json_type(branch["const"]))
        elif "enum" in branch:
            allowed.update(_json_type(v) for v in branch["enum"])
        else:
            return JSON_TYPES
    if "number" in allowed:
        allowed.add("integer")
    return frozenset(allowed)


def string_branch(prop: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any] | None:
    """The constrained string alternative of a property, if it has one."""
    for branch in _branches(prop, defs):
        if branch.get("type") == "string" and (
            "pattern" in branch
            or "enum" in branch
            or branch.get("format") == "date-time"
            or branch.get("minLength", 0) > 0
            or branch.get("maxLength", 65536) < 65536
        ):
            return branch
    return None


def numeric_branch(prop: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any] | None:
    for branch in _branches(prop, defs):
        if branch.get("type") in ("integer", "number") and (
            {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"} & set(branch)
        ):
            return branch
    return None


def valid_document(message_type: str, n: int) -> dict[str, Any]:
    """A valid message of this type, with ids of its own (so every body is unique)."""
    doc: dict[str, Any] = json.loads(sample(message_type).to_bytes())
    token = f"fuzz-{n}"
    if message_type == "flow.start.requested":
        doc["idempotency_key"] = token
    elif message_type == "execution.requested":
        doc["execution_id"] = token
        doc["fire_id"] = f"acme/daily-sync#{token}"
    elif message_type in ("step.task", "step.result"):
        doc["execution_id"] = token
        doc["task_id"] = f"{token}:a:1"
    elif message_type in ("execution.query", "execution.list"):
        doc["query_id"] = token
    elif message_type == "execution.cancel":
        doc["request_id"] = token
    else:
        doc["command_id"] = token
    return doc


def message_id_of(message_type: str, doc: dict[str, Any]) -> str:
    return str(MESSAGES[message_type].model_validate(doc).message_id())


# ------------------------------------------------------------------------ the bad messages
@dataclass
class Bad:
    n: int
    target: Target
    routing_key: bytes
    body: bytes
    props: RawProperties
    labels: list[str]  # what breaks it, then what is odd about it
    reasons: frozenset[str]  # the orch-reason it may get
    copies: int = 1

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.body).hexdigest()

    def describe(self) -> str:
        body = self.body if len(self.body) <= 160 else self.body[:160] + b"..."
        props = {name: value[:60] for name, value in self.props.values.items()}
        return (
            f"#{self.n} to {self.target.queue} (key {self.routing_key!r}), {self.labels}, "
            f"expected {sorted(self.reasons)}, props {props}, body[{len(self.body)}] {body!r}"
        )


@dataclass
class Draft:
    """A bad message being built: the body, the properties, and what is wrong with it."""

    message_type: str
    doc: dict[str, Any]
    body: bytes
    props: dict[str, bytes] = field(default_factory=dict)  # property -> wire encoding
    defects: list[frozenset[str]] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    syntactic: bool = False  # invalid as JSON / for any model, whatever the `type` says

    def reasons(self) -> frozenset[str]:
        for reasons in PRECEDENCE:
            if reasons in self.defects:
                return reasons
        raise AssertionError(f"a draft without a defect: {self.labels}")


SENTINEL = "__fuzz_raw_value__"


@functools.cache
def _index(size: int) -> st.SearchStrategy[int]:
    return st.integers(0, size - 1)


def choose(draw: st.DrawFn, options: Sequence[Any]) -> Any:
    """One of `options` (a strategy built once per length: building them costs more than
    drawing)."""
    return options[draw(_index(len(options)))]


def dump(doc: dict[str, Any], raw: bytes | None = None, *, ascii_only: bool = True) -> bytes:
    """JSON text of `doc`; the value SENTINEL, if present, is replaced by raw bytes."""
    text = json.dumps(doc, ensure_ascii=ascii_only).encode()
    if raw is not None:
        assert text.count(f'"{SENTINEL}"'.encode()) == 1
        text = text.replace(f'"{SENTINEL}"'.encode(), raw)
    return text


@functools.cache
def _invalid_utf8() -> st.SearchStrategy[bytes]:
    """Byte strings that are not UTF-8, whatever surrounds them."""
    broken = st.sampled_from(
        [
            b"\xff",
            b"\xfe\xff",
            b"\xc3\x28",  # a lead byte without its continuation
            b"\xed\xa0\x80",  # a UTF-16 surrogate encoded as UTF-8 (CESU-8)
            b"\xc0\xaf",  # an overlong "/"
            b"\xf8\x88\x80\x80\x80",  # a five-byte sequence
            b"\x80",  # a lone continuation byte
        ]
    )
    ascii_part = st.binary(max_size=20).map(lambda b: bytes(c & 0x7F for c in b))
    value = st.tuples(ascii_part, broken, ascii_part).map(lambda t: t[0] + t[1] + t[2])

    def check(b: bytes) -> bytes:
        with contextlib.suppress(UnicodeDecodeError):
            b.decode("utf-8")
            raise AssertionError(f"{b!r} is UTF-8")
        return b

    return value.map(check)


@functools.cache
def _json_value(max_leaves: int = 6) -> st.SearchStrategy[Any]:
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=12),
    )
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
        max_leaves=max_leaves,
    )


@functools.cache
def _of_type(kind: str) -> st.SearchStrategy[Any]:
    """Values of one JSON type (for a property that does not accept it)."""
    strings = st.sampled_from(
        ["", "1", "1.5", "true", "null", "{}", "2026-03-29T01:30:00Z", "NaN", "\u200b"]
    )
    return {
        "string": strings | st.text(max_size=16),
        "integer": st.integers(-(2**70), 2**70) | st.just(1774747800),  # a Unix time
        "number": st.floats(allow_nan=False, allow_infinity=False).filter(
            lambda f: not f.is_integer()
        ),
        "boolean": st.booleans(),
        "null": st.none(),
        "object": st.dictionaries(st.text(max_size=6), _json_value(4), max_size=3),
        "array": st.lists(_json_value(4), max_size=3),
    }[kind]


# Unicode look-alikes and invisible characters: for ids and enum words, always wrong.
ZERO_WIDTH = "\u200b"
RTL_OVERRIDE = "\u202e"
BOM = "\ufeff"


def _edge_variants(valid: str) -> list[str]:
    return [
        valid + ZERO_WIDTH,
        ZERO_WIDTH + valid,
        RTL_OVERRIDE + valid,
        valid[:1] + RTL_OVERRIDE + valid[1:],
        BOM + valid,
        valid.replace("a", "\u0430") if "a" in valid else valid + "\u0430",  # Cyrillic a
        valid.upper() if valid.upper() != valid else valid + "\u00c9",
        valid + "\n",
        " " + valid,
        valid + " ",
        valid + "\u0301",  # a combining accent
        valid + "\x00",
        "\uff41\uff43\uff4d\uff45",  # fullwidth "acme"
        "",
        valid + ".x",
        "*",
        "#",
        "a" * 300,
        "\U0001f600",
    ]


INVALID_DATE_TIMES = [
    "2026-03-29",
    "2026-03-29T01:30:00",  # no offset
    "2026-03-29 01:30:00Z",  # a space, not T
    "2026-13-01T00:00:00Z",
    "2026-02-30T00:00:00Z",
    "2026-03-29T25:00:00Z",
    "2026-03-29T01:30Z",  # no seconds
    "2026-03-29T01:30:00+2400",
    "1774747800",  # a Unix time as text
    "\u0662\u0660\u0662\u0666-03-29T01:30:00Z",  # Arabic-Indic digits
    "\uff12\uff10\uff12\uff16-03-29T01:30:00Z",  # fullwidth digits
    "+002026-03-29T01:30:00Z",
    "2026-03-29T01:30:00Z" + ZERO_WIDTH,
    "now",
    "",
]


def _constrained(message_type: str) -> dict[str, dict[str, Any]]:
    """Properties with a constrained string alternative, and that alternative."""
    schema = SCHEMAS[message_type]
    defs = schema.get("$defs", {})
    found = {k: string_branch(v, defs) for k, v in schema["properties"].items()}
    return {k: b for k, b in found.items() if b is not None}


def _bounded(message_type: str) -> dict[str, dict[str, Any]]:
    """Properties with a bounded numeric alternative, and that alternative."""
    schema = SCHEMAS[message_type]
    defs = schema.get("$defs", {})
    found = {k: numeric_branch(v, defs) for k, v in schema["properties"].items()}
    return {k: b for k, b in found.items() if b is not None}


@functools.cache
def _string_violation(message_type: str, name: str) -> st.SearchStrategy[str]:
    """Strings the constrained string alternative of this property refuses."""
    branch = _constrained(message_type)[name]
    current = json.loads(sample(message_type).to_bytes()).get(name)
    valid = current if isinstance(current, str) and current else "acme"
    if branch.get("format") == "date-time":
        no_digits = st.text(alphabet=st.characters(exclude_categories=["Nd"]), max_size=20)
        return st.sampled_from(INVALID_DATE_TIMES) | no_digits
    candidates = st.sampled_from(_edge_variants(valid)) | st.text(max_size=30)
    if "enum" in branch:
        members = set(branch["enum"])
        return candidates.filter(lambda s: s not in members)
    low, high = branch.get("minLength", 0), branch.get("maxLength", 65536)
    pattern = branch.get("pattern")
    too_long = st.sampled_from(["x", "\u00e9", "\U0001f600"]).map(lambda c: c * (high + 1))

    def refused(s: str) -> bool:
        if pattern is not None and not re.fullmatch(pattern, s):
            return True
        return not low <= len(s) <= high

    if pattern is None and low <= 1:
        return too_long | st.just("") if low == 1 else too_long
    return candidates.filter(refused) | too_long


@functools.cache
def _numeric_violation(message_type: str, name: str) -> st.SearchStrategy[Any]:
    branch = _bounded(message_type)[name]
    integer = branch.get("type") == "integer"
    options: list[st.SearchStrategy[Any]] = []
    if "minimum" in branch:
        low = branch["minimum"]
        options.append(
            st.integers(max_value=low - 1)
            if integer
            else st.floats(max_value=low, allow_nan=False).filter(lambda v: v < low)
        )
    if "exclusiveMinimum" in branch:
        low = branch["exclusiveMinimum"]
        options.append(
            st.integers(max_value=low)
            if integer
            else st.floats(max_value=low, allow_nan=False, allow_infinity=False).filter(
                lambda v: v <= low
            )
        )
    if "maximum" in branch:
        high = branch["maximum"]
        options.append(
            st.integers(min_value=high + 1)
            if integer
            else st.floats(min_value=high, allow_nan=False, allow_infinity=False).filter(
                lambda v: v > high
            )
        )
    return st.one_of(options)


# Body breakers: each takes (draw, draft) and breaks draft.body; all are invalid for every
# model of the queue, unless marked non-syntactic (then the draft keeps its exact `type`).
def _fields(draft: Draft) -> tuple[dict[str, Any], dict[str, Any]]:
    schema = SCHEMAS[draft.message_type]
    return schema["properties"], schema.get("$defs", {})


def garbage(draw: st.DrawFn, draft: Draft) -> None:
    prefix = choose(draw, [b"\xff", b"\x00", b"\xfe\xff", b"<xml>", b"\x89PNG\r\n", b"}{"])
    draft.body = prefix + draw(st.binary(max_size=64))
    draft.syntactic = True


def empty(draw: st.DrawFn, draft: Draft) -> None:
    draft.body = choose(draw, [b"", b" ", b"\n\t\r ", b"\x00"])
    draft.syntactic = True


def not_an_object(draw: st.DrawFn, draft: Draft) -> None:
    value = draw(_json_value().filter(lambda v: not isinstance(v, dict)) | st.just([draft.doc]))
    draft.body = json.dumps(value).encode()
    draft.syntactic = True


def truncated(draw: st.DrawFn, draft: Draft) -> None:
    text = dump(draft.doc)
    # A fraction, not a length: the choices Hypothesis makes may not depend on the ids.
    draft.body = text[: max(1, len(text) * draw(st.integers(1, 999)) // 1000)]
    draft.syntactic = True


def byte_order_mark(draw: st.DrawFn, draft: Draft) -> None:
    # RFC 8259: "Implementations MUST NOT add a byte order mark"; it is not JSON whitespace.
    mark = choose(draw, [b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff"])
    draft.body = mark + dump(draft.doc, ascii_only=draw(st.booleans()))
    draft.syntactic = True


def non_finite(draw: st.DrawFn, draft: Draft) -> None:
    token = choose(draw, [b"NaN", b"Infinity", b"-Infinity", b"-NaN", b"+Infinity"])
    doc = dict(draft.doc)
    payloads = [k for k in ("input", "output") if k in doc]
    nested: bool = bool(payloads) and draw(st.booleans())
    if nested:
        # Deep inside a nested payload.
        value: Any = SENTINEL
        for _ in range(draw(st.integers(0, 5))):
            value = draw(st.sampled_from([[value], {"k": value}, [1, {"n": [value]}]]))
        doc[choose(draw, payloads)] = {"nested": value}
    else:
        doc[choose(draw, sorted(doc))] = SENTINEL
    draft.body = dump(doc, token)
    draft.syntactic = True


def invalid_utf8_in_string(draw: st.DrawFn, draft: Draft) -> None:
    doc = dict(draft.doc)
    doc[choose(draw, sorted(doc))] = SENTINEL
    draft.body = dump(doc, b'"' + draw(_invalid_utf8()).replace(b'"', b"") + b'"')
    draft.syntactic = True


def control_character(draw: st.DrawFn, draft: Draft) -> None:
    # Unescaped U+0000..U+001F inside a string: RFC 8259 says they must be escaped.
    doc = dict(draft.doc)
    doc[choose(draw, sorted(doc))] = SENTINEL
    char = bytes([draw(st.integers(0, 0x1F))])
    draft.body = dump(doc, b'"acme' + char + b'"')
    draft.syntactic = True


def lone_surrogate(draw: st.DrawFn, draft: Draft) -> None:
    # Only where the contract admits printable ASCII, a slug, a date-time or an enum word:
    # refused whatever a JSON parser makes of the escape.
    props, defs = _fields(draft)
    constrained = sorted(
        k
        for k, v in props.items()
        if (b := string_branch(v, defs)) is not None
        and ("pattern" in b or "enum" in b or "format" in b)
    )
    doc = dict(draft.doc)
    doc[choose(draw, constrained)] = SENTINEL
    escape = draw(
        st.sampled_from([b"\\ud800", b"\\udfff", b"\\udc00x", b"\\ud83d", b"\\ud800\\u0041"])
    )
    draft.body = dump(doc, b'"acme' + escape + b'"')
    draft.syntactic = True


def drop_required(draw: st.DrawFn, draft: Draft) -> None:
    required = SCHEMAS[draft.message_type]["required"]
    doc = dict(draft.doc)
    for name in draw(st.lists(st.sampled_from(required), min_size=1, max_size=3, unique=True)):
        del doc[name]
    draft.body = dump(doc)


def unknown_field(draw: st.DrawFn, draft: Draft) -> None:
    known = {k for t in (*CONTROL_TYPES, draft.message_type) for k in SCHEMAS[t]["properties"]}
    name = draw(
        st.sampled_from(["extra", "__proto__", "$schema", "type", "id", "Tenant", "tenant_"])
        | st.text(max_size=12)
    )
    hypothesis.assume(name not in known)
    doc = {**draft.doc, name: draw(_json_value())}
    draft.body = dump(doc, ascii_only=draw(st.booleans()))


def lookalike_key(draw: st.DrawFn, draft: Draft) -> None:
    """A field renamed to something that looks like it: an unknown field (and one missing)."""
    props, _ = _fields(draft)
    name = choose(draw, sorted(draft.doc))
    renamed = draw(
        st.sampled_from(
            [
                name + ZERO_WIDTH,
                BOM + name,
                RTL_OVERRIDE + name,
                name.replace("e", "\u0435") if "e" in name else name + "\u0435",
                name.upper(),
                name + " ",
                name.replace("_", "-") if "_" in name else name + "-",
            ]
        )
    )
    assert renamed not in props
    doc = {(renamed if k == name else k): v for k, v in draft.doc.items()}
    draft.body = dump(doc, ascii_only=draw(st.booleans()))


def wrong_json_type(draw: st.DrawFn, draft: Draft) -> None:
    props, defs = _fields(draft)
    typed = sorted(k for k, v in props.items() if allowed_types(v, defs) != JSON_TYPES)
    name = choose(draw, typed)
    allowed = allowed_types(props[name], defs)
    kind = choose(draw, sorted(JSON_TYPES - allowed))
    value = draw(_of_type(kind))
    current = draft.doc.get(name)
    if kind == "string" and isinstance(current, (int, float)) and not isinstance(current, bool):
        value = choose(draw, [value, str(current)])  # "1" for 1
    draft.body = dump({**draft.doc, name: value}, ascii_only=draw(st.booleans()))
    draft.labels.append(f"{name}:{kind}")


def bad_string(draw: st.DrawFn, draft: Draft) -> None:
    name = choose(draw, sorted(_constrained(draft.message_type)))
    value = draw(_string_violation(draft.message_type, name))
    draft.body = dump({**draft.doc, name: value}, ascii_only=draw(st.booleans()))
    draft.labels.append(name)


def out_of_range(draw: st.DrawFn, draft: Draft) -> None:
    name = choose(draw, sorted(_bounded(draft.message_type)))
    draft.body = dump({**draft.doc, name: draw(_numeric_violation(draft.message_type, name))})
    draft.labels.append(name)


def bad_schema_version(draw: st.DrawFn, draft: Draft) -> None:
    value = choose(draw, [True, 0, 2, -1, 1.5, "1", False, None, [1]])
    draft.body = dump({**draft.doc, "schema_version": value})


def broken_rule(draw: st.DrawFn, draft: Draft) -> None:
    """The models' cross-field rules (documented in schemas/): expiry after issue, an error
    exactly when a result failed."""
    doc = dict(draft.doc)
    if draft.message_type == "step.result":
        if draw(st.booleans()):
            doc.update(outcome="failed", error=None)
        else:
            doc.update(outcome="succeeded", error={"type": "E", "message": "", "retryable": True})
    else:
        doc["expires_at"] = draw(
            st.sampled_from([doc["issued_at"], "2026-03-29T01:29:59Z", "1970-01-01T00:00:00Z"])
        )
    draft.body = dump(doc)


def payload_too_big(draw: st.DrawFn, draft: Draft) -> None:
    # Over the 256 KiB a payload may hold, under the 1 MiB a body may: measured in UTF-8
    # bytes, so 140 000 "é" (280 000 bytes) are too many too.
    name = "output" if draft.message_type == "step.result" else "input"
    size = PAYLOAD_LIMIT + draw(st.integers(1, 100_000))
    blob = draw(
        st.sampled_from(["x" * size, "\u00e9" * (size // 2 + 1), "\U0001f600" * (size // 4 + 1)])
    )
    shape = choose(draw, ["flat", "many", "nested"])
    if shape == "flat":
        payload: Any = {"blob": blob}
    elif shape == "many":
        payload = {f"k{i}": "v" * 1000 for i in range(size // 1000 + 1)}
    else:
        payload = {"a": [{"b": [blob]}]}
    draft.body = dump({**draft.doc, name: payload}, ascii_only=False)
    assert PAYLOAD_LIMIT < len(draft.body) <= MIB


def huge(draw: st.DrawFn, draft: Draft) -> None:
    size = MIB + draw(st.integers(1, 200_000))
    shape = choose(draw, ["field", "payload", "garbage"])
    if shape == "field":
        draft.body = dump({**draft.doc, "padding": "p" * size})
    elif shape == "payload":
        name = "output" if draft.message_type == "step.result" else "input"
        draft.body = dump({**draft.doc, name: {"blob": "b" * size}})
    else:
        draft.body = b"\xff" * size
    draft.defects.append(TOO_LARGE)
    draft.syntactic = True


def deep(draw: st.DrawFn, draft: Draft) -> None:
    """10 000 levels of nesting: the whole body, a typed field, or never closed."""
    levels = 10_000
    shape = choose(draw, ["arrays", "objects", "field", "unclosed"])
    if shape == "arrays":
        draft.body = b"[" * levels + b"]" * levels
    elif shape == "objects":
        draft.body = b'{"a":' * levels + b"{}" + b"}" * levels
    elif shape == "field":
        # A typed field (never a payload: any depth of JSON is a payload value by the schema).
        props, defs = _fields(draft)
        typed = sorted(k for k, v in props.items() if "object" not in allowed_types(v, defs))
        doc = {**draft.doc, choose(draw, typed): SENTINEL}
        draft.body = dump(doc, b"[" * levels + b"1" + b"]" * levels)
    else:
        draft.body = dump(draft.doc)[:-1] + b',"x":' + b"[" * levels
    draft.syntactic = True


def _has_bounds(message_type: str) -> bool:
    return bool(_bounded(message_type))


def _has_required(message_type: str) -> bool:
    return bool(SCHEMAS[message_type].get("required"))


def _has_payload(message_type: str) -> bool:
    return bool({"input", "output"} & set(SCHEMAS[message_type]["properties"]))


# (breaker, weight, applies to). Hypothesis favours small indexes: the expensive ones (over a
# mebibyte, 10 000 levels) sit in the middle of the list.
BODY_BREAKERS: list[tuple[Callable[[st.DrawFn, Draft], None], int, Callable[[str], bool]]] = [
    (wrong_json_type, 12, lambda t: True),
    (bad_string, 12, lambda t: True),
    (drop_required, 6, _has_required),
    (non_finite, 6, lambda t: True),
    (garbage, 5, lambda t: True),
    (unknown_field, 5, lambda t: True),
    (lookalike_key, 5, lambda t: True),
    (truncated, 4, lambda t: True),
    (huge, 1, lambda t: True),
    (invalid_utf8_in_string, 4, lambda t: True),
    (lone_surrogate, 4, lambda t: True),
    (deep, 2, lambda t: True),
    (out_of_range, 5, _has_bounds),
    (byte_order_mark, 3, lambda t: True),
    (control_character, 3, lambda t: True),
    (payload_too_big, 2, _has_payload),
    (not_an_object, 3, lambda t: True),
    (broken_rule, 3, lambda t: t in ("step.result", "control.penalty", "control.quarantine")),
    (empty, 2, lambda t: True),
    (bad_schema_version, 2, lambda t: True),
]


# ----------------------------------------------------------------------- property breakers
def _table(entries: list[tuple[bytes, bytes]]) -> bytes:
    """A field table from (key, encoded value) pairs; keys may repeat."""
    content = b"".join(shortstr(key) + value for key, value in entries)
    return struct.pack(">I", len(content)) + content


def _array(values: list[bytes]) -> bytes:
    content = b"".join(values)
    return struct.pack(">I", len(content)) + content


@functools.cache
def _header_values() -> st.SearchStrategy[bytes]:
    """Header values the broker relays and the client decodes (odd, not wrong)."""
    leaves = st.one_of(
        st.booleans().map(lambda v: b"t" + bytes([v])),
        st.integers(-128, 127).map(lambda v: b"b" + struct.pack(">b", v)),
        st.integers(0, 255).map(lambda v: b"B" + struct.pack(">B", v)),
        st.integers(-(2**15), 2**15 - 1).map(lambda v: b"s" + struct.pack(">h", v)),
        st.integers(0, 2**16 - 1).map(lambda v: b"u" + struct.pack(">H", v)),
        st.integers(-(2**31), 2**31 - 1).map(lambda v: b"I" + struct.pack(">i", v)),
        st.integers(0, 2**32 - 1).map(lambda v: b"i" + struct.pack(">I", v)),
        st.integers(-(2**63), 2**63 - 1).map(lambda v: b"l" + struct.pack(">q", v)),
        # Finite only: RabbitMQ 3.10 closes the connection (541 INTERNAL_ERROR) on a NaN.
        st.floats(width=32, allow_nan=False, allow_infinity=False).map(
            lambda v: b"f" + struct.pack(">f", v)
        ),
        st.floats(allow_nan=False, allow_infinity=False).map(lambda v: b"d" + struct.pack(">d", v)),
        st.tuples(st.integers(0, 255), st.integers(0, 2**32 - 1)).map(
            lambda t: b"D" + struct.pack(">BI", *t)
        ),
        st.binary(max_size=40).map(lambda v: b"S" + struct.pack(">I", len(v)) + v),  # any bytes
        st.binary(max_size=40).map(lambda v: b"x" + struct.pack(">I", len(v)) + v),
        st.just(b"V"),
        st.integers(0, 2**32 - 1).map(lambda v: b"T" + struct.pack(">Q", v)),
    )
    return st.recursive(
        leaves,
        lambda inner: (
            st.lists(st.tuples(_header_keys(), inner), max_size=3).map(lambda e: b"F" + _table(e))
            | st.lists(inner, max_size=3).map(lambda v: b"A" + _array(v))
        ),
        max_leaves=8,
    )


@functools.cache
def _header_keys() -> st.SearchStrategy[bytes]:
    interesting = st.sampled_from(
        [b"x-delivery-count", b"x-death", b"orch-reason", b"orch-queue", b"orch-replays", b""]
    )
    text = st.text(max_size=16).map(lambda s: s.encode()).filter(lambda b: len(b) <= 255)
    return (interesting | text).filter(lambda k: k != BAD_PROPERTIES_HEADER.encode())


def _deep_table(levels: int) -> bytes:
    value = b"I" + struct.pack(">i", 1)
    for _ in range(levels):
        value = b"F" + _table([(b"k", value)])
    return value


DEEP_TABLE = _deep_table(3000)  # deeper than the client's recursion allows


def _undecodable_headers(draw: st.DrawFn) -> tuple[bytes, str]:
    """A header table the broker relays but the client cannot decode."""
    entries = draw(st.lists(st.tuples(_header_keys(), _header_values()), max_size=3))
    bad_timestamp = b"T" + struct.pack(">Q", draw(st.integers(2**53, 2**64 - 1)))
    shape = choose(draw, ["timestamp", "in table", "in array", "key", "depth"])
    if shape == "timestamp":
        bad = (b"when", bad_timestamp)
    elif shape == "in table":
        bad = (b"nested", b"F" + _table([(b"when", bad_timestamp)]))
    elif shape == "in array":
        bad = (b"list", b"A" + _array([b"I" + struct.pack(">i", 1), bad_timestamp]))
    elif shape == "key":
        bad = (draw(_invalid_utf8()), b"t\x01")
    else:
        bad = (b"deep", DEEP_TABLE)
    entries.insert(draw(st.integers(0, len(entries))), bad)
    return _table(entries), f"headers:{shape}"


STRING_PROPERTIES = (
    "content_type",
    "content_encoding",
    "correlation_id",
    "reply_to",
    "message_id",
    "type",
    "app_id",
)
WRONG_CONTENT_TYPES = [
    b"text/plain",
    b"application/xml",
    b"application/octet-stream",
    b"application/x-www-form-urlencoded",
    b"image/png",
    b"json",
    b"application/jsonx",
    b"*/*",
    "application/js\u00f8n".encode(),
    b"application/json\x00",
]


PROPERTY_BREAKERS = [
    "utf8",
    "utf8",
    "timestamp",
    "headers",
    "headers",
    "forged",
    "content_type",
    "type",
]
OUT_OF_RANGE_TIMESTAMPS = st.integers(2**53, 2**64 - 1)  # beyond year 9999, even as ms


@functools.cache
def _wrong_types(types: tuple[str, ...]) -> st.SearchStrategy[str]:
    """Message types a queue does not take (never empty: "" arrives as no type at all)."""
    garbage_type = st.text(min_size=1, max_size=40).filter(
        lambda s: s not in types and 0 < len(s.encode()) <= 255
    )
    return (
        st.sampled_from(sorted(set(MESSAGES) - set(types)))
        | st.sampled_from([t.upper() for t in types])
        | st.sampled_from([t + ZERO_WIDTH for t in types])
        | st.sampled_from([t + " " for t in types])
        | garbage_type
    )


def break_properties(
    draw: st.DrawFn, draft: Draft, target: Target, kind: str | None = None
) -> None:
    kind = kind or choose(draw, PROPERTY_BREAKERS)
    if kind == "utf8":
        name = choose(draw, STRING_PROPERTIES)
        draft.props[name] = shortstr(draw(_invalid_utf8()))
        draft.defects.append(BAD_PROPERTIES)
        draft.labels.append(f"property {name} not UTF-8")
    elif kind == "timestamp":
        draft.props["timestamp"] = struct.pack(">Q", draw(OUT_OF_RANGE_TIMESTAMPS))
        draft.defects.append(BAD_PROPERTIES)
        draft.labels.append("timestamp out of range")
    elif kind == "headers":
        draft.props["headers"], label = _undecodable_headers(draw)
        draft.defects.append(BAD_PROPERTIES)
        draft.labels.append(label)
    elif kind == "forged":
        value = choose(draw, [b"S\x00\x00\x00\x03yes", b"t\x00", b"I\x00\x00\x00\x00"])
        draft.props["headers"] = _table([(BAD_PROPERTIES_HEADER.encode(), value)])
        draft.defects.append(BAD_PROPERTIES)
        draft.labels.append("forged orch-bad-properties")
    elif kind == "content_type":
        draft.props["content_type"] = shortstr(choose(draw, WRONG_CONTENT_TYPES))
        draft.defects.append(BAD_CONTENT_TYPE)
        draft.labels.append("wrong content type")
    else:
        draft.props["type"] = shortstr(draw(_wrong_types(target.types)).encode())
        draft.defects.append(WRONG_TYPE)
        draft.labels.append("wrong message type")


# -------------------------------------------------------------------- odd, legal properties
_TEXT = st.text(max_size=30).map(lambda s: s.encode()).filter(lambda b: len(b) <= 255)
ODD_MESSAGE_IDS = [
    b"",  # arrives as no message id
    b"fuzz-duplicate-id",  # the same id on many bad messages
    "d\u00e9j\u00e0-vu".encode(),
    b"with spaces",
    b"x" * 255,
    ("\u20ac" * 85).encode(),  # 255 bytes, 85 characters
    ("id" + ZERO_WIDTH + RTL_OVERRIDE).encode(),
    b"\x00\x01\x7f",
]
DECORATIONS: dict[str, st.SearchStrategy[bytes | None]] = {
    "content_type": st.sampled_from([shortstr(b"application/json"), None]),
    "content_encoding": st.none() | st.sampled_from([b"gzip", b"identity", b""]).map(shortstr),
    "headers": st.none()
    | st.just(_table([]))
    | st.lists(st.tuples(_header_keys(), _header_values()), max_size=4).map(_table),
    "delivery_mode": st.sampled_from([b"\x02", b"\x01", None]),
    "priority": st.none() | st.integers(0, 255).map(lambda v: bytes([v])),
    "correlation_id": st.none() | _TEXT.map(shortstr),
    "reply_to": st.none() | _TEXT.map(shortstr),
    # pamqp reads a timestamp over 2^32 as milliseconds: up to 2^44 is a date it can hold.
    "timestamp": st.none()
    | (st.integers(0, 2**32 - 1) | st.integers(2**32, 2**44)).map(lambda v: struct.pack(">Q", v)),
    "app_id": st.none() | _TEXT.map(shortstr),
}


def decorate(
    draw: st.DrawFn, draft: Draft, target: Target, valid_ids: list[str], user: str
) -> None:
    """Properties that are odd but legal; set only where no breaker set that property."""
    props = draft.props
    for name, strategy in DECORATIONS.items():
        if name not in props and (value := draw(strategy)) is not None:
            props[name] = value
    if "message_id" not in props:
        choice = choose(draw, ["none", "own", "odd", "odd", "valid"])
        if choice == "own":
            props["message_id"] = shortstr(message_id_of(draft.message_type, draft.doc).encode())
        elif choice == "odd":
            props["message_id"] = shortstr(choose(draw, ODD_MESSAGE_IDS))
        elif choice == "valid":  # the id of a valid request, sent later
            props["message_id"] = shortstr(choose(draw, valid_ids).encode())
    # The AMQP type: the message's own type, or none ("" arrives as none). On a queue of several
    # types, a body that is wrong for its own type may be right for another: keep its own.
    own = shortstr(draft.message_type.encode())
    if "type" not in props:
        if len(target.types) > 1 and not draft.syntactic and BODY in draft.defects:
            props["type"] = own
        elif (value := choose(draw, [own, shortstr(b""), None])) is not None:
            props["type"] = value
    if "user_id" not in props and choose(draw, range(10)) == 0:
        props["user_id"] = shortstr(user.encode())  # the broker allows only our own


# --------------------------------------------------------------------------- the corpus
MODES = ["body"] * 12 + ["properties"] * 5 + ["both"] * 3
COPIES = [1] * 12 + [2]


@dataclass(frozen=True)
class Forced:
    """A kind of breakage a message must have: every kind is tried on every queue first."""

    target: Target
    message_type: str
    breaker: str  # a body breaker's name, or a property breaker's kind


def coverage_plan() -> list[Forced]:
    plan = []
    for target in TARGETS:
        for breaker, _, applies in BODY_BREAKERS:
            types = [t for t in target.types if applies(t)]
            if types:
                plan.append(Forced(target, types[0], breaker.__name__))
        for kind in dict.fromkeys(PROPERTY_BREAKERS):
            plan.append(Forced(target, target.types[-1], kind))
    return plan


@st.composite
def bad_message(
    draw: st.DrawFn, n: int, valid_ids: list[str], user: str, forced: Forced | None = None
) -> Bad:
    if forced is None:
        target = choose(draw, TARGETS)
        message_type = choose(draw, target.types)
        mode = choose(draw, MODES)
    else:
        target, message_type = forced.target, forced.message_type
        mode = "properties" if forced.breaker in PROPERTY_BREAKERS else "body"
    doc = valid_document(message_type, n)
    draft = Draft(message_type, doc, dump(doc))
    if mode in ("body", "both"):
        breakers = [(b, w) for b, w, applies in BODY_BREAKERS if applies(message_type)]
        if forced is None:
            breaker = choose(draw, [b for b, w in breakers for _ in range(w)])
        else:
            breaker = next(b for b, _ in breakers if b.__name__ == forced.breaker)
        draft.labels.append(breaker.__name__)
        breaker(draw, draft)
        if not draft.defects:
            draft.defects.append(BODY)
    if mode in ("properties", "both"):
        break_properties(draw, draft, target, forced.breaker if forced else None)
    decorate(draw, draft, target, valid_ids, user)
    props = RawProperties()
    for name, encoded in draft.props.items():
        props.set_raw(name, encoded)
    return Bad(
        n=n,
        target=target,
        routing_key=choose(draw, target.keys),
        body=draft.body,
        props=props,
        labels=draft.labels,
        reasons=draft.reasons(),
        copies=choose(draw, COPIES),  # sometimes the same bad message twice
    )


def _generate(examples: int, seed: int, draw: Callable[[st.DataObject, int], Any]) -> list[Any]:
    """What `draw(data, i)` returned for each of Hypothesis's test cases (`i` counts them)."""
    kept: list[Any] = []

    @hypothesis.settings(
        max_examples=examples,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.large_base_example,
        ],
    )
    @hypothesis.seed(seed)
    @given(st.data())
    def collect(data: st.DataObject) -> None:
        kept.append(draw(data, len(kept)))

    collect()
    return kept


def build_corpus(count: int, seed: int, valid_ids: list[str], user: str) -> list[Bad]:
    """`count` bad messages drawn by Hypothesis, reproducible from `seed`: first one of each
    kind of breakage for each queue (the coverage plan), then whatever Hypothesis draws."""
    corpus: list[Bad] = []
    plan = coverage_plan()
    for i, target in enumerate(TARGETS):
        items = [f for f in plan if f.target is target]
        base = len(corpus)

        def one_of_each(
            data: st.DataObject, _: int, items: list[Forced] = items, base: int = base
        ) -> list[Bad]:
            return [
                data.draw(bad_message(base + j, valid_ids, user, forced))
                for j, forced in enumerate(items)
            ]

        # The last test case: the first one is Hypothesis's simplest (all choices minimal).
        corpus.extend(_generate(2, seed + i, one_of_each)[-1])
    round_ = 0
    while len(corpus) < count:
        base = len(corpus)

        def any_kind(data: st.DataObject, k: int, base: int = base) -> Bad:
            return data.draw(bad_message(base + k, valid_ids, user))

        corpus.extend(_generate(count - base, seed + len(TARGETS) + round_, any_kind))
        round_ += 1
    return corpus[:count]


# ---------------------------------------------------------------------- publishing, reading
class FuzzPublisher(RawPublisher):
    """The raw publisher, with routing keys as bytes (not necessarily UTF-8)."""

    async def _expect(self, kind: type) -> object:
        while True:
            value = await self._read_frame()
            if isinstance(value, kind):
                return value
            if isinstance(value, (commands.Connection.Close, commands.Channel.Close)):
                raise ConnectionError(f"broker closed: {value.reply_code} {value.reply_text}")

    async def publish_key(
        self, exchange: str, routing_key: bytes, body: bytes, props: RawProperties
    ) -> None:
        assert self.writer is not None
        method = (
            struct.pack(">HHH", 60, 40, 0)  # basic.publish, reserved
            + shortstr(exchange.encode())
            + shortstr(routing_key)
            + b"\x00"  # neither mandatory nor immediate
        )
        self.writer.write(struct.pack(">BHI", 1, 1, len(method)) + method + FRAME_END)
        header = struct.pack(">HHQ", 60, 0, len(body)) + props.encode()
        self.writer.write(struct.pack(">BHI", 2, 1, len(header)) + header + FRAME_END)
        chunk = self.frame_max - 8
        for start in range(0, len(body), chunk):
            part = body[start : start + chunk]
            self.writer.write(struct.pack(">BHI", 3, 1, len(part)) + part + FRAME_END)
        await self.writer.drain()
        self.published += 1
        await self._expect(commands.Basic.Ack)


class Problems(logging.Handler):
    """Errors logged by the AMQP client libraries, and exceptions nobody retrieved."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.split(".")[0] in ("aiormq", "aio_pika", "asyncio"):
            self.seen.append(f"{record.name}: {record.getMessage()} {record.exc_info!r}"[:500])

    def loop_handler(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.seen.append(f"loop: {context.get('message')} {context.get('exception')!r}"[:500])


@contextlib.contextmanager
def watching_problems() -> Iterator[Problems]:
    problems = Problems()
    root = logging.getLogger()
    root.addHandler(problems)
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    loop.set_exception_handler(problems.loop_handler)
    try:
        yield problems
    finally:
        loop.set_exception_handler(previous)
        root.removeHandler(problems)


SERVICE_RUNS = {"Scheduler.run", "Engine.run", "Dispatcher.run", "Worker.run"}


def service_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_coro().__qualname__ in SERVICE_RUNS]  # type: ignore[union-attr]


async def until(
    check: Callable[[], bool], what: Callable[[], str], wait_s: float, stalled_s: float = 15.0
) -> str | None:
    """None once `check()` holds; else (after `wait_s`, or `stalled_s` without any change in
    `what()`) what was reached."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    last, changed = what(), loop.time()
    while not check():
        now = loop.time()
        if now > deadline or now - changed > stalled_s:
            return f"not reached in {now - deadline + wait_s:.0f}s: {last}"
        await asyncio.sleep(0.25)  # poll interval: `check` does not hold yet
        if (current := what()) != last:
            last, changed = current, loop.time()
    return None


# ----------------------------------------------------------------------------- the test
def dropped_counts() -> Counter[str]:
    """orchestrator_messages_dropped_total of dispatcher.completions, by reason."""
    counts: Counter[str] = Counter()
    for metric in DROPPED.collect():
        for sample_ in metric.samples:
            labels = sample_.labels
            if sample_.name.endswith("_total") and labels["queue"] == topology.COMPLETIONS_QUEUE:
                counts[labels["reason"]] += int(sample_.value)
    return counts


class Observer:
    """What the test reads: every DLQ (consumed, so read rather than counted: a quorum queue's
    declare-ok count lags), every status event, and the drop counter."""

    def __init__(self, channel: AbstractChannel) -> None:
        self.channel = channel
        self.dead: dict[str, list[AbstractIncomingMessage]] = {t.queue: [] for t in TARGETS}
        self.events: list[dict[str, Any]] = []
        self.dropped_before: Counter[str] = Counter()
        self._consumers: list[tuple[AbstractQueue, str]] = []

    async def start(self) -> None:
        await topology.declare_tenant_queue(self.channel, "acme")
        await topology.declare_ingress_queue(self.channel, "acme")
        for name in [*self.dead, topology.COMPLETIONS_QUEUE]:
            await purged(self.channel, name)
        for queue, letters in self.dead.items():
            dlq = await purged(self.channel, queue + topology.DLQ_SUFFIX)

            async def keep(message: AbstractIncomingMessage, into: list[Any] = letters) -> None:
                into.append(message)

            self._consumers.append((dlq, await dlq.consume(keep, no_ack=True)))
        status = await self.channel.declare_queue(exclusive=True, auto_delete=True)
        await status.bind(topology.STATUS, routing_key="#")

        async def on_status(message: AbstractIncomingMessage) -> None:
            self.events.append(json.loads(message.body))

        self._consumers.append((status, await status.consume(on_status, no_ack=True)))
        self.dropped_before = dropped_counts()

    async def stop(self) -> None:
        """Cancels the consumers: later tests of the session read these DLQs themselves."""
        for queue, tag in self._consumers:
            with contextlib.suppress(Exception):
                await queue.cancel(tag)

    def dropped(self) -> Counter[str]:
        return dropped_counts() - self.dropped_before

    def dead_counts(self) -> dict[str, int]:
        return {queue: len(letters) for queue, letters in self.dead.items()}

    def accepted(self) -> dict[str, list[str]]:
        """Idempotency key -> execution ids of every flow start accepted."""
        keys: dict[str, list[str]] = {}
        for e in self.events:
            if e["type"] == "io.orchestrator.flow_start.accepted" and not e["data"].get(
                "duplicate"
            ):
                keys.setdefault(e["data"]["idempotency_key"], []).append(e["data"]["execution_id"])
        return keys

    def terminals(self) -> dict[str, list[str]]:
        """Terminal events per execution, every one counted (a duplicate shows as two)."""
        ended: dict[str, list[str]] = {}
        for e in self.events:
            kind = e["type"].removeprefix("io.orchestrator.")
            if kind in ("execution.succeeded", "execution.failed", "execution.compensated"):
                ended.setdefault(e["subject"], []).append(kind)
        return ended

    def announced(self) -> Counter[str]:
        return Counter(
            e["data"].get("queue") for e in self.events if e["type"].endswith(".rejected")
        )


@dataclass
class Expected:
    """What the corpus should leave behind."""

    corpus: list[Bad]
    dead: dict[str, Counter[str]] = field(default_factory=dict)  # queue -> body digest -> copies
    sent: dict[tuple[str, str], list[Bad]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.dead = {t.queue: Counter() for t in TARGETS}
        for bad in self.corpus:
            self.dead[bad.target.queue][bad.digest] += bad.copies
            self.sent.setdefault((bad.target.queue, bad.digest), []).append(bad)

    @property
    def drops(self) -> int:
        """Bad step results reach dispatcher.completions too, and are dropped there."""
        return sum(b.copies for b in self.corpus if b.target.queue == topology.RESULTS_QUEUE)

    def per_queue(self) -> dict[str, int]:
        return {queue: sum(digests.values()) for queue, digests in self.dead.items()}


def dead_letter_problems(expected: Expected, observer: Observer) -> list[str]:
    """Every bad message in the DLQ of its queue, as often as it was sent, with a reason of
    the decoder, a detail and the queue; nothing else there; every bad copy dropped."""
    problems: list[str] = []
    for queue, letters in observer.dead.items():
        got: Counter[str] = Counter()
        for message in letters:
            digest = hashlib.sha256(message.body).hexdigest()
            got[digest] += 1
            headers = message.headers or {}
            reason = headers.get(REASON_HEADER)
            sent = expected.sent.get((queue, digest))
            if sent is None:
                problems.append(
                    f"{queue}: dead-lettered, not ours: {reason!r} {message.body[:200]!r}"
                )
            elif reason not in frozenset().union(*(b.reasons for b in sent)):
                detail = headers.get(DETAIL_HEADER)
                problems.append(f"{queue}: {reason!r} ({detail!r}) for {sent[0].describe()}")
            elif headers.get(QUEUE_HEADER) != queue or not headers.get(DETAIL_HEADER):
                problems.append(f"{queue}: headers {headers} for {sent[0].describe()}")
        for digest, count in (expected.dead[queue] - got).items():
            problems.append(
                f"{queue}: missing {count}x {expected.sent[(queue, digest)][0].describe()}"
            )
        for digest, count in (got - expected.dead[queue]).items():
            if (queue, digest) in expected.sent:
                problems.append(
                    f"{queue}: {count} extra {expected.sent[(queue, digest)][0].describe()}"
                )
    dropped = observer.dropped()
    results = [b for b in expected.corpus if b.target.queue == topology.RESULTS_QUEUE]
    allowed = frozenset().union(*(b.reasons for b in results))
    if sum(dropped.values()) != expected.drops or not set(dropped) <= allowed:
        problems.append(
            f"{topology.COMPLETIONS_QUEUE}: dropped {dict(dropped)}, not {expected.drops}"
        )
    return problems


async def test_fuzzed_bad_input_on_every_queue(
    settings: Settings, channel: AbstractChannel
) -> None:
    began = time.monotonic()
    test_settings = fresh_settings(settings)
    run = uuid.uuid4().hex[:8]
    valid = [
        FlowStartRequested(tenant="acme", flow_id="echo", idempotency_key=f"valid-{run}-{i}")
        for i in range(COUNT // VALID_EVERY + 2)
    ]
    user = test_settings.rabbitmq_url.username or "guest"
    expected = Expected(build_corpus(COUNT, SEED, [r.message_id() for r in valid], user))
    generated_s = time.monotonic() - began
    observer = Observer(channel)
    await observer.start()
    started: list[FlowStartRequested] = []

    async def start() -> None:
        request = valid[len(started)]
        started.append(request)
        await publish(channel, request)

    def valid_not_ended() -> list[str]:
        keys, ended = observer.accepted(), observer.terminals()
        return [
            r.idempotency_key
            for r in started
            if not any(e in ended for e in keys.get(r.idempotency_key, []))
        ]

    def all_in() -> bool:
        counts = observer.dead_counts()
        return (
            all(counts[q] >= n for q, n in expected.per_queue().items())
            and sum(observer.dropped().values()) >= expected.drops
            and not valid_not_ended()
        )

    def progress() -> str:
        missing = valid_not_ended()
        return (
            f"dead-lettered {observer.dead_counts()} of {expected.per_queue()}; dropped "
            f"{sum(observer.dropped().values())} of {expected.drops}; valid not ended "
            f"{len(missing)} of {len(started)}: {missing[:5]}"
        )

    try:
        with watching_problems() as problems:
            async with running_system(test_settings) as system:
                tasks = service_tasks()
                assert len(tasks) == len(SERVICE_RUNS), tasks
                await system.apply(FLOW)
                # A first valid execution registers the tenant (and its fair queue's consumer).
                await start()
                first = await until(lambda: not valid_not_ended(), progress, 60)
                assert first is None, f"the first valid execution did not end: {first}"
                publish_began = time.monotonic()
                raw = FuzzPublisher(str(test_settings.rabbitmq_url))
                async with raw:
                    for i, bad in enumerate(expected.corpus):
                        for _ in range(bad.copies):
                            try:
                                await raw.publish_key(
                                    bad.target.exchange, bad.routing_key, bad.body, bad.props
                                )
                            except (ConnectionError, asyncio.IncompleteReadError) as exc:
                                raise AssertionError(
                                    f"the broker refused {bad.describe()}"
                                ) from exc
                        if i % VALID_EVERY == VALID_EVERY - 1:
                            await start()  # valid traffic in between
                    await start()
                publish_s = time.monotonic() - publish_began
                timed_out = await until(all_in, progress, WAIT_S)
                # the wait is the behaviour under test: a duplicate would arrive now, and
                # none must
                await asyncio.sleep(2.0)
                died = [t for t in tasks if t.done()]
                reconnects = list(system.reconnects)
        elapsed = time.monotonic() - began
    finally:
        await observer.stop()

    reasons = Counter(
        str((m.headers or {}).get(REASON_HEADER))
        for letters in observer.dead.values()
        for m in letters
    )
    print(
        f"\nfuzz: seed={SEED} count={COUNT}: {sum(expected.per_queue().values())} bad messages "
        f"published (+{expected.drops} copies on {topology.COMPLETIONS_QUEUE}), {len(started)} "
        f"valid flow starts; generated {generated_s:.1f}s, published {publish_s:.1f}s, total "
        f"{elapsed:.1f}s; per queue {expected.per_queue()}; DLQ reasons {dict(reasons)}; "
        f"dropped {dict(observer.dropped())}; kinds "
        f"{dict(Counter(b.labels[0] for b in expected.corpus).most_common())}"
    )
    # The services survived: no task ended, the connection never dropped, nothing logged a
    # failed consumer callback or an unretrieved task exception.
    assert not died, f"service tasks ended: {[(t, t.exception()) for t in died]}"
    assert reconnects == [], "a bad message cost the services their connection"
    assert not problems.seen, problems.seen[:10]
    # Every bad message dead-lettered (or dropped), nothing else: no valid one.
    failures = dead_letter_problems(expected, observer)
    if timed_out is not None:
        failures.insert(0, f"waited for the DLQs, drops and valid executions: {timed_out}")
    assert not failures, f"{len(failures)} problems, first ones:\n" + "\n".join(failures[:20])
    # Every valid request was accepted once, and its execution ended exactly once: succeeded.
    keys, ended = observer.accepted(), observer.terminals()
    valid_keys = {r.idempotency_key for r in started}
    assert set(keys) == valid_keys, f"accepted, not valid: {set(keys) - valid_keys}"
    not_once = {
        k: (ids, [ended.get(e) for e in ids])
        for k, ids in keys.items()
        if len(ids) != 1 or ended.get(ids[0]) != ["execution.succeeded"]
    }
    assert not not_once, not_once
    # And every rejection was announced.
    announced = observer.announced()
    for queue, count in {
        **expected.per_queue(),
        topology.COMPLETIONS_QUEUE: expected.drops,
    }.items():
        assert announced[queue] >= count, (queue, announced)
