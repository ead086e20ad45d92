"""The Helm chart: lint, Kubernetes schemas, settings wiring and the checks its templates enforce.

Every case renders the chart with the pinned Helm binary (`helm template`),
so a template error, a schema rejection or a `fail` in the chart shows up
exactly as `helm install` would report it, without a cluster.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import kubernetes_validate
import pydantic
import pytest
import yaml
from cloudcoil.models.keda.v1alpha1 import ScaledObject, TriggerAuthentication
from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor

from consumer import errors, settings

# Custom resources are checked against models generated from their CRDs
# (KEDA 2.16, Prometheus Operator 0.80), because kubernetes-validate has
# schemas for the built-in kinds only.
CUSTOM_RESOURCE_MODELS: dict[tuple[str, str], type[pydantic.BaseModel]] = {
    ("keda.sh/v1alpha1", "ScaledObject"): ScaledObject,
    ("keda.sh/v1alpha1", "TriggerAuthentication"): TriggerAuthentication,
    ("monitoring.coreos.com/v1", "ServiceMonitor"): ServiceMonitor,
}
# Settings the application cannot start without.
REQUIRED_ENV = ("CONSUMER_KAFKA__BOOTSTRAP_SERVERS", "CONSUMER_POSTGRES__DSN")
SHUTDOWN_TIMEOUT_ENV = "CONSUMER_WORKER__SHUTDOWN_TIMEOUT_S"


# --- helpers over rendered manifests ---------------------------------------------------------------


def of_kind(manifests: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [manifest for manifest in manifests if manifest["kind"] == kind]


def named(manifests: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [manifest for manifest in of_kind(manifests, kind) if manifest["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} named {name}, found {len(matches)}"
    return matches[0]


def pod_specs(manifests: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """Return (workload name, pod spec) for every Deployment and Job."""
    return [
        (manifest["metadata"]["name"], manifest["spec"]["template"]["spec"])
        for manifest in manifests
        if manifest["kind"] in ("Deployment", "Job")
    ]


def container_env(manifests: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, Any]:
    """Resolve a container's environment as Kubernetes does: envFrom ConfigMaps first, then env entries."""
    env: dict[str, Any] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            configmap = named(manifests, "ConfigMap", source["configMapRef"]["name"])
            env.update(configmap.get("data", {}))
    for entry in container.get("env", []):
        env[entry["name"]] = entry.get("value", entry.get("valueFrom"))
    return env


def load_values(path: Path) -> dict[str, Any]:
    with path.open() as file:
        values: dict[str, Any] = yaml.safe_load(file)
    return values


