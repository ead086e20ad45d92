"""The operations docs list every log action the code uses and every metric the worker exports."""

from __future__ import annotations

import re

import pytest
from prometheus_client.metrics import MetricWrapperBase

from consumer.metrics import Metrics
from tests.support.process import REPO_ROOT

pytestmark = pytest.mark.unit

# The value of "action" in an `extra` dict, including conditional forms such
# as `"a" if parked else "b"`: every string literal up to the next comma.
_ACTION = re.compile(r'"action":\s*([^,\n}]+)')
_LITERAL = re.compile(r'"([a-z][a-z0-9_]*)"')


def logged_actions() -> set[str]:
    actions: set[str] = set()
    for path in (REPO_ROOT / "consumer").rglob("*.py"):
        for expression in _ACTION.findall(path.read_text()):
            actions.update(_LITERAL.findall(expression))
    return actions


def exported_metric_names() -> set[str]:
    """Return the names as exposed: counters get the ``_total`` suffix."""
    metrics = Metrics("docs")
    names: set[str] = set()
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            suffix = "_total" if value._type == "counter" else ""
            names.add(value._name + suffix)
    return names


def test_logging_doc_lists_every_action() -> None:
    text = (REPO_ROOT / "docs" / "logging.md").read_text()
    documented = set(re.findall(r"`([a-z][a-z0-9_]*)`", text))
    actions = logged_actions()
    assert len(actions) > 40, "the action pattern no longer matches the code"
    assert sorted(actions - documented) == []


def test_operations_doc_lists_every_metric() -> None:
    text = (REPO_ROOT / "docs" / "operations.md").read_text()
    names = exported_metric_names()
    assert "consumer_messages_processed_total" in names
    missing = sorted(name for name in names if f"`{name}`" not in text)
    assert missing == []
