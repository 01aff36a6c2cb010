"""Generates the published contracts: JSON Schemas (schemas/json/) and the AsyncAPI 3.0 document
(schemas/asyncapi.yaml), from the pydantic models and the topology. Never edit them by hand."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

import schemas as schemas_package
from orchestrator import topology
from orchestrator.accounts import STATUS_QUEUE_PREFIX
from orchestrator.amqp import (
    DETAIL_HEADER,
    QUEUE_HEADER,
    REASON_HEADER,
    REJECTED_AT_HEADER,
    REPLAYS_HEADER,
)
from orchestrator.kafka import TICK_KEY
from schemas.catalog import DOCUMENTS, MESSAGES
from schemas.common import Contract
from schemas.executions import FlowStartRequested
from schemas.status import STATES, TYPE_PREFIX, StatusEvent
from schemas.status_data import DATA_MODELS
from schemas.steps import StepTask
from schemas.usage import UsageEvent

SCHEMAS_DIR = Path(schemas_package.__file__).parent
JSON_DIR = SCHEMAS_DIR / "json"
ASYNCAPI_FILE = SCHEMAS_DIR / "asyncapi.yaml"
ASYNCAPI_VERSION = "3.0.0"
AMQP_BINDING_VERSION = "0.3.0"
KAFKA_BINDING_VERSION = "0.5.0"


def _title(message_type: str) -> str:
    return "".join(part.capitalize() for part in message_type.replace("_", ".").split("."))


def json_schemas() -> dict[str, dict[str, Any]]:
    """File name -> JSON Schema (draft 2020-12) for every message and document."""
    out: dict[str, dict[str, Any]] = {}
    contracts: dict[str, type[Contract]] = {**MESSAGES, **DOCUMENTS}
    for name, model in sorted(contracts.items()):
        schema = model.model_json_schema(mode="serialization")
        schema = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": f"https://orchestrator.example/schemas/{name}.json",
            **schema,
        }
        out[f"{name}.json"] = schema
    return out


def _component_schemas() -> tuple[dict[str, Any], dict[str, str]]:
    """All models' schemas as AsyncAPI components (shared $defs hoisted), and type -> name."""
    components: dict[str, Any] = {}
    names: dict[str, str] = {}
    template = "#/components/schemas/{model}"
    for message_type, model in sorted(MESSAGES.items()):
        schema = model.model_json_schema(mode="serialization", ref_template=template)
        for def_name, definition in schema.pop("$defs", {}).items():
            components[def_name] = definition
        name = model.__name__
        components[name] = schema
        names[message_type] = name
    for kind, data_model in DATA_MODELS.items():
        schema = data_model.model_json_schema(mode="serialization", ref_template=template)
        for def_name, definition in schema.pop("$defs", {}).items():
            components[def_name] = definition
        components[_data_name(kind)] = schema
    return dict(sorted(components.items())), names


def _data_name(kind: str) -> str:
    """The component name of a status event type's `data` schema."""
    return f"StatusData{_title(kind)}"


def _amqp_exchange(name: str) -> dict[str, Any]:
    exchange = next(e for e in topology.EXCHANGES if e.name == name)
    return {
        "name": exchange.name,
        "type": exchange.kind.value,
        "durable": True,
        "autoDelete": False,
        "vhost": "/",
    }


_SLUG = "a slug: ^[a-z0-9](?:[a-z0-9_-]{0,62}[a-z0-9])?$"
PARAMETERS: dict[str, dict[str, Any]] = {
    "tenant": {
        "description": f"the tenant id, {_SLUG}; `_` where the message names no tenant "
        "(e.g. a rejected message whose tenant could not be read; in query/cancel keys: an "
        "operator's request about any tenant)"
    },
    "flow": {"description": f"the flow id, {_SLUG}; `_` where the event names no flow"},
    "entity": {
        "enum": sorted(STATES),
        "description": "what the event is about (words, with `_`: e.g. flow_start)",
    },
    "state": {
        "enum": sorted({state for states in STATES.values() for state in states}),
        "description": "what happened to it; which states go with which entity: the "
        "StatusEvent `type` list (io.orchestrator.<entity>.<state>)",
    },
}