def with_changes(values: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """Copy values and apply changes given as dotted paths with __ for dots (config__worker__x=1)."""
    result = copy.deepcopy(values)
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        target = result
        for key in parents:
            target = target.setdefault(key, {})
        target[last] = value
    return result


def load_schema_sync_script(repo_root: Path) -> Any:
    spec = importlib.util.spec_from_file_location("sync_chart_schema", repo_root / "scripts" / "sync_chart_schema.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def without_descriptions(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {key: without_descriptions(value) for key, value in schema.items() if key != "description"}
    if isinstance(schema, list):
        return [without_descriptions(item) for item in schema]
    return schema


def value_paths(chart_dir: Path) -> tuple[list[str], list[str]]:
    """Walk values.yaml beside values.schema.json and return (documented paths, paths the schema lacks).

    A value whose schema has no `properties` (a Kubernetes object passed
    through, such as `resources` or `podSecurityContext`) is one path, and so
    is every value that is empty by default.
    """
    schema = json.loads((chart_dir / "values.schema.json").read_text())
    documented: list[str] = []
    undeclared: list[str] = []

    def resolve(node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node:
            node = schema["definitions"][node["$ref"].rsplit("/", 1)[-1]]
        return node

    def walk(value: Any, node: dict[str, Any], path: str) -> None:
        node = resolve(node)
        if not (isinstance(value, dict) and value and "properties" in node):
            documented.append(path)
            return
        for key, child in value.items():
            child_path = f"{path}.{key}" if path else key
            if key not in node["properties"]:
                undeclared.append(child_path)
            else:
                walk(child, node["properties"][key], child_path)

    walk(load_values(chart_dir / "values.yaml"), schema, "")
    return documented, undeclared


# --- lint and schemas -------------------------------------------------------------------------------


def test_lint_passes(helm: Any, chart_dir: Path, ci_values: Path) -> None:
    helm.run("lint", "--strict", str(chart_dir), "--values", str(ci_values))


def test_manifests_match_kubernetes_schemas(helm: Any, ci_values: Path, kube_version: str) -> None:
    for manifest in helm.template(ci_values):
        label = f"{manifest['kind']}/{manifest['metadata']['name']}"
        model = CUSTOM_RESOURCE_MODELS.get((manifest["apiVersion"], manifest["kind"]))
        if model is not None:
            try:
                model.model_validate(manifest, extra="forbid")
            except pydantic.ValidationError as exc:
                pytest.fail(f"{label} does not match its CRD: {exc}")
            continue
        try:
            kubernetes_validate.validate(manifest, kube_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{label} at {list(exc.path)}: {exc.message}")


def test_validator_rejects_unknown_field(helm: Any, chart_dir: Path, kube_version: str) -> None:
    deployment = copy.deepcopy(of_kind(helm.template(chart_dir / "ci" / "minimal-values.yaml"), "Deployment")[0])
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["timeoutSecond"] = 3

    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kube_version, strict=True)


def test_values_schema_rejects_misspelt_setting(helm: Any, minimal_values: dict[str, Any]) -> None:
    values = with_changes(minimal_values, config__worker__shutdown_timeout=30)

    message = helm.template_error(values=values)

    assert "shutdown_timeout" in message


def test_values_schema_rejects_schema_per_handler(helm: Any, minimal_values: dict[str, Any]) -> None:
    values = copy.deepcopy(minimal_values)
    values["handlers"][0]["config"] = {"postgres": {"schema": "other"}}

    message = helm.template_error(values=values)

    assert "schema" in message


def test_values_schema_declares_every_value(chart_dir: Path) -> None:
    _, undeclared = value_paths(chart_dir)

    assert not undeclared, f"values.yaml entries missing from values.schema.json: {undeclared}"


def test_values_schema_matches_settings(repo_root: Path, chart_dir: Path) -> None:
    sync = load_schema_sync_script(repo_root)
    current = json.loads((chart_dir / "values.schema.json").read_text())["definitions"]

    for name, expected in (
        ("config", sync.config_schema(for_handler=False)),
        ("handlerConfig", sync.config_schema(for_handler=True)),
    ):
        assert without_descriptions(current[name]) == without_descriptions(expected), (
            f"definitions.{name} in values.schema.json no longer matches consumer.settings; "
            "run python scripts/sync_chart_schema.py"
        )


def test_readme_lists_every_value(chart_dir: Path) -> None:
    readme = (chart_dir / "README.md").read_text()
    documented, _ = value_paths(chart_dir)
    missing = [path for path in documented if f"`{path}`" not in readme]
    assert not missing, f"helm/consumer/README.md has no row for: {missing}"


# --- settings wiring --------------------------------------------------------------------------------


def test_env_vars_are_settings_fields(helm: Any, ci_values: Path, settings_env_names: set[str]) -> None:
    manifests = helm.template(ci_values)
    names: set[str] = set()
    for configmap in of_kind(manifests, "ConfigMap"):
        names.update(configmap.get("data", {}))
    for _, spec in pod_specs(manifests):
        for container in spec["containers"]:
            names.update(entry["name"] for entry in container.get("env", []))
    for auth in of_kind(manifests, "TriggerAuthentication"):
        names.update(entry["name"] for entry in auth["spec"].get("env", []))

    unknown = sorted(name for name in names if name.startswith("CONSUMER_") and name not in settings_env_names)

    assert not unknown, f"the chart sets variables that no settings field reads: {unknown}"


def test_rendered_settings_load(helm: Any, ci_values: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    manifests = helm.template(ci_values)
    # tmp_path as the working directory keeps a developer's .env file out of the check.
    monkeypatch.chdir(tmp_path)
    for workload, spec in pod_specs(manifests):
        env = container_env(manifests, spec["containers"][0])
        with monkeypatch.context() as patch:
            for variable in [key for key in os.environ if key.startswith("CONSUMER_")]:
                patch.delenv(variable)
            for variable, value in env.items():
                patch.setenv(variable, stand_in(variable, value))
            try:
                settings.load()
            except errors.ConfigurationError as exc:
                pytest.fail(f"{workload}: the rendered settings do not load: {exc}")


def stand_in(variable: str, value: Any) -> str:
    """Return a literal value as it is, and a plausible value for one taken from a Secret or the pod."""
    if isinstance(value, str):
        return value
    if "secretKeyRef" in value and variable == "CONSUMER_POSTGRES__DSN":
        return "postgresql://consumer:secret@postgres:5432/consumer"
    if "secretKeyRef" in value:
        return "secret"
    return "rel-consumer-0"


def test_required_settings_reach_every_container(helm: Any, ci_values: Path) -> None:
    manifests = helm.template(ci_values)
    for workload, spec in pod_specs(manifests):
        env = container_env(manifests, spec["containers"][0])
        for name in REQUIRED_ENV:
            assert name in env, f"{workload} does not set {name}"


def test_every_secret_field_has_a_secret_key(helm: Any, minimal_values: dict[str, Any]) -> None:
    secret_fields = {
        env_name for path, env_name in settings.env_var_names().items() if "." in path and _is_secret(path)
    }
    values = with_changes(
        minimal_values,
        secrets={"existingSecret": "app-secrets"},
        config__kafka__sasl_mechanism="SCRAM-SHA-512",
        config__kafka__ssl_keyfile="/etc/kafka-client/tls.key",
    )
    manifests = helm.template(values=values)
    deployment = of_kind(manifests, "Deployment")[0]
    from_secrets = {
        entry["name"]
        for entry in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        if "secretKeyRef" in entry.get("valueFrom", {})
    }

    assert from_secrets == secret_fields


def _is_secret(path: str) -> bool:
    group, _, field = path.partition(".")
    model = settings.Settings.model_fields[group].annotation
    assert isinstance(model, type)
    assert issubclass(model, pydantic.BaseModel)
    annotation = next(info for name, info in model.model_fields.items() if (info.alias or name) == field).annotation
    return "SecretStr" in str(annotation)


def test_numbers_render_without_exponent(helm: Any, minimal_values: dict[str, Any]) -> None:
    values = with_changes(
        minimal_values,
        config__kafka__fetch_max_records=1000000,
        config__worker__poll_timeout_s=0.25,
        config__kafka__bootstrap_servers=["kafka-0:9092", "kafka-1:9092"],
    )

    data = of_kind(helm.template(values=values), "ConfigMap")[0]["data"]

    assert data["CONSUMER_KAFKA__FETCH_MAX_RECORDS"] == "1000000"
    assert data["CONSUMER_WORKER__POLL_TIMEOUT_S"] == "0.25"
    assert data["CONSUMER_KAFKA__BOOTSTRAP_SERVERS"] == "kafka-0:9092,kafka-1:9092"


def test_null_setting_is_left_unset(helm: Any, minimal_values: dict[str, Any]) -> None:
    values = copy.deepcopy(minimal_values)
    values["handlers"][0]["config"] = {"log": {"level": None}}

    data = of_kind(helm.template(values=values), "ConfigMap")[0]["data"]

    assert "CONSUMER_LOG__LEVEL" not in data


def test_handler_config_overrides_top_level(helm: Any, chart_dir: Path) -> None:
    manifests = helm.template(chart_dir / "ci" / "multi-handler-values.yaml")

    webhooks = named(manifests, "ConfigMap", "rel-consumer-webhooks")["data"]
    quakes = named(manifests, "ConfigMap", "rel-consumer-quakes")["data"]

    assert webhooks[SHUTDOWN_TIMEOUT_ENV] == "55"
    assert webhooks["CONSUMER_POSTGRES__POOL_MAX_SIZE"] == "4"
    assert quakes[SHUTDOWN_TIMEOUT_ENV] == "25"
    assert webhooks["CONSUMER_KAFKA__TOPICS"] == "github-issues,github-pulls"


def test_user_env_replaces_chart_entry(helm: Any, minimal_values: dict[str, Any]) -> None:
    values = copy.deepcopy(minimal_values)
    dsn_from_vault = {"name": "CONSUMER_POSTGRES__DSN", "valueFrom": {"secretKeyRef": {"name": "vault", "key": "dsn"}}}
    values["handlers"][0]["env"] = [dsn_from_vault]

    container = of_kind(helm.template(values=values), "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
    entries = [entry for entry in container["env"] if entry["name"] == "CONSUMER_POSTGRES__DSN"]

    assert entries == [dsn_from_vault]


def test_container_commands_parse(helm: Any, ci_values: Path, parse_command: Any) -> None:
    for workload, spec in pod_specs(helm.template(ci_values)):
        for container in spec["containers"]:
            assert container["command"] == ["consumer"], f"{workload} does not run the consumer command"
            parse_command(container["args"])


def test_deployments_run_their_handler(helm: Any, ci_values: Path) -> None:
    values = load_values(ci_values)
    manifests = helm.template(ci_values)

    for handler in values["handlers"]:
        deployment = named(manifests, "Deployment", f"rel-consumer-{handler['name']}")
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert container["args"] == ["run", handler["handler"]]


def test_one_consumer_group_per_deployment(helm: Any, ci_values: Path) -> None:
    manifests = helm.template(ci_values)
    deployments = of_kind(manifests, "Deployment")
    containers = [deployment["spec"]["template"]["spec"]["containers"][0] for deployment in deployments]
    groups = [container_env(manifests, container).get("CONSUMER_KAFKA__GROUP_ID") for container in containers]
    explicit = [group for group in groups if group is not None]

    assert len(deployments) == len(load_values(ci_values)["handlers"])
    assert len(explicit) == len(set(explicit))


# --- shutdown timing --------------------------------------------------------------------------------


def test_grace_period_exceeds_shutdown_timeout(helm: Any, ci_values: Path) -> None:
    manifests = helm.template(ci_values)
    default_timeout = settings.WorkerSettings.model_fields["shutdown_timeout_s"].default
    for deployment in of_kind(manifests, "Deployment"):
        spec = deployment["spec"]["template"]["spec"]
        timeout = float(container_env(manifests, spec["containers"][0]).get(SHUTDOWN_TIMEOUT_ENV, default_timeout))
        assert spec["terminationGracePeriodSeconds"] > timeout, deployment["metadata"]["name"]


@pytest.mark.parametrize("grace", [25, 10])
def test_grace_period_at_or_below_timeout_fails(helm: Any, minimal_values: dict[str, Any], grace: int) -> None:
    values = with_changes(minimal_values, terminationGracePeriodSeconds=grace, config__worker__shutdown_timeout_s=25)

    message = helm.template_error(values=values)

    assert "terminationGracePeriodSeconds" in message
    assert "shutdown_timeout_s" in message


def test_handler_timeout_above_grace_fails(helm: Any, minimal_values: dict[str, Any]) -> None:
    values = copy.deepcopy(minimal_values)
    values["handlers"][0]["config"] = {"worker": {"shutdown_timeout_s": 60}}

    message = helm.template_error(values=values)

    assert "handlers[quakes]: terminationGracePeriodSeconds (40)" in message


# --- scaling ------------------------------------------------------------------------------------------


def test_keda_max_replicas_above_partitions_fails(helm: Any, minimal_values: dict[str, Any]) -> None:
    values = copy.deepcopy(minimal_values)
    autoscaling = {"enabled": True, "maxReplicaCount": 4}
    values["handlers"][0].update(groupId="quake-store", partitions=3, autoscaling=autoscaling)

    message = helm.template_error(values=values)

    assert "maxReplicaCount (4) is larger than partitions (3)" in message


def test_keda_needs_partitions(helm: Any, minimal_values: dict[str, Any]) -> None:
    values = copy.deepcopy(minimal_values)
    values["handlers"][0].update(groupId="quake-store", autoscaling={"enabled": True})

    assert "autoscaling needs partitions" in helm.template_error(values=values)


def test_keda_needs_group_id(helm: Any, minimal_values: dict[str, Any]) -> None:
    values = copy.deepcopy(minimal_values)
    values["handlers"][0].update(partitions=3, autoscaling={"enabled": True})

    assert "autoscaling needs groupId" in helm.template_error(values=values)


def test_replicas_above_partitions_fails(helm: Any, minimal_values: dict[str, Any]) -> None:
    values = copy.deepcopy(minimal_values)
    values["handlers"][0].update(replicas=4, partitions=3)

    assert "replicas (4) is larger than partitions (3)" in helm.template_error(values=values)


def test_keda_defaults_max_to_partitions(helm: Any, minimal_values: dict[str, Any]) -> None:
    values = copy.deepcopy(minimal_values)
    values["handlers"][0].update(groupId="quake-store", topics=["quakes"], partitions=6, autoscaling={"enabled": True})

    manifests = helm.template(values=values)
    scaled = of_kind(manifests, "ScaledObject")[0]
    trigger = scaled["spec"]["triggers"][0]["metadata"]

    assert scaled["spec"]["maxReplicaCount"] == 6
    assert trigger["consumerGroup"] == "quake-store"
    assert trigger["topic"] == "quakes"
    assert trigger["allowIdleConsumers"] == "false"
    assert "replicas" not in of_kind(manifests, "Deployment")[0]["spec"]


def test_keda_uses_sasl_credentials(helm: Any, chart_dir: Path) -> None:
    manifests = helm.template(chart_dir / "ci" / "production-values.yaml")
    trigger = of_kind(manifests, "ScaledObject")[0]["spec"]["triggers"][0]
    auth = named(manifests, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    parameters = {ref["parameter"]: ref for ref in auth["spec"]["secretTargetRef"]}

    assert trigger["metadata"]["sasl"] == "scram_sha512"
    assert trigger["metadata"]["tls"] == "enable"
    assert parameters["password"] == {"parameter": "password", "name": "payments-consumer", "key": "kafka-password"}
    assert parameters["ca"]["name"] == "kafka-ca"
    assert auth["spec"]["env"][0]["name"] == "CONSUMER_KAFKA__SASL_USERNAME"


# --- values the chart rejects -------------------------------------------------------------------------


def test_missing_dsn_fails(helm: Any, minimal_values: dict[str, Any]) -> None:
    values = with_changes(minimal_values, secrets={})

    assert "PostgreSQL DSN is missing" in helm.template_error(values=values)


def test_missing_bootstrap_servers_fails(helm: Any, minimal_values: dict[str, Any]) -> None:
    values = with_changes(minimal_values, config__kafka__bootstrap_servers=[])

    assert "bootstrap_servers is empty" in helm.template_error(values=values)


def test_no_handlers_fails(helm: Any, minimal_values: dict[str, Any]) -> None:
    values = with_changes(minimal_values, handlers=[])

    assert "handlers is empty" in helm.template_error(values=values)


def test_duplicate_group_id_fails(helm: Any, minimal_values: dict[str, Any]) -> None:
    values = with_changes(
        minimal_values,
        handlers=[
            {"name": "one", "handler": "app.handlers:One", "groupId": "shared"},
            {"name": "two", "handler": "app.handlers:Two", "groupId": "shared"},
        ],
    )

    assert "group id shared is used by another handler" in helm.template_error(values=values)


def test_duplicate_handler_name_fails(helm: Any, minimal_values: dict[str, Any]) -> None:
    handler = {"name": "same", "handler": "app.handlers:One"}
    values = with_changes(minimal_values, handlers=[handler, handler])

    assert "the name is used twice" in helm.template_error(values=values)


def test_sasl_without_password_fails(helm: Any, minimal_values: dict[str, Any]) -> None:
    values = with_changes(minimal_values, config__kafka__sasl_mechanism="PLAIN", config__kafka__sasl_username="app")

    assert "SASL password is missing" in helm.template_error(values=values)


# --- pod shape ----------------------------------------------------------------------------------------


def test_pods_are_locked_down(helm: Any, ci_values: Path) -> None:
    for workload, spec in pod_specs(helm.template(ci_values)):
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True, workload
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, workload
        assert spec["automountServiceAccountToken"] is False, workload
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, workload
            assert context["allowPrivilegeEscalation"] is False, workload
            assert context["capabilities"]["drop"] == ["ALL"], workload
            assert context["runAsNonRoot"] is True, workload


def test_tmp_is_writable(helm: Any, ci_values: Path) -> None:
    for workload, spec in pod_specs(helm.template(ci_values)):
        volumes = {volume["name"]: volume for volume in spec["volumes"]}
        mounts = {mount["mountPath"]: mount["name"] for mount in spec["containers"][0]["volumeMounts"]}
        # The path inside the pod, where the chart mounts an emptyDir; this test writes nothing there.
        assert "emptyDir" in volumes[mounts["/tmp"]], workload  # noqa: S108


def test_extra_volumes_are_mounted(helm: Any, chart_dir: Path) -> None:
    manifests = helm.template(chart_dir / "ci" / "production-values.yaml")
    for workload, spec in pod_specs(manifests):
        assert {"name": "kafka-ca", "secret": {"secretName": "kafka-ca"}} in spec["volumes"], workload
        mount_paths = {mount["mountPath"] for mount in spec["containers"][0]["volumeMounts"]}
        assert "/etc/kafka-ca" in mount_paths, workload


def test_probes_use_health_server(helm: Any, ci_values: Path) -> None:
    manifests = helm.template(ci_values)
    for deployment in of_kind(manifests, "Deployment"):
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        port = {port["name"]: port["containerPort"] for port in container["ports"]}["http"]
        assert container_env(manifests, container)["CONSUMER_WORKER__HEALTH_PORT"] == str(port)
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
        assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}


def test_pods_spread_over_zones_and_nodes(helm: Any, chart_dir: Path) -> None:
    manifests = helm.template(chart_dir / "ci" / "minimal-values.yaml")
    spec = of_kind(manifests, "Deployment")[0]["spec"]
    constraints = spec["template"]["spec"]["topologySpreadConstraints"]

    assert [constraint["topologyKey"] for constraint in constraints] == [
        "topology.kubernetes.io/zone",
        "kubernetes.io/hostname",
    ]
    for constraint in constraints:
        assert constraint["labelSelector"]["matchLabels"] == spec["selector"]["matchLabels"]


def test_config_change_rolls_pods(helm: Any, minimal_values: dict[str, Any]) -> None:
    def config_checksum(values: dict[str, Any]) -> str:
        deployment = of_kind(helm.template(values=values), "Deployment")[0]
        checksum: str = deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
        return checksum

    changed = with_changes(minimal_values, config__log__level="DEBUG")

    assert config_checksum(minimal_values) != config_checksum(changed)


# --- migration hook -----------------------------------------------------------------------------------


def test_migration_runs_before_install_and_upgrade(helm: Any, ci_values: Path) -> None:
    jobs = of_kind(helm.template(ci_values), "Job")

    assert len(jobs) == 1
    annotations = jobs[0]["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert "before-hook-creation" in annotations["helm.sh/hook-delete-policy"]
    assert jobs[0]["spec"]["template"]["spec"]["containers"][0]["args"][0] == "migrate"


def test_migration_applies_handler_migrations(helm: Any, chart_dir: Path) -> None:
    job = of_kind(helm.template(chart_dir / "ci" / "multi-handler-values.yaml"), "Job")[0]

    args = job["spec"]["template"]["spec"]["containers"][0]["args"]

    assert args == ["migrate", "--handler", "examples.quakes.handler:QuakeHandler"]


def test_migration_reads_hook_secret_copy(helm: Any, chart_dir: Path) -> None:
    manifests = helm.template(chart_dir / "ci" / "minimal-values.yaml")
    job = of_kind(manifests, "Job")[0]
    env = {entry["name"]: entry for entry in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    secret_name = env["CONSUMER_POSTGRES__DSN"]["valueFrom"]["secretKeyRef"]["name"]

    secret = named(manifests, "Secret", secret_name)
    job_weight = int(job["metadata"]["annotations"]["helm.sh/hook-weight"])

    assert "pre-install" in secret["metadata"]["annotations"]["helm.sh/hook"]
    assert int(secret["metadata"]["annotations"]["helm.sh/hook-weight"]) < job_weight


def test_migration_reads_existing_secret(helm: Any, chart_dir: Path) -> None:
    manifests = helm.template(chart_dir / "ci" / "production-values.yaml")
    job = of_kind(manifests, "Job")[0]
    env = {entry["name"]: entry for entry in job["spec"]["template"]["spec"]["containers"][0]["env"]}

    assert env["CONSUMER_POSTGRES__DSN"]["valueFrom"]["secretKeyRef"] == {"name": "payments-consumer", "key": "uri"}
    assert of_kind(manifests, "Secret") == []


# --- optional objects ---------------------------------------------------------------------------------


def test_disruption_budget_per_handler(helm: Any, chart_dir: Path) -> None:
    manifests = helm.template(chart_dir / "ci" / "multi-handler-values.yaml")
    budgets = {budget["metadata"]["name"]: budget["spec"] for budget in of_kind(manifests, "PodDisruptionBudget")}

    assert budgets["rel-consumer-quakes"]["maxUnavailable"] == 1
    assert budgets["rel-consumer-webhooks"] == {
        "minAvailable": 1,
        "selector": named(manifests, "Deployment", "rel-consumer-webhooks")["spec"]["selector"],
    }


def test_service_monitor_scrapes_metrics_service(helm: Any, chart_dir: Path) -> None:
    manifests = helm.template(chart_dir / "ci" / "production-values.yaml")
    monitor = of_kind(manifests, "ServiceMonitor")[0]
    service = of_kind(manifests, "Service")[0]
    deployment = of_kind(manifests, "Deployment")[0]

    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert set(monitor["spec"]["podTargetLabels"]) <= deployment["spec"]["template"]["metadata"]["labels"].keys()


def test_network_policy_allows_dns_and_scrapes(helm: Any, chart_dir: Path) -> None:
    manifests = helm.template(chart_dir / "ci" / "production-values.yaml")
    policy = of_kind(manifests, "NetworkPolicy")[0]["spec"]

    assert policy["policyTypes"] == ["Ingress", "Egress"]
    assert {"port": 53, "protocol": "UDP"} in policy["egress"][0]["ports"]
    assert policy["ingress"][0]["ports"] == [{"port": "http", "protocol": "TCP"}]


def test_optional_objects_off_by_default(helm: Any, chart_dir: Path) -> None:
    kinds = {manifest["kind"] for manifest in helm.template(chart_dir / "ci" / "minimal-values.yaml")}

    assert not kinds & {"ScaledObject", "TriggerAuthentication", "ServiceMonitor", "NetworkPolicy", "ServiceAccount"}
