"""The generated reference pages match the code they are generated from."""

from __future__ import annotations

import importlib.util
from types import ModuleType

import pytest

from consumer import cli, settings
from tests.support.process import REPO_ROOT

pytestmark = pytest.mark.unit

REGENERATE = "run `python scripts/gen_reference.py` and commit the result"


def load_generator() -> ModuleType:
    path = REPO_ROOT / "scripts" / "gen_reference.py"
    spec = importlib.util.spec_from_file_location("gen_reference", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_reference_is_current() -> None:
    generator = load_generator()

    committed = generator.CONFIGURATION_PAGE.read_text()

    assert committed == generator.render_configuration(), (
        f"docs/reference/configuration.md is out of date; {REGENERATE}"
    )


def test_cli_reference_is_current() -> None:
    generator = load_generator()

    committed = generator.CLI_PAGE.read_text()

    expected = generator.render_cli()
    assert committed == expected, f"docs/reference/cli.md is out of date; {REGENERATE}"


def test_configuration_reference_lists_every_variable() -> None:
    text = load_generator().render_configuration()

    missing = [name for name in settings.env_var_names().values() if f"`{name}`" not in text]

    assert missing == []


def test_cli_reference_lists_every_command() -> None:
    text = load_generator().render_cli()
    parser = cli.build_parser()
    commands = next(action for action in parser._actions if action.dest == "command")

    missing = [name for name in commands.choices if f"## `consumer {name}`" not in text]

    assert missing == []
