"""Fixtures for the deployment tests: a pinned Helm binary, chart rendering and settings names.

Nothing here builds or runs an image: the chart is rendered with ``helm
template`` and the Compose file and the Dockerfile are read as text, so the
tests run on a machine without a container engine.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "helm" / "consumer"
CI_VALUES = sorted((CHART_DIR / "ci").glob("*-values.yaml"))
# Kubernetes version for `helm template --kube-version` and for kubernetes-validate.
KUBE_VERSION = "1.30.0"
RELEASE = "rel"
NAMESPACE = "apps"


class HelmError(Exception):
    """`helm` exited non-zero. The message is its stderr."""


class Helm:
    """Runs the pinned Helm binary against the chart with an isolated Helm home."""

    def __init__(self, binary: Path, home: Path, scratch: Path) -> None:
        self.binary = binary
        self.scratch = scratch
        self.env = {
            **os.environ,
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_DATA_HOME": str(home / "data"),
        }
        self._rendered: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        self._counter = 0

    def run(self, *args: str) -> str:
        result = subprocess.run(
            [str(self.binary), *args], capture_output=True, text=True, env=self.env, check=False, timeout=120
        )
        if result.returncode != 0:
            raise HelmError(result.stderr.strip() or result.stdout.strip())
        return result.stdout

    def values_file(self, values: dict[str, Any]) -> Path:
        """Write values to a fresh YAML file and return its path."""
        self._counter += 1
        path = self.scratch / f"values-{self._counter}.yaml"
        path.write_text(yaml.safe_dump(values, sort_keys=False))
        return path

    def template_args(self, files: list[Path]) -> list[str]:
        args = ["template", RELEASE, str(CHART_DIR), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION]
        for file in files:
            args += ["--values", str(file)]
        return args

    def template(self, *files: Path, values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Render the chart and return its manifests, hooks included."""
        paths = [*files, *([self.values_file(values)] if values is not None else [])]
        key = tuple(str(path) for path in files) if values is None else ()
        if key and key in self._rendered:
            return self._rendered[key]
        output = self.run(*self.template_args(paths))
        manifests = [doc for doc in yaml.safe_load_all(output) if doc]
        if key:
            self._rendered[key] = manifests
        return manifests

    def template_error(self, *files: Path, values: dict[str, Any] | None = None) -> str:
        """Render the chart expecting a failure and return Helm's message."""
        paths = [*files, *([self.values_file(values)] if values is not None else [])]
        try:
            self.run(*self.template_args(paths))
        except HelmError as exc:
            return str(exc)
        raise AssertionError(f"helm template succeeded with values {values!r}; expected it to fail")


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    """The pinned Helm binary, fetched once into .cache/helm by scripts/fetch_helm.py."""
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "fetch_helm.py")],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    if result.returncode != 0:
        message = result.stderr.strip()
        if "built for linux/amd64" in message:
            pytest.skip(message)
        pytest.fail(f"scripts/fetch_helm.py failed: {message}")
    binary = Path(result.stdout.strip())
    return Helm(binary, tmp_path_factory.mktemp("helm-home"), tmp_path_factory.mktemp("helm-values"))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def chart_dir() -> Path:
    return CHART_DIR


@pytest.fixture(scope="session")
def kube_version() -> str:
    return KUBE_VERSION


@pytest.fixture(params=CI_VALUES, ids=lambda path: path.name)
def ci_values(request: pytest.FixtureRequest) -> Path:
    """Each values file under helm/consumer/ci/ in turn."""
    path: Path = request.param
    return path


@pytest.fixture(scope="session")
def minimal_values() -> dict[str, Any]:
    """The chart's minimal CI values, as a dict to extend in failure cases."""
    with (CHART_DIR / "ci" / "minimal-values.yaml").open() as file:
        values: dict[str, Any] = yaml.safe_load(file)
    return values


@pytest.fixture(scope="session")
def settings_env_names() -> set[str]:
    """Every environment variable the settings read, from consumer.settings itself."""
    from consumer import settings

    return {*settings.env_var_names().values(), settings.SECRETS_DIR_VAR}


@pytest.fixture(scope="session")
def cli_parser() -> argparse.ArgumentParser:
    """The CLI's argparse parser, so commands in manifests are checked against the real CLI."""
    try:
        from consumer.cli import build_parser
    except ImportError as exc:
        pytest.skip(f"consumer.cli.build_parser cannot be imported yet ({exc}); command lines are unchecked")
    return build_parser()


@pytest.fixture
def parse_command(cli_parser: argparse.ArgumentParser) -> Callable[[list[str]], argparse.Namespace]:
    """Parse a `consumer ...` argument list with the CLI parser, failing the test with argparse's message."""

    def parse(arguments: list[str]) -> argparse.Namespace:
        messages = io.StringIO()
        try:
            with contextlib.redirect_stderr(messages):
                return cli_parser.parse_args(arguments)
        except SystemExit:
            error = messages.getvalue().strip().splitlines()[-1:]
            pytest.fail(f"`consumer {' '.join(arguments)}` is not a valid command line: {' '.join(error)}")

    return parse
