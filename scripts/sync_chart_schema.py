"""Regenerate the settings part of the Helm chart's values.schema.json.

The chart's ``config`` values mirror the fields of ``consumer.settings``:
``config.<group>.<field>`` becomes ``CONSUMER_<GROUP>__<FIELD>``. This script
rewrites the two schema definitions that list those fields,
``definitions.config`` (top-level ``config``) and
``definitions.handlerConfig`` (``handlers[].config``), from the settings
models, so a field added to the application can be set from the chart, and a
misspelt key is rejected instead of becoming a variable the application
ignores.

Fields left out on purpose:

- secrets (``SecretStr`` fields), which come from ``secrets`` and a Secret;
- ``kafka.topics`` and ``kafka.group_id``, set per handler by ``topics`` and ``groupId``;
- ``postgres.schema`` under a handler, because the one migration Job migrates
  the top-level schema only.

Usage: python scripts/sync_chart_schema.py [--check]
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

import annotated_types
from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from consumer import settings  # noqa: E402  (needs the repository on sys.path first)

SCHEMA_PATH = REPO_ROOT / "helm" / "consumer" / "values.schema.json"
PER_HANDLER_FIELDS = {"kafka.topics", "kafka.group_id"}
TOP_LEVEL_ONLY_FIELDS = {"postgres.schema"}


def is_secret(field: FieldInfo) -> bool:
    """Return whether a settings field contains a secret, which the chart takes from a Secret."""
    return SecretStr in _flatten(field.annotation)


def settings_groups() -> dict[str, dict[str, FieldInfo] | FieldInfo]:
    """Map each settings group to its fields by environment name. A top-level field maps to itself."""
    groups: dict[str, dict[str, FieldInfo] | FieldInfo] = {}
    for group_name, group_field in settings.Settings.model_fields.items():
        model = group_field.annotation
        if isinstance(model, type) and issubclass(model, BaseModel):
            groups[group_name] = {field.alias or name: field for name, field in model.model_fields.items()}
        else:
            groups[group_name] = group_field
    return groups


def config_schema(*, for_handler: bool) -> dict[str, Any]:
    """Build the JSON schema of ``config`` (top level) or ``handlers[].config``."""
    properties: dict[str, Any] = {}
    for group_name, fields in settings_groups().items():
        if isinstance(fields, FieldInfo):
            properties[group_name] = field_schema(fields)
            continue
        group_properties = {}
        for name, field in fields.items():
            path = f"{group_name}.{name}"
            if is_secret(field) or path in PER_HANDLER_FIELDS:
                continue
            if for_handler and path in TOP_LEVEL_ONLY_FIELDS:
                continue
            group_properties[name] = field_schema(field)
        properties[group_name] = {"type": "object", "additionalProperties": False, "properties": group_properties}
    return {"type": "object", "additionalProperties": False, "properties": properties}


def field_schema(field: FieldInfo) -> dict[str, Any]:
    """Translate one settings field into a JSON schema that also accepts null (unset)."""
    kinds = [kind for kind in _flatten(field.annotation) if kind is not type(None)]
    schema: dict[str, Any]
    if all(typing.get_origin(kind) is typing.Literal for kind in kinds):
        choices = [choice for kind in kinds for choice in typing.get_args(kind)]
        schema = {"enum": [*choices, None]}
    elif kinds == [list[str]]:
        # Like the application, accept a YAML list or one comma-separated string.
        schema = {"type": ["array", "string", "null"], "items": {"type": "string", "minLength": 1}}
    elif kinds == [bool]:
        schema = {"type": ["boolean", "null"]}
    elif kinds == [int]:
        schema = {"type": ["integer", "null"]}
    elif kinds == [float]:
        schema = {"type": ["number", "null"]}
    elif kinds in ([str], [Path]):
        schema = {"type": ["string", "null"]}
    else:
        raise TypeError(f"no JSON schema mapping for {field.annotation}; extend field_schema()")

    for constraint in field.metadata:
        if isinstance(constraint, annotated_types.Gt):
            schema["exclusiveMinimum"] = constraint.gt
        elif isinstance(constraint, annotated_types.Ge):
            schema["minimum"] = constraint.ge
        elif isinstance(constraint, annotated_types.Lt):
            schema["exclusiveMaximum"] = constraint.lt
        elif isinstance(constraint, annotated_types.Le):
            schema["maximum"] = constraint.le
    if field.description:
        schema["description"] = field.description
    return schema


def _flatten(annotation: Any) -> list[Any]:
    """Unwrap Optional, unions and Annotated into the plain member types."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _flatten(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [kind for arg in typing.get_args(annotation) for kind in _flatten(arg)]
    return [annotation]


def synced_schema() -> dict[str, Any]:
    """Return values.schema.json with both settings definitions regenerated."""
    schema: dict[str, Any] = json.loads(SCHEMA_PATH.read_text())
    schema["definitions"]["config"] = config_schema(for_handler=False)
    schema["definitions"]["handlerConfig"] = config_schema(for_handler=True)
    return schema


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the file is out of date, change nothing")
    args = parser.parse_args()

    current = SCHEMA_PATH.read_text()
    expected = json.dumps(synced_schema(), indent=2) + "\n"
    if current == expected:
        return 0
    if args.check:
        print(f"{SCHEMA_PATH} is out of date; run python scripts/sync_chart_schema.py", file=sys.stderr)
        return 1
    SCHEMA_PATH.write_text(expected)
    print(f"updated {SCHEMA_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
