"""The Dockerfile, read as text: stages, user, entrypoint, health check and what the final stage installs.

No image is built, because these tests must run where no container engine is.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

# Packages that compile code, which the final stage must not install.
BUILD_TOOLS = re.compile(r"\b(gcc|g\+\+|cc|clang|make|build-essential|build-base|[\w.+-]+-dev|[\w.+-]+-devel)\b")
# Paths the image build needs (pyproject's build backend and the runtime stage).
BUILD_INPUTS = ("pyproject.toml", "README.md", "consumer", "sql", "examples")


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def values(self, keyword: str) -> list[str]:
        return [value for name, value in self.instructions if name == keyword]


def parse_dockerfile(text: str) -> list[Stage]:
    """Split a Dockerfile into stages of (INSTRUCTION, arguments), joining continued lines and
    substituting ARGs declared before the first FROM."""
    logical: list[str] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1].rstrip() + " "
            continue
        logical.append(pending + stripped)
        pending = ""

    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, arguments = line.partition(" ")
        keyword = keyword.upper()
        arguments = arguments.strip()
        if keyword == "ARG" and not stages:
            arg_name, _, default = arguments.partition("=")
            global_args[arg_name] = default
        elif keyword == "FROM":
            expanded = re.sub(r"\$\{(\w+)\}", lambda match: global_args.get(match.group(1), ""), arguments)
            words = [word for word in expanded.split() if not word.startswith("--")]
            stage_name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=stage_name))
        else:
            assert stages, f"{keyword} before the first FROM"
            stages[-1].instructions.append((keyword, arguments))
    return stages


def exec_form(arguments: str) -> list[str]:
    """Parse the JSON (exec) form of ENTRYPOINT, CMD or HEALTHCHECK CMD."""
    parsed: Any = json.loads(arguments)
    assert isinstance(parsed, list), f"{arguments} is not in exec form"
    return [str(item) for item in parsed]


@pytest.fixture(scope="module")
def stages(repo_root: Path) -> list[Stage]:
    return parse_dockerfile((repo_root / "Dockerfile").read_text())


@pytest.fixture(scope="module")
def final(stages: list[Stage]) -> Stage:
    return stages[-1]


def test_build_is_multi_stage(stages: list[Stage], final: Stage) -> None:
    builder_names = [stage.name for stage in stages[:-1]]

    assert len(stages) >= 2
    assert any(f"--from={name}" in copy for copy in final.values("COPY") for name in builder_names)


def test_final_stage_is_slim(final: Stage) -> None:
    assert re.fullmatch(r"python:3\.\d+(\.\d+)?-slim(-\w+)?", final.base), final.base


def test_final_stage_installs_no_build_tools(final: Stage) -> None:
    for command in final.values("RUN"):
        installs = re.search(r"\b(apt-get|apt|apk|dnf|yum)\b.*\binstall\b(.*)", command)
        if installs:
            assert not BUILD_TOOLS.search(installs.group(2)), f"final stage installs build tools: {command}"
        assert "pip install" not in command, f"final stage downloads packages: {command}"


def test_final_stage_runs_as_numeric_non_root_user(final: Stage) -> None:
    users = final.values("USER")

    assert users, "the final stage sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit(), f"USER {users[-1]} is not numeric; Kubernetes runAsNonRoot can only verify a numeric uid"
    assert int(uid) != 0


def test_entrypoint_is_consumer(final: Stage) -> None:
    assert exec_form(final.values("ENTRYPOINT")[-1]) == ["consumer"]


def test_health_check_runs_consumer_healthcheck(final: Stage, parse_command: Any) -> None:
    check = final.values("HEALTHCHECK")[-1]
    _, _, command = check.partition(" CMD ")
    argv = exec_form(command.strip())

    assert argv[:2] == ["consumer", "healthcheck"]
    parse_command(argv[1:])


def test_examples_are_copied(final: Stage) -> None:
    copies = [shlex.split(copy) for copy in final.values("COPY")]

    assert any(words[0] == "examples" for words in copies)


def test_env_vars_are_settings_fields(final: Stage, settings_env_names: set[str]) -> None:
    names = [assignment.split("=", 1)[0] for env in final.values("ENV") for assignment in shlex.split(env)]
    unknown = [name for name in names if name.startswith("CONSUMER_") and name not in settings_env_names]

    assert not unknown, f"the image sets variables that no settings field reads: {unknown}"


def test_dockerignore_keeps_build_inputs(repo_root: Path) -> None:
    patterns = {
        line.strip()
        for line in (repo_root / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }

    assert {".git", ".cache", "tests"} <= patterns
    for path in BUILD_INPUTS:
        assert path not in patterns, f".dockerignore drops {path}, which the image build needs"
        assert (repo_root / path).exists(), f"{path} is missing from the repository"


def test_parser_joins_continued_lines() -> None:
    dockerfile = (
        "ARG BASE=python:3.12-slim\n"
        "FROM ${BASE} AS runtime\n"
        "# note\n"
        "RUN apt-get update \\\n"
        "    && apt-get install -y gcc\n"
    )

    stages = parse_dockerfile(dockerfile)

    assert stages[0].base == "python:3.12-slim"
    assert stages[0].name == "runtime"
    assert stages[0].values("RUN") == ["apt-get update && apt-get install -y gcc"]
