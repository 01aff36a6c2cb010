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
from schemas.catalog import DOCUMENTS, MESSAGES
from schemas.common import Contract
from schemas.executions import FlowStartRequested
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
    return dict(sorted(components.items())), names


def _amqp_exchange(name: str) -> dict[str, Any]:
    exchange = next(e for e in topology.EXCHANGES if e.name == name)
    return {
        "name": exchange.name,
        "type": exchange.kind.value,
        "durable": True,
        "autoDelete": False,
        "vhost": "/",
    }


def _parameters(address: str) -> dict[str, Any]:
    params = [part.strip("{}") for part in address.replace(".", " ").split() if part[0] == "{"]
    return {p: {"description": f"the {p} id (a slug)"} for p in params}


def asyncapi() -> dict[str, Any]:
    """The AsyncAPI 3.0 document: one channel per published route, one per consumed queue."""
    components, names = _component_schemas()
    messages = {
        names[t]: {
            "name": t,
            "title": names[t],
            "contentType": "application/json",
            "summary": (MESSAGES[t].__doc__ or "").strip().splitlines()[0],
            "payload": {"$ref": f"#/components/schemas/{names[t]}"},
        }
        for t in sorted(names)
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
    consumed = [
        *topology.TOPOLOGY.queues,
        topology.tenant_queue("{tenant}"),
        topology.ingress_queue("{tenant}"),
    ]
    for queue in consumed:
        types = tuple(
            t for b in bindings_by_queue.get(queue.name, []) for t in b.messages
        ) or per_tenant.get(queue.name, ())
        channel_id = _key(queue.name)
        channels[channel_id] = {
            "address": queue.name,
            "title": f"queue {queue.name}",
            "description": queue.description
            + (f" Dead letters go to {queue.dlq}." if queue.dead_letter else ""),
            "messages": message_refs(types),
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
        if types:
            operations[f"consume.{channel_id}"] = {
                "action": "receive",
                "summary": f"consumed by {queue.consumer}",
                "channel": {"$ref": f"#/channels/{channel_id}"},
            }

    usage_type = UsageEvent.message_type
    channels["orchestrator.usage"] = {
        "address": "orchestrator.usage",
        "title": "Kafka topic orchestrator.usage",
        "description": "Measured usage of each step attempt, keyed by tenant.",
        "messages": message_refs((usage_type,)),
        "bindings": {
            "kafka": {"topic": "orchestrator.usage", "bindingVersion": KAFKA_BINDING_VERSION}
        },
    }
    operations["produceUsage"] = {
        "action": "send",
        "summary": "produced by workers, key = tenant",
        "channel": {"$ref": "#/channels/orchestrator.usage"},
    }
    operations["consumeUsage"] = {
        "action": "receive",
        "summary": "consumed by the violations consumer",
        "channel": {"$ref": "#/channels/orchestrator.usage"},
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