def _parameters(address: str) -> dict[str, Any]:
    params = [part.strip("{}") for part in address.replace(".", " ").split() if part[0] == "{"]
    return {p: PARAMETERS[p] for p in params}


# AMQP properties per message, as the consumers read them. Missing `content_type` or `type`
# is accepted (the body is then validated against the queue's contracts); a wrong one is
# rejected (`bad_content_type`, `wrong_message_type`).
_COMMON_PROPERTIES: dict[str, str] = {
    "content_type": "the message's content type (above); missing is accepted, another is "
    "rejected (bad_content_type)",
    "type": "the message name (above); missing is accepted, another is rejected "
    "(wrong_message_type)",
    "delivery_mode": "2 (persistent)",
    "message_id": "recommended: printable ASCII, at most 256 characters; rejections and "
    "dead letters quote it",
}
_SIGNED = (
    "required when ORCH_REQUIRE_AUTH is true (the default): the publisher's own RabbitMQ "
    "user, which the broker checks; a tenant account acts for its own tenant only"
)
EXTRA_PROPERTIES: dict[str, dict[str, str]] = {
    "flow.start.requested": {
        "user_id": _SIGNED,
        "message_id": "recommended: a refusal (flow_start.rejected) quotes it as "
        "data.message_id, so the sender can match it",
    },
    "execution.query": {
        "user_id": _SIGNED,
        "reply_to": "required (refused with no_reply_to): where the ExecutionView goes, "
        "e.g. amq.rabbitmq.reply-to",
        "correlation_id": "recommended: copied to the answer",
    },
    "execution.list": {
        "user_id": _SIGNED,
        "reply_to": "required (refused with no_reply_to): where the ExecutionPage goes",
        "correlation_id": "recommended: copied to the answer",
    },
    "execution.cancel": {
        "user_id": _SIGNED,
        "reply_to": "optional: the ExecutionView after the cancel goes there",
        "correlation_id": "copied to the answer",
    },
    "execution.view": {"correlation_id": "the request's"},
    "execution.page": {"correlation_id": "the request's"},
}
REQUIRED_PROPERTIES: dict[str, list[str]] = {
    "execution.query": ["reply_to"],
    "execution.list": ["reply_to"],
}


def _amqp_properties(message_type: str) -> dict[str, Any]:
    described = {**_COMMON_PROPERTIES, **EXTRA_PROPERTIES.get(message_type, {})}
    return {
        "required": REQUIRED_PROPERTIES.get(message_type, []),
        "properties": described,
    }


ROUTE_NOTES: dict[str, str] = {
    "flow.start.requested": "The answer is a status event: flow_start.accepted (data: "
    "execution_id, idempotency_key, duplicate) with key <tenant>.<flow>.flow_start.accepted, "
    "or flow_start.rejected (data: reason, detail, message_id) with key "
    "<tenant>.<flow>.flow_start.rejected (<tenant>._.flow_start.rejected when no valid flow "
    "id could be read from the request). Bind your status queue to both before publishing. "
    "Published mandatory: a tenant without flows has no ingress queue, and the broker "
    "returns the message.",
    "status": "To follow status, declare a queue named "
    f"{STATUS_QUEUE_PREFIX}<tenant>.<name> (the only names a tenant account may declare: "
    "exclusive for a live view, durable to keep events while away) and bind it to this "
    "exchange with keys starting `<tenant>.` (`*` and `#` allowed after that). CloudEvents "
    "1.0 in structured mode (content type application/cloudevents+json); one execution's "
    "events carry increasing `sequence`; delivery is at least once (deduplicate by `id`).",
    "execution.query": "Request/reply: the ExecutionView goes to reply_to.",
    "execution.list": "Request/reply: the ExecutionPage goes to reply_to.",
    "execution.cancel": "The execution then publishes execution.cancelling and, once what "
    "was in flight finished and completed steps were undone, execution.cancelled.",
}

