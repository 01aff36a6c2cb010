"""Reading flow definition files (YAML or JSON) with errors that name file, flow and field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from schemas import FlowDefinition


class FlowFileError(Exception):
    """One or more files could not be read or validated; the message lists every problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def _documents(path: Path) -> list[Any]:
    text = path.read_text()
    if path.suffix == ".json":
        return [json.loads(text)]
    return [doc for doc in yaml.safe_load_all(text) if doc is not None]


def _flows_in(document: Any) -> list[Any]:
    """A document is one flow, a list of flows, or a mapping with a `flows` list."""
    if isinstance(document, dict) and set(document) == {"flows"}:
        document = document["flows"]
    return document if isinstance(document, list) else [document]


def _describe(raw: Any, index: int) -> str:
    if isinstance(raw, dict) and "id" in raw:
        return f"flow {raw.get('tenant', '?')}/{raw['id']}"
    return f"flow #{index + 1}"


def load_flow_files(paths: list[Path]) -> list[FlowDefinition]:
    """Validates every flow in every file; raises FlowFileError listing all problems."""
    flows: list[FlowDefinition] = []
    problems: list[str] = []
    for path in paths:
        try:
            documents = _documents(path)
        except (OSError, json.JSONDecodeError, yaml.YAMLError) as exc:
            problems.append(f"{path}: cannot read: {exc}")
            continue
        raws = [raw for document in documents for raw in _flows_in(document)]
        if not raws:
            problems.append(f"{path}: no flow definitions found")
        for index, raw in enumerate(raws):
            try:
                flows.append(FlowDefinition.model_validate(raw))
            except ValidationError as exc:
                for error in exc.errors(include_url=False):
                    location = ".".join(str(part) for part in error["loc"]) or "<flow>"
                    problems.append(f"{path}: {_describe(raw, index)}: {location}: {error['msg']}")
    if problems:
        raise FlowFileError(problems)
    return flows
