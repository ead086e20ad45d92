"""docker-compose.yml: the Compose specification, start order, health checks and settings names.

The file is validated against the Compose specification's JSON schema, vendored
in tests/deploy/schemas/ (see the README there for its source and licence).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from consumer import settings

SCHEMA_DIR = Path(__file__).parent / "schemas"
COMPOSE_SCHEMA_SHA256 = "46b7d35f19dd93a05f8fea530291bf84d881c1791ec167ecf0e6fb94e639d496"
APP_IMAGE = "consumer:local"


@pytest.fixture(scope="module")
def compose(repo_root: Path) -> dict[str, Any]:
    with (repo_root / "docker-compose.yml").open() as file:
        document: dict[str, Any] = yaml.safe_load(file)
    return document


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = compose["services"]
    return result


def uses_app_image(service: dict[str, Any]) -> bool:
    return service.get("image") == APP_IMAGE and "entrypoint" not in service


def depends_on(service: dict[str, Any]) -> dict[str, str]:
    return {name: spec["condition"] for name, spec in service.get("depends_on", {}).items()}


def test_vendored_schema_is_unchanged() -> None:
    digest = hashlib.sha256((SCHEMA_DIR / "compose-spec.json").read_bytes()).hexdigest()

    assert digest == COMPOSE_SCHEMA_SHA256


def test_compose_file_matches_specification(compose: dict[str, Any]) -> None:
    schema = json.loads((SCHEMA_DIR / "compose-spec.json").read_text())
    validator = jsonschema.Draft7Validator(schema)

    errors = [f"{'/'.join(map(str, error.absolute_path))}: {error.message}" for error in validator.iter_errors(compose)]

    assert not errors, errors


def test_schema_rejects_unknown_condition(compose: dict[str, Any]) -> None:
    schema = json.loads((SCHEMA_DIR / "compose-spec.json").read_text())
    broken = json.loads(json.dumps(compose))
    broken["services"]["consumer"]["depends_on"]["migrate"]["condition"] = "service_finished"

    assert list(jsonschema.Draft7Validator(schema).iter_errors(broken))


def test_stack_has_every_service(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == {"kafka", "topics", "postgres", "migrate", "consumer", "loader"}


def test_kafka_runs_kraft_without_zookeeper(services: dict[str, dict[str, Any]]) -> None:
    environment = services["kafka"]["environment"]

    assert set(environment["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert not any("zookeeper" in name.lower() for name in services)


def test_pulled_images_are_pinned(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        if "build" in service:
            continue
        image = service["image"]
        repository, _, tag = image.rpartition(":")
        assert repository, f"{name} uses {image}, which names no repository"
        assert re.fullmatch(r"\d+(\.\d+)+", tag), f"{name} uses {image}; pin a version tag such as :1.2.3"
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["postgres"]["image"].startswith("postgres:")


def test_start_order(services: dict[str, dict[str, Any]]) -> None:
    assert depends_on(services["topics"]) == {"kafka": "service_healthy"}
    assert depends_on(services["migrate"]) == {"postgres": "service_healthy"}
    assert depends_on(services["consumer"]) == {
        "topics": "service_completed_successfully",
        "migrate": "service_completed_successfully",
    }
    assert depends_on(services["loader"]) == {"consumer": "service_healthy"}


def test_awaited_services_have_health_checks(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for dependency, condition in depends_on(service).items():
            if condition == "service_healthy":
                check = services[dependency].get("healthcheck", {})
                assert check.get("test"), f"{name} waits for {dependency}, which has no health check"
                assert not check.get("disable"), f"{name} waits for {dependency}, whose health check is disabled"


def test_one_shot_services_do_not_restart(services: dict[str, dict[str, Any]]) -> None:
    for name in ("topics", "migrate", "loader"):
        assert services[name]["restart"] == "no", name


def test_env_vars_are_settings_fields(services: dict[str, dict[str, Any]], settings_env_names: set[str]) -> None:
    for name, service in services.items():
        unknown = sorted(
            variable
            for variable in service.get("environment", {})
            if variable.startswith("CONSUMER_") and variable not in settings_env_names
        )
        assert not unknown, f"{name} sets variables that no settings field reads: {unknown}"


def test_settings_load_from_service_env(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # tmp_path as the working directory keeps a developer's .env file out of the check.
    monkeypatch.chdir(tmp_path)
    for name in ("migrate", "consumer"):
        with monkeypatch.context() as patch:
            for variable in [key for key in os.environ if key.startswith("CONSUMER_")]:
                patch.delenv(variable)
            for variable, value in services[name]["environment"].items():
                patch.setenv(variable, str(value))
            loaded = settings.load()
        assert loaded.kafka.bootstrap_servers == ["kafka:9092"], name
        assert loaded.postgres.dsn is not None, name


def test_app_commands_parse(services: dict[str, dict[str, Any]], parse_command: Any) -> None:
    for service in services.values():
        if uses_app_image(service):
            parse_command(service["command"])


def test_health_check_command_parses(services: dict[str, dict[str, Any]], parse_command: Any) -> None:
    test = services["consumer"]["healthcheck"]["test"]

    assert test[:2] == ["CMD", "consumer"]
    parse_command(test[2:])


def test_stop_grace_exceeds_shutdown_timeout(services: dict[str, dict[str, Any]]) -> None:
    consumer = services["consumer"]
    timeout = float(consumer["environment"]["CONSUMER_WORKER__SHUTDOWN_TIMEOUT_S"])
    grace = consumer["stop_grace_period"]

    assert grace.endswith("s")
    assert float(grace.removesuffix("s")) > timeout


def test_health_port_is_published(services: dict[str, dict[str, Any]]) -> None:
    consumer = services["consumer"]
    port = consumer["environment"]["CONSUMER_WORKER__HEALTH_PORT"]

    assert any(mapping.endswith(f":{port}") for mapping in consumer["ports"])


def test_host_ports_bind_to_loopback(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for mapping in service.get("ports", []):
            assert str(mapping).startswith("127.0.0.1:"), f"{name} publishes {mapping} on every interface"


def test_bind_mounts_exist(services: dict[str, dict[str, Any]], repo_root: Path) -> None:
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (repo_root / source).is_dir(), f"{name} mounts {source}, which does not exist"


def test_loader_input_exists(services: dict[str, dict[str, Any]], repo_root: Path) -> None:
    loader = services["loader"]
    mounts = dict(volume.split(":")[:2][::-1] for volume in loader["volumes"])
    script = " ".join(loader["command"])
    container_path = re.search(r"<\s*(\S+)", script)

    assert container_path is not None, "the loader reads no input file"
    folder, _, file_name = container_path.group(1).rpartition("/")
    assert (repo_root / mounts[folder] / file_name).is_file()
