"""The committed JSON Schemas and AsyncAPI document are what the code generates now."""

from __future__ import annotations

import yaml

from orchestrator import apidoc
from schemas import MESSAGES
from schemas.status import STATES


def test_generated_contract_files_are_fresh() -> None:
    stale = apidoc.stale_files()
    assert stale == [], f"stale generated files, run `orchestrator schemas export`: {stale}"


def test_asyncapi_documents_every_message_and_resolves_its_refs() -> None:
    document = yaml.safe_load(apidoc.ASYNCAPI_FILE.read_text())
    assert document["asyncapi"].startswith("3.")
    names = {message["name"] for message in document["components"]["messages"].values()}
    # Besides the models: dead letters (AMQP and Kafka) and the violations consumer's ticks.
    assert names == set(MESSAGES) | {"dead-letter", "usage.dead-letter", "violations.tick"}
    status = document["components"]["messages"]["StatusEvent"]
    assert status["contentType"] == "application/cloudevents+json"
    assert set(status["x-data-schemas"]) == {
        f"io.orchestrator.{entity}.{state}" for entity, states in STATES.items() for state in states
    }
    for name, message in document["components"]["messages"].items():
        if name not in ("UsageEvent", "Tick", "KafkaDeadLetter", "DeadLetter"):
            assert message["bindings"]["amqp"]["messageType"] == message["name"], name
            assert "content_type" in message["x-amqp-properties"]["properties"], name
    for channel in document["channels"].values():
        if channel["address"].endswith(".dlq") and "amqp" in channel["bindings"]:
            assert list(channel["messages"]) == ["DeadLetter"], channel["address"]

    def resolve(ref: str) -> object:
        node: object = document
        for part in ref.removeprefix("#/").split("/"):
            assert isinstance(node, dict)
            assert part in node, f"unresolved $ref {ref}"
            node = node[part]
        return node

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if "$ref" in node:
                resolve(node["$ref"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(document)
    for key in [*document["channels"], *document["operations"]]:
        assert all(c.isalnum() or c in "._-" for c in key), key