DEAD_LETTER = "DeadLetter"
DEAD_LETTER_HEADERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        REASON_HEADER: {
            "type": "string",
            "description": "why: e.g. malformed_json, schema_violation, too_deep, too_large, "
            "bad_content_type, wrong_message_type, bad_properties, undecodable, unknown_flow, "
            "forbidden, unauthenticated, no_reply_to, handler_error. Absent on a message "
            "the broker dead-lettered after DELIVERY_LIMIT redeliveries (a poison message): "
            "see x-death (reason delivery_limit)",
        },
        DETAIL_HEADER: {"type": "string", "description": "the reason, for people (<= 1000)"},
        QUEUE_HEADER: {"type": "string", "description": "the queue it was rejected from"},
        REJECTED_AT_HEADER: {"type": "string", "description": "ISO 8601 time of rejection"},
        REPLAYS_HEADER: {
            "type": "integer",
            "description": "how often `orchestrator dlq replay` moved it already",
        },
        "x-death": {
            "type": "array",
            "description": "set by RabbitMQ when it dead-lettered the message itself "
            "(delivery limit, expiry): queue, reason, count, time",
        },
    },
}


def asyncapi() -> dict[str, Any]:
    """The AsyncAPI 3.0 document: one channel per published route, one per consumed queue."""
    components, names = _component_schemas()
    messages: dict[str, Any] = {}
    for t in sorted(names):
        model = MESSAGES[t]
        message: dict[str, Any] = {
            "name": t,
            "title": names[t],
            "contentType": model.content_type,
            "summary": (model.__doc__ or "").strip().splitlines()[0],
            "description": " ".join((model.__doc__ or "").split()),
            "payload": {"$ref": f"#/components/schemas/{names[t]}"},
        }
        if model is UsageEvent:
            message["bindings"] = {
                "kafka": {
                    "key": {"type": "string", "description": "the tenant id, UTF-8"},
                    "bindingVersion": KAFKA_BINDING_VERSION,
                }
            }
        else:
            message["bindings"] = {
                "amqp": {"messageType": t, "bindingVersion": AMQP_BINDING_VERSION}
            }
            message["x-amqp-properties"] = _amqp_properties(t)
        if model is StatusEvent:
            message["x-data-schemas"] = {
                f"{TYPE_PREFIX}{kind}": {"$ref": f"#/components/schemas/{_data_name(kind)}"}
                for kind in sorted(DATA_MODELS)
            }
        messages[names[t]] = message
    messages[DEAD_LETTER] = {
        "name": "dead-letter",
        "title": DEAD_LETTER,
        "summary": "A message a consumer rejected (or the broker dead-lettered), as it was.",
        "description": "The original body and properties, unchanged (the body may be "
        "anything: that can be why it is here), with the headers below added. "
        "`orchestrator dlq show|replay|purge` read them.",
        "headers": DEAD_LETTER_HEADERS,
        "payload": {"description": "the original body, byte for byte"},
    }
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}

    def message_refs(types: tuple[str, ...]) -> dict[str, Any]:
        return {names[t]: {"$ref": f"#/components/messages/{names[t]}"} for t in types}

    for model, spec in sorted(topology.ROUTES.items(), key=lambda kv: kv[0].message_type):
        channel_id = _key(f"{spec.exchange}.{spec.address}")
        channels[channel_id] = {
            "address": spec.address,
            "title": f"{spec.exchange} {spec.address}",
            "description": ROUTE_NOTES.get(model.message_type, ""),
            "messages": message_refs((model.message_type,)),
            "bindings": {
                "amqp": {
                    "is": "routingKey",
                    "exchange": _amqp_exchange(spec.exchange),
                    "bindingVersion": AMQP_BINDING_VERSION,
                }
            },
        }
        if params := _parameters(spec.address):
            channels[channel_id]["parameters"] = params
        operations[f"publish{names[model.message_type]}"] = {
            "action": "send",
            "summary": f"published by {spec.publisher}"
            + ("" if spec.mandatory else " (not mandatory: no subscriber is normal)"),
            "channel": {"$ref": f"#/channels/{channel_id}"},
            "bindings": {
                "amqp": {
                    "deliveryMode": 2,
                    "mandatory": spec.mandatory,
                    "bindingVersion": AMQP_BINDING_VERSION,
                }
            },
        }

    bindings_by_queue: dict[str, list[topology.Binding]] = {}
    for binding in topology.TOPOLOGY.bindings:
        bindings_by_queue.setdefault(binding.queue, []).append(binding)
    # Per-tenant queues, declared when a tenant is registered: documented once, by pattern.
    per_tenant = {
        topology.tenant_queue_name("{tenant}"): (StepTask.message_type,),
        topology.ingress_queue_name("{tenant}"): (FlowStartRequested.message_type,),
    }
    tenant_queues = (topology.tenant_queue("{tenant}"), topology.ingress_queue("{tenant}"))
    consumed = [
        *topology.TOPOLOGY.queues,
        *tenant_queues,
        *(
            topology.Queue(q.dlq, f"Dead letters of {q.name}.", consumer="operator")
            for q in tenant_queues
        ),
    ]
    for queue in consumed:
        types = tuple(
            t for b in bindings_by_queue.get(queue.name, []) for t in b.messages
        ) or per_tenant.get(queue.name, ())
        is_dlq = queue.name.endswith(topology.DLQ_SUFFIX)
        channel_id = _key(queue.name)
        channels[channel_id] = {
            "address": queue.name,
            "title": f"queue {queue.name}",
            "description": queue.description
            + (f" Dead letters go to {queue.dlq}." if queue.dead_letter else ""),
            "messages": (
                {DEAD_LETTER: {"$ref": f"#/components/messages/{DEAD_LETTER}"}}
                if is_dlq
                else message_refs(types)
            ),
            "bindings": {
                "amqp": {
                    "is": "queue",
                    "queue": {
                        "name": queue.name,
                        "durable": True,
                        "exclusive": False,
                        "autoDelete": False,
                        "vhost": "/",
                    },
                    "bindingVersion": AMQP_BINDING_VERSION,
                }
            },
            "x-arguments": queue.arguments(),
        }
        if params := _parameters(queue.name):
            channels[channel_id]["parameters"] = params
        if types or is_dlq:
            operations[f"consume.{channel_id}"] = {
                "action": "receive",
                "summary": f"consumed by {queue.consumer}",
                "channel": {"$ref": f"#/channels/{channel_id}"},
            }

    usage_type = UsageEvent.message_type
    channels["orchestrator.usage"] = {
        "address": "orchestrator.usage",
        "title": "Kafka topic orchestrator.usage (ORCH_USAGE_TOPIC)",
        "description": "Measured usage of each step attempt. Record key: the tenant id "
        "(UTF-8), so a tenant's records stay in one partition; value: a UsageEvent as JSON "
        "(UTF-8). The topic uses LogAppendTime: the violations consumer judges by the "
        "broker's append time. Besides usage records the violations consumer appends a "
        f"tick to every partition every ORCH_VIOLATIONS_TICK_S: key {TICK_KEY!r} (a NUL "
        "byte then `tick`, never a tenant id), value `{}`; it closes windows "
        "deterministically. Other readers of the topic skip records with that key.",
        "messages": {
            **message_refs((usage_type,)),
            "Tick": {"$ref": "#/components/messages/Tick"},
        },
        "bindings": {
            "kafka": {"topic": "orchestrator.usage", "bindingVersion": KAFKA_BINDING_VERSION}
        },
    }
    messages["Tick"] = {
        "name": "violations.tick",
        "title": "Tick",
        "summary": "The violations consumer's clock record (key \\x00tick, value {}).",
        "contentType": "application/json",
        "payload": {"type": "object", "maxProperties": 0},
        "bindings": {
            "kafka": {
                "key": {"type": "string", "const": TICK_KEY.decode()},
                "bindingVersion": KAFKA_BINDING_VERSION,
            }
        },
    }
    channels["orchestrator.usage.dlq"] = {
        "address": "orchestrator.usage.dlq",
        "title": "Kafka topic orchestrator.usage.dlq",
        "description": "Usage records the violations consumer could not read: key and value "
        "as they were, headers orch-reason (invalid_usage_event) and orch-detail (UTF-8). "
        "`orchestrator dlq list` counts them.",
        "messages": {"KafkaDeadLetter": {"$ref": "#/components/messages/KafkaDeadLetter"}},
        "bindings": {
            "kafka": {"topic": "orchestrator.usage.dlq", "bindingVersion": KAFKA_BINDING_VERSION}
        },
    }
    messages["KafkaDeadLetter"] = {
        "name": "usage.dead-letter",
        "title": "KafkaDeadLetter",
        "summary": "A usage record that was not a valid UsageEvent, as it was.",
        "headers": {
            "type": "object",
            "properties": {
                REASON_HEADER: {"type": "string", "const": "invalid_usage_event"},
                DETAIL_HEADER: {"type": "string"},
            },
        },
        "payload": {"description": "the original value, byte for byte"},
    }
    operations["produceUsage"] = {
        "action": "send",
        "summary": "produced by workers, key = tenant",
        "channel": {"$ref": "#/channels/orchestrator.usage"},
        "messages": [{"$ref": f"#/channels/orchestrator.usage/messages/{names[usage_type]}"}],
    }
    operations["consumeUsage"] = {
        "action": "receive",
        "summary": "consumed by the violations consumer (which also appends the ticks)",
        "channel": {"$ref": "#/channels/orchestrator.usage"},
    }
    operations["produceUsageDeadLetters"] = {
        "action": "send",
        "summary": "produced by the violations consumer",
        "channel": {"$ref": "#/channels/orchestrator.usage.dlq"},
    }
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "Fair flow orchestrator",
            "version": "1.0.0",
            "description": "Every message of the orchestrator: RabbitMQ exchanges, queues and "
            "routing keys, and the Kafka usage topic. Generated by `orchestrator schemas "
            "export`; do not edit.",
        },
        "defaultContentType": "application/json",
        "servers": {
            "rabbitmq": {"host": "localhost:5672", "protocol": "amqp", "protocolVersion": "0.9.1"},
            "kafka": {"host": "localhost:9092", "protocol": "kafka"},
        },
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": components},
    }


def _key(text: str) -> str:
    """AsyncAPI 3 keys (channels, operations) must match ^[A-Za-z0-9._-]+$."""
    return re.sub(r"[^A-Za-z0-9._-]", "", text)


def rendered() -> dict[Path, str]:
    """Every generated file and its exact content."""
    files = {
        JSON_DIR / name: json.dumps(schema, indent=2, sort_keys=True) + "\n"
        for name, schema in json_schemas().items()
    }
    files[ASYNCAPI_FILE] = (
        "# Generated by `orchestrator schemas export` from schemas/ and orchestrator/topology.py.\n"
        + yaml.safe_dump(asyncapi(), sort_keys=False, width=100, allow_unicode=True)
    )
    return files


def stale_files() -> list[Path]:
    """Generated files whose committed content differs from what the code generates now."""
    stale = [
        path for path, text in rendered().items() if not path.exists() or path.read_text() != text
    ]
    expected = set(rendered())
    stale += [path for path in JSON_DIR.glob("*.json") if path not in expected]
    return sorted(stale)


def export() -> list[Path]:
    """Writes every generated file; removes schema files of models that no longer exist."""
    JSON_DIR.mkdir(parents=True, exist_ok=True)
    files = rendered()
    for path in JSON_DIR.glob("*.json"):
        if path not in files:
            path.unlink()
    for path, text in files.items():
        path.write_text(text)
    return sorted(files)
