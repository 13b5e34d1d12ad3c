"""deploy/ is validated, not just written: Dockerfile, Compose, Kubernetes, Prometheus, Grafana.

No Docker engine or Kubernetes cluster runs here, so every check is offline:
hadolint for the Dockerfile, the Compose Specification's JSON schema,
kubernetes-validate's bundled OpenAPI schemas (strict: unknown fields are
errors), promtool for the rules, their unit tests and the dashboard's queries,
and cross-checks that the files agree with each other and with the bridge.
"""

from __future__ import annotations

import http.server
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import tomllib
import zipfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate  # type: ignore[import-untyped]  # ships no type information
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from prometheus_client.metrics_core import Metric

from bridge.config import load_settings
from bridge.devkafka import KAFKA_VERSION, free_port
from bridge.errors import DEAD_LETTER_REASONS
from bridge.metrics import Metrics
from bridge.spool import RESERVE_BYTES
from tests.deploy_support import dockerfile
from tests.deploy_support.dockerignore import DockerIgnore
from tests.deploy_support.prometheus import binary
from tests.deploy_support.shutdown import shutdown_seconds
from tests.process import BridgeProcess

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
SUPPORT = Path(__file__).resolve().parent / "deploy_support"
DOCKERFILE = DEPLOY / "Dockerfile"
PROJECT = "geins-kafka-bridge"
COMPOSE = DEPLOY / "compose.yaml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "bridge.json"
K8S = DEPLOY / "kubernetes"
STANDALONE = K8S / "standalone"
SIDECAR = K8S / "sidecar"

#: Kubernetes versions the manifests must validate against: an old one still
#: run by managed services, and the newest kubernetes-validate ships.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
#: Kinds kubernetes-validate has no schema for, checked by hand below.
OPERATOR_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
REQUIRED_ALERTS = {
    "BridgeDown",
    "BridgeMissing",
    "BridgeNotReady",
    "BridgeDroppingRecords",
    "BridgeKafkaUnreachable",
    "BridgeSpoolGrowing",
    "BridgeSpoolOld",
    "BridgeDeliveryFailures",
    "BridgeServerErrors",
    "BridgeDeliveriesRefused",
    "BridgeDeadLetters",
    "BridgeKafkaSecretsRefused",
}
IMAGE_UID = 10001
#: Seconds a bridge may take to start serving: before it answers anything it runs
#: `PRAGMA quick_check` over its whole spool file (bridge/spool.py), and a full spool
#: (2.5 GB) took about 60 s from a cold page cache. Ten minutes leaves room for slow
#: volumes; the liveness probe alone killed such a bridge after about 25 s, over and over.
STARTUP_BUDGET = 600
SPOOL = "/var/lib/bridge/spool"
#: What every dashboard panel and query reads from: the dashboard's datasource variable.
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


# --- helpers -------------------------------------------------------------------------


def load_docs(path: Path) -> list[dict[str, Any]]:
    """Every non-empty YAML document of a file."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def load_yaml(path: Path) -> dict[str, Any]:
    """A single-document YAML file as a mapping."""
    value: dict[str, Any] = yaml.safe_load(path.read_text())
    assert isinstance(value, dict), path
    return value


def manifests(folder: Path) -> list[dict[str, Any]]:
    """Every Kubernetes object in a folder's YAML files (kustomization.yaml excluded)."""
    return [
        doc
        for path in sorted(folder.glob("*.yaml"))
        if path.name != "kustomization.yaml"
        for doc in load_docs(path)
    ]


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    """The one object of that kind (and name)."""
    found = [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def bridge_container(pod_spec: dict[str, Any]) -> dict[str, Any]:
    """The container that runs `bridge serve`."""
    containers: list[dict[str, Any]] = pod_spec["containers"]
    found = [c for c in containers if c.get("args") == ["bridge", "serve"]]
    assert len(found) == 1, containers
    return found[0]


def env_from(docs: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """The environment a container gets from its ConfigMaps and Secrets."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(find(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
        else:
            env.update(find(docs, "Secret", source["secretRef"]["name"])["stringData"])
    for item in container.get("env", []):
        env[item["name"]] = item["value"]
    return env


def seconds(duration: str) -> float:
    """A Compose/Go duration such as "40s" or "1m30s" in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def run(*command: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    """Run a tool with a time limit; its output in the assertion message on failure."""
    return subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def promtool(*args: str, cwd: Path = REPO) -> None:
    """Run promtool and insist on success."""
    done = run(binary("promtool"), *args, cwd=cwd)
    assert done.returncode == 0, done.stdout + done.stderr


def alert_rules() -> list[dict[str, Any]]:
    """The alerting rules of deploy/prometheus/alerts.yml."""
    groups = load_yaml(ALERTS)["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def dashboard_targets() -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(panel, target) for every query of the Grafana dashboard."""
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            yield panel, target


def promql_for_promtool(expr: str) -> str:
    """A dashboard query with Grafana's variables replaced by plain PromQL."""
    return (
        expr.replace("$__rate_interval", "1m")
        .replace("$__range", "1h")
        .replace("$job", ".*")
        .replace("$instance", ".*")
    )


def exported_series_names() -> set[str]:
    """Every sample name the bridge's /metrics can contain (from its registry)."""
    names: set[str] = set()
    families: list[Metric] = list(Metrics().registry.collect())
    for family in families:
        suffixes = {
            "counter": ("_total",),
            "histogram": ("_bucket", "_sum", "_count"),
            "summary": ("", "_sum", "_count"),
            "info": ("_info",),
        }.get(family.type, ("",))
        names.update(family.name + suffix for suffix in suffixes)
        names.update(sample.name for sample in family.samples)  # _created among them
    return names


# --- Dockerfile ----------------------------------------------------------------------


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    """Pins deploy/Dockerfile lint-clean under hadolint's default rules (any finding fails)."""
    hadolint = Path(sys.executable).parent / "hadolint"
    done = run(str(hadolint), "--no-color", str(DOCKERFILE))
    assert done.returncode == 0, done.stdout + done.stderr
    assert not done.stdout.strip(), done.stdout


def test_dockerfile_builds_a_wheel_and_runs_it_as_non_root_with_a_spool_volume() -> None:
    """Pins the image: multi-stage slim 3.11, wheel, uid 10001, spool volume, health, stop."""
    steps = dockerfile.parse(DOCKERFILE)
    keywords = [step.keyword for step in steps]
    args = {step.keyword: step.args for step in steps}  # the last of each
    base = re.search(r"PYTHON_IMAGE=(\S+)", next(s.args for s in steps if s.keyword == "ARG"))
    assert base is not None
    assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?", base[1])
    assert keywords.count("FROM") == 2
    assert any("pip wheel" in s.args for s in steps if s.keyword == "RUN")
    assert any(s.args.startswith("--from=build ") for s in steps if s.keyword == "COPY")
    assert f"--uid {IMAGE_UID}" in " ".join(s.args for s in steps if s.keyword == "RUN")
    assert args["USER"] == f"{IMAGE_UID}:{IMAGE_UID}"
    volume = next(s for s in steps if s.keyword == "VOLUME")
    assert volume.exec_form() == [SPOOL]
    # The bridge's own defaults: no BRIDGE_* in the image, which would win over a
    # config file's host, port and spool_dir (a review found the spool put on the
    # image's volume, not the one the file named)
    assert not [name for name in image_environment() if name.startswith("BRIDGE_")]
    defaults = load_settings(environ={})
    assert (defaults.host, defaults.port) == ("0.0.0.0", 8080)  # noqa: S104  # the image's
    assert args["WORKDIR"] + "/" + str(defaults.spool_dir) == SPOOL
    assert args["EXPOSE"] == "8080"
    health = next(s for s in steps if s.keyword == "HEALTHCHECK")
    probe = health.exec_form()
    assert probe[0] == "python"
    assert "/healthz" in probe[-1]
    assert args["STOPSIGNAL"] == "SIGTERM"
    assert next(s for s in steps if s.keyword == "CMD").exec_form() == ["bridge", "serve"]
    # USER comes after everything that needs root in the final stage.
    final = keywords[len(keywords) - 1 - keywords[::-1].index("FROM") :]
    assert "RUN" not in final[final.index("USER") :]


def test_image_health_check_waits_for_a_full_spools_check() -> None:
    """Pins the HEALTHCHECK's start period at STARTUP_BUDGET: failures while the bridge
    checks its spool do not count (compose and Swarm use this health check)."""
    health = next(s for s in dockerfile.parse(DOCKERFILE) if s.keyword == "HEALTHCHECK")
    start = re.search(r"--start-period=(\S+)", health.args)
    assert start is not None, health.args
    assert seconds(start[1]) >= STARTUP_BUDGET


def test_docker_run_examples_give_the_bridge_time_to_drain() -> None:
    """Pins `--stop-timeout` in the `docker run` examples (deploy/README.md, the Dockerfile's
    header) above the bridge's shutdown with the default settings: Docker's default of
    10 s killed it in the middle of delivering its spool."""
    for path in (DEPLOY / "README.md", DOCKERFILE):
        text = path.read_text()
        # commands (a line of their own, maybe commented out), not mentions in prose
        commands = re.findall(r"^[#\s]*docker run\b(?:.*\\\n)*.*", text, flags=re.MULTILINE)
        assert commands, path
        for command in commands:
            timeout = re.search(r"--stop-timeout[ =](\d+)", command)
            assert timeout is not None, (path.name, command)
            assert int(timeout[1]) > shutdown_seconds({}), (path.name, command)


def test_docker_build_context_holds_only_what_the_dockerfile_copies() -> None:
    """Pins deploy/Dockerfile.dockerignore: the context is pyproject, README, bridge/
    sources and the dependencies' versions."""
    ignore = DockerIgnore((DEPLOY / "Dockerfile.dockerignore").read_text())
    files = ignore.context_files(REPO)
    assert {"pyproject.toml", "README.md", "bridge/__init__.py", "bridge/cli.py"} <= set(files)
    assert {f.split("/")[0] for f in files} == {"pyproject.toml", "README.md", "bridge", "deploy"}
    assert [f for f in files if f.startswith("deploy/")] == ["deploy/constraints.txt"]
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc")]
    for step in dockerfile.parse(DOCKERFILE):
        if step.keyword == "COPY" and not step.args.startswith("--from"):
            *sources, _ = step.args.split()
            for source in sources:
                assert not ignore.excluded(source), f"COPY {source} is excluded from the context"
    assert ignore.excluded(".venv/bin/python")
    assert ignore.excluded("deploy/compose.yaml")


def test_the_root_dockerignore_has_the_same_rules() -> None:
    """Pins .dockerignore at the context root to deploy/Dockerfile.dockerignore's rules:
    builders that do not read <Dockerfile>.dockerignore (the legacy builder, podman)
    sent the whole work tree as the context, gigabytes of .cache and .venv."""

    def rules(path: Path) -> list[str]:
        lines = path.read_text().splitlines()
        return [line for line in lines if line.strip() and not line.startswith("#")]

    assert rules(REPO / ".dockerignore") == rules(DEPLOY / "Dockerfile.dockerignore")


def pinned_versions() -> dict[str, str]:
    """deploy/constraints.txt as {normalised name: version}."""
    pins: dict[str, str] = {}
    for line in (DEPLOY / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def runtime_distributions() -> dict[str, str]:
    """{normalised name: installed version} of every distribution the bridge needs to
    run: its requirements (no extras of its own) and theirs, with their extras."""
    found: dict[str, str] = {}
    read: set[tuple[str, str]] = set()  # (distribution, extra) whose requirements are in
    wanted = [(requirement, "") for requirement in metadata.requires(PROJECT) or []]
    while wanted:
        text, extra = wanted.pop()
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(requirement.name)
        dist = metadata.distribution(name)
        assert requirement.specifier.contains(dist.version, prereleases=True), text
        found[name] = dist.version
        for its_extra in ("", *sorted(requirement.extras)):
            if (name, its_extra) not in read:
                read.add((name, its_extra))
                wanted.extend((child, its_extra) for child in dist.requires or [])
    return found


def test_constraints_pin_every_dependency_the_bridge_runs_with() -> None:
    """Pins deploy/constraints.txt: every distribution the bridge needs at run time
    (uvicorn's [standard] extra included) is pinned there, to the version installed
    here, which make installs with that file: the image (and `make run`) get the
    versions this suite passed with, not the newest on the day of the build. A new
    dependency without `make lock` fails here."""
    pins = pinned_versions()
    needed = runtime_distributions()
    assert {"aiokafka", "uvloop", "httptools", "starlette"} <= set(needed)
    assert {name: pins.get(name) for name in needed} == needed
    run_step = next(
        s.args
        for s in dockerfile.parse(DOCKERFILE)
        if s.keyword == "RUN" and "pip install" in s.args
    )
    assert "--constraint constraints.txt" in run_step
    assert any(
        "deploy/constraints.txt" in s.args.split()
        for s in dockerfile.parse(DOCKERFILE)
        if s.keyword == "COPY"
    )


@pytest.mark.slow
def test_wheel_builds_from_the_docker_build_context(tmp_path: Path) -> None:
    """Pins that the build stage's `pip wheel` works on exactly the context the image gets."""
    ignore = DockerIgnore((DEPLOY / "Dockerfile.dockerignore").read_text())
    context = tmp_path / "context"
    for name in ignore.context_files(REPO):
        (context / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, context / name)
    done = run(
        sys.executable,
        *("-m", "pip", "wheel", "--quiet", "--no-deps", "--disable-pip-version-check"),
        *("--wheel-dir", str(tmp_path / "wheels"), str(context)),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = (tmp_path / "wheels").glob("geins_kafka_bridge-*.whl")  # what the image installs
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert "bridge = bridge.__main__:main" in archive.read(entry_points).decode()
    assert {"bridge/__main__.py", "bridge/cli.py", "bridge/server.py"} <= set(names)


# --- Compose -------------------------------------------------------------------------


def test_compose_file_matches_the_compose_specification() -> None:
    """Pins deploy/compose.yaml valid against the Compose Specification JSON schema."""
    schema = json.loads((SUPPORT / "compose_spec.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(load_yaml(COMPOSE))
    ]
    assert errors == []


def test_compose_wires_kafka_bridge_prometheus_and_grafana() -> None:
    """Pins the compose services' wiring: KRaft Kafka, bridge build/env/spool, configs mounted."""
    compose = load_yaml(COMPOSE)
    services = compose["services"]
    assert set(services) == {"kafka", "bridge", "prometheus", "grafana"}

    kafka = services["kafka"]
    assert kafka["image"] == f"apache/kafka:{KAFKA_VERSION}"
    assert set(kafka["environment"]["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert "PLAINTEXT://kafka:9092" in kafka["environment"]["KAFKA_ADVERTISED_LISTENERS"]

    bridge = services["bridge"]
    assert (DEPLOY / bridge["build"]["context"]).resolve() == REPO
    assert (REPO / bridge["build"]["dockerfile"]).resolve() == DOCKERFILE
    env = bridge["environment"]
    assert env["BRIDGE_KAFKA_BOOTSTRAP"] == "kafka:9092"
    assert env["BRIDGE_TOKENS"].startswith("${BRIDGE_TOKENS")
    assert env["BRIDGE_SPOOL_DIR"] == SPOOL
    assert f"bridge-spool:{SPOOL}" in bridge["volumes"]
    assert "bridge-spool" in compose["volumes"]
    assert bridge["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert seconds(bridge["stop_grace_period"]) > shutdown_seconds(env)

    mounts: dict[str, str] = {}
    for service in services.values():
        for volume in service.get("volumes", []):
            source, target, *_ = volume.split(":")
            if source.startswith("."):
                assert (DEPLOY / source).exists(), source
                mounts[target] = source
            else:
                assert source in compose["volumes"], source
    prometheus = services["prometheus"]
    assert mounts["/etc/prometheus/prometheus.yml"] == "./prometheus/prometheus.yml"
    assert mounts["/etc/prometheus/alerts.yml"] == "./prometheus/alerts.yml"
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    scrape = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    (job,) = [j for j in scrape["scrape_configs"] if j["job_name"] == "geins-bridge"]
    # the operations port, which is not published
    assert job["static_configs"][0]["targets"] == [f"bridge:{env['BRIDGE_OPS_PORT']}"]
    assert not [p for p in bridge["ports"] if p.endswith(f":{env['BRIDGE_OPS_PORT']}")]

    assert mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"
    provider = load_yaml(DEPLOY / "grafana/provisioning/dashboards/bridge.yml")["providers"][0]
    assert mounts[provider["options"]["path"]] == "./grafana/dashboards"
    datasource = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    assert json.loads(DASHBOARD.read_text())["uid"] == "geins-bridge"


def test_compose_publishes_only_the_bridge_beyond_the_host() -> None:
    """Pins Kafka, Prometheus (no login) and Grafana (admin/admin by default) to ports on
    127.0.0.1: published on every interface, anyone on the network could use them. The
    bridge's port stays open: it receives the webhooks, and asks for a token."""
    services = load_yaml(COMPOSE)["services"]
    for name, service in services.items():
        for port in service.get("ports", []):
            assert isinstance(port, str), (name, port)
            if name == "bridge":
                continue
            assert port.startswith("127.0.0.1:"), (name, port)
    assert any(p.endswith(":8080") for p in services["bridge"]["ports"])


def settings_cases() -> list[tuple[str, dict[str, str]]]:
    """(where, BRIDGE_* environment) of every bridge that deploy/ configures."""
    compose_env = dict(load_yaml(COMPOSE)["services"]["bridge"]["environment"])
    compose_env["BRIDGE_TOKENS"] = "token-from-env"
    cases = [("compose", compose_env)]
    for folder in (STANDALONE, SIDECAR):
        docs = manifests(folder)
        for workload in docs:
            if workload["kind"] in {"Deployment", "StatefulSet"}:
                container = bridge_container(workload["spec"]["template"]["spec"])
                where = f"{folder.name}/{workload['kind']}"
                cases.append((where, env_from(docs, container)))
    return cases


SETTINGS_CASES = settings_cases()


@pytest.mark.parametrize(("where", "environ"), SETTINGS_CASES, ids=[c[0] for c in SETTINGS_CASES])
def test_bridge_settings_in_deploy_files_are_accepted_by_the_bridge(
    where: str, environ: dict[str, str], tmp_path: Path
) -> None:
    """Pins every BRIDGE_* value in compose and the manifests as a valid setting for this bridge."""
    if "BRIDGE_TOKENS_FILE" in environ:
        # The Secret in deploy/ is a placeholder, which the bridge refuses: the real
        # one is made out of band (deploy/README.md), and mounted where the file is.
        assert Path(environ["BRIDGE_TOKENS_FILE"]).is_absolute(), where
        tokens = tmp_path / "tokens"
        tokens.write_text("token-from-the-real-secret\n")
        environ = {**environ, "BRIDGE_TOKENS_FILE": str(tokens)}
    settings = load_settings(environ=environ)
    settings.check_serving()
    assert settings.port == 8080, where
    assert str(settings.spool_dir) == SPOOL, where  # where the image's volume is


# --- Kubernetes ----------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_manifests_match_the_kubernetes_schemas(version: str) -> None:
    """Pins every core manifest valid (strict, no unknown fields) against Kubernetes' OpenAPI."""
    checked: set[str] = set()
    for folder in (STANDALONE, SIDECAR):
        for doc in manifests(folder):
            if doc["kind"] in OPERATOR_KINDS:
                continue
            kubernetes_validate.validate(doc, version, strict=True)
            checked.add(doc["kind"])
    assert checked == {
        "ConfigMap",
        "Secret",
        "Deployment",
        "StatefulSet",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "Ingress",
    }


def _crd_schema(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "metadata": {
                "type": "object",
                "required": ["name"],
                "properties": {"name": {"type": "string", "pattern": "^[a-z0-9][-a-z0-9.]*$"}},
            },
            "spec": spec,
        },
    }


_SELECTOR = {
    "type": "object",
    "required": ["matchLabels"],
    "properties": {"matchLabels": {"type": "object", "minProperties": 1}},
}
_ENDPOINT = {
    "type": "object",
    "required": ["port", "path"],
    "properties": {
        "port": {"type": "string"},
        "path": {"const": "/metrics"},
        "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m)$"},
        "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+(ms|s|m)$"},
    },
}
#: The parts of the Prometheus Operator CRDs (monitoring.coreos.com/v1) the manifests use.
OPERATOR_SCHEMAS: dict[str, dict[str, Any]] = {
    "ServiceMonitor": _crd_schema(
        {
            "type": "object",
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": _SELECTOR,
                "endpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT},
            },
        }
    ),
    "PodMonitor": _crd_schema(
        {
            "type": "object",
            "required": ["selector", "podMetricsEndpoints"],
            "properties": {
                "selector": _SELECTOR,
                "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT},
            },
        }
    ),
    "PrometheusRule": _crd_schema(
        {
            "type": "object",
            "required": ["groups"],
            "additionalProperties": False,
            "properties": {
                "groups": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["name", "rules"],
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "rules": {
                                "type": "array",
                                "items": {"type": "object", "required": ["expr"]},
                            },
                        },
                    },
                }
            },
        }
    ),
}


def test_prometheus_operator_objects_have_the_required_structure() -> None:
    """Pins ServiceMonitor, PodMonitor and PrometheusRule to the CRD fields they must have."""
    seen = set()
    for folder in (STANDALONE, SIDECAR):
        for doc in manifests(folder):
            if doc["kind"] in OPERATOR_KINDS:
                jsonschema.validate(doc, OPERATOR_SCHEMAS[doc["kind"]])
                seen.add(doc["kind"])
    assert seen == OPERATOR_KINDS


def test_prometheusrule_embeds_exactly_the_alert_rules_and_promtool_accepts_them(
    tmp_path: Path,
) -> None:
    """Pins the PrometheusRule's groups equal to alerts.yml and valid for `promtool check rules`."""
    rule = find(load_docs(STANDALONE / "prometheusrule.yaml"), "PrometheusRule")
    assert rule["spec"]["groups"] == load_yaml(ALERTS)["groups"]
    extracted = tmp_path / "prometheusrule-groups.yml"
    extracted.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    promtool("check", "rules", str(extracted))


def test_kustomizations_list_every_manifest() -> None:
    """Pins each kustomization.yaml's resources to its folder's manifests: none missing or extra."""
    alternatives = {"statefulset.yaml"}  # replaces deployment.yaml, see its header
    for folder in (STANDALONE, SIDECAR):
        listed = load_yaml(folder / "kustomization.yaml")["resources"]
        present = {p.name for p in folder.glob("*.yaml")} - {"kustomization.yaml"}
        examples = {p.name for p in folder.glob("*.example.yaml")}
        assert set(listed) == present - alternatives - examples, folder


def test_kustomizations_apply_no_secret() -> None:
    """Pins that `kubectl apply -k` deploys no Secret: the tokens Secret is created out of
    band, and a placeholder Secret among the resources overwrote the real one at every
    apply. The placeholder stays beside them as an example (secret.example.yaml)."""
    for folder in (STANDALONE, SIDECAR):
        listed = load_yaml(folder / "kustomization.yaml")["resources"]
        kinds = {doc["kind"] for name in listed for doc in load_docs(folder / name)}
        assert "Secret" not in kinds, folder
        assert (folder / "secret.example.yaml").is_file(), folder


def workloads() -> list[tuple[str, dict[str, Any], list[dict[str, Any]]]]:
    """(id, workload, the objects beside it) for every pod template that runs the bridge."""
    found: list[tuple[str, dict[str, Any], list[dict[str, Any]]]] = []
    for folder in (STANDALONE, SIDECAR):
        docs = manifests(folder)
        found.extend(
            (f"{folder.name}-{d['kind']}", d, docs)
            for d in docs
            if d["kind"] in {"Deployment", "StatefulSet"}
        )
    return found


WORKLOADS = workloads()


@pytest.mark.parametrize(("name", "workload", "docs"), WORKLOADS, ids=[w[0] for w in WORKLOADS])
def test_bridge_pods_probe_drain_and_stop_within_the_grace_period(
    name: str, workload: dict[str, Any], docs: list[dict[str, Any]]
) -> None:
    """Pins probes (/healthz, /readyz) on the operations port, a preStop pause, and a
    grace period above the shutdown. On the webhook port the probes shared
    BRIDGE_MAX_CONNECTIONS with every client: a flood of connections failed them."""
    pod = workload["spec"]["template"]["spec"]
    bridge = bridge_container(pod)
    ports = {p["name"]: p["containerPort"] for p in bridge["ports"]}
    env = env_from(docs, bridge)
    assert sorted(ports.values()) == sorted(
        [int(env["BRIDGE_PORT"]), int(env["BRIDGE_OPS_PORT"])]
    ), name
    assert bridge["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert bridge["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        port = bridge[probe]["httpGet"]["port"]
        assert ports[port] == int(env["BRIDGE_OPS_PORT"]), (name, probe)
    command = bridge["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pause = float(command[1])
    assert pause >= 5
    assert pod["terminationGracePeriodSeconds"] > pause + shutdown_seconds(env), name


@pytest.mark.parametrize(("name", "workload", "docs"), WORKLOADS, ids=[w[0] for w in WORKLOADS])
def test_bridge_pods_run_the_image_of_this_version(
    name: str, workload: dict[str, Any], docs: list[dict[str, Any]]
) -> None:
    """The image tag is the project's version: the manifests set what this version reads
    (BRIDGE_OPS_PORT), which an older bridge refuses as unknown, so a node that kept an
    older image under the same tag (IfNotPresent) would crash-loop (a review)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    image = bridge_container(workload["spec"]["template"]["spec"])["image"]
    assert image.rsplit(":", 1)[1] == project["version"], name


@pytest.mark.parametrize(("name", "workload", "docs"), WORKLOADS, ids=[w[0] for w in WORKLOADS])
def test_bridge_pods_get_time_to_check_a_full_spool_before_the_liveness_probe(
    name: str, workload: dict[str, Any], docs: list[dict[str, Any]]
) -> None:
    """Pins a startupProbe on /healthz giving the bridge STARTUP_BUDGET seconds to start:
    without one the liveness probe restarted a bridge still checking a full spool, so
    after a long Kafka outage the pod crash-looped and never sent its backlog."""
    bridge = bridge_container(workload["spec"]["template"]["spec"])
    startup = bridge["startupProbe"]
    assert startup["httpGet"]["path"] == "/healthz", name
    assert startup["httpGet"]["port"] in {p["name"] for p in bridge["ports"]}, name
    # Kubernetes' defaults: periodSeconds 10, failureThreshold 3.
    budget = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
    assert budget >= STARTUP_BUDGET, name
    assert startup.get("periodSeconds", 10) <= 10, name  # and serving soon after it is up


@pytest.mark.parametrize(("name", "workload", "docs"), WORKLOADS, ids=[w[0] for w in WORKLOADS])
def test_bridge_pods_run_locked_down_with_resources_and_a_spool_volume(
    name: str, workload: dict[str, Any], docs: list[dict[str, Any]]
) -> None:
    """Pins non-root uid 10001, read-only root fs, no privileges, resources, the spool mount."""
    pod = workload["spec"]["template"]["spec"]
    bridge = bridge_container(pod)
    security = {**pod.get("securityContext", {}), **bridge["securityContext"]}
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == IMAGE_UID, name
    assert bridge["securityContext"]["readOnlyRootFilesystem"] is True
    assert bridge["securityContext"]["allowPrivilegeEscalation"] is False
    assert bridge["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert pod["automountServiceAccountToken"] is False
    # Docker-link variables of a Service named "bridge" (BRIDGE_PORT=tcp://...) would
    # stop the bridge at start-up: it refuses unknown or invalid BRIDGE_* settings.
    assert pod["enableServiceLinks"] is False
    assert {"cpu", "memory"} <= set(bridge["resources"]["requests"])
    assert "memory" in bridge["resources"]["limits"]
    mounts = {m["mountPath"]: m["name"] for m in bridge["volumeMounts"]}
    assert mounts[SPOOL]
    assert env_from(docs, bridge)["BRIDGE_SPOOL_DIR"] == SPOOL
    volumes = {v["name"] for v in pod.get("volumes", [])}
    claims = {c["metadata"]["name"] for c in workload["spec"].get("volumeClaimTemplates", [])}
    assert mounts[SPOOL] in volumes | claims
    if workload["kind"] == "StatefulSet":
        assert mounts[SPOOL] in claims  # the point of the StatefulSet: a volume per replica


def image_environment() -> dict[str, str]:
    """The NAME=value pairs the image's ENV instructions set (values without spaces)."""
    return {
        name: value
        for step in dockerfile.parse(DOCKERFILE)
        if step.keyword == "ENV"
        for name, value in re.findall(r"([A-Z_][A-Z0-9_]*)=(\S+)", step.args)
    }


def test_sqlite_temporary_files_go_to_the_spool_volume_everywhere() -> None:
    """Pins SQLITE_TMPDIR (which SQLite reads before TMPDIR) to the spool volume in the
    image, and that compose and every pod mount a disk volume at that path: SQLite's
    temporary files went to the 16Mi in-memory /tmp, and building the spool's topic
    index over 1M waiting events failed there with "database or disk is full"."""
    tmpdir = image_environment()["SQLITE_TMPDIR"]
    assert tmpdir == SPOOL

    bridge = load_yaml(COMPOSE)["services"]["bridge"]
    assert bridge["environment"].get("SQLITE_TMPDIR", tmpdir) == SPOOL
    assert any(v.split(":")[1] == SPOOL for v in bridge["volumes"])

    for name, workload, _ in WORKLOADS:
        pod = workload["spec"]["template"]["spec"]
        container = bridge_container(pod)
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        path = env.get("SQLITE_TMPDIR", tmpdir)
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert path in mounts, name
        volume = next((v for v in pod.get("volumes", []) if v["name"] == mounts[path]), None)
        if volume is None:  # a StatefulSet's claim
            claims = {c["metadata"]["name"] for c in workload["spec"]["volumeClaimTemplates"]}
            assert mounts[path] in claims, name
        else:
            assert volume["emptyDir"].get("medium") != "Memory", name


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """Whether an equality selector selects these labels."""
    return all(labels.get(key) == value for key, value in selector.items())


def test_standalone_objects_select_and_target_the_bridge() -> None:
    """Pins Service, PDB, HPA and ServiceMonitor to the Deployment's pods, ports and name."""
    docs = manifests(STANDALONE)
    deployment = find(docs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert labels_match(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    container_ports = {
        p["name"] for p in bridge_container(deployment["spec"]["template"]["spec"])["ports"]
    }

    service = find(docs, "Service", "geins-bridge")
    assert labels_match(service["spec"]["selector"], pod_labels)
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports

    pdb = find(docs, "PodDisruptionBudget")
    assert labels_match(pdb["spec"]["selector"]["matchLabels"], pod_labels)

    hpa = find(docs, "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] >= 2
    assert "replicas" not in deployment["spec"]  # the HPA owns the count

    monitor = find(docs, "ServiceMonitor")
    assert labels_match(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    # Prometheus scrapes the operations port (BRIDGE_OPS_PORT), where /metrics is
    bridge = bridge_container(deployment["spec"]["template"]["spec"])
    ops_port = int(env_from(docs, bridge)["BRIDGE_OPS_PORT"])
    target_of = {p["name"]: p["targetPort"] for p in service["spec"]["ports"]}
    number_of = {p["name"]: p["containerPort"] for p in bridge["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert number_of[target_of[endpoint["port"]]] == ops_port
    # BridgeDown selects job="geins-bridge": the operator names the job after the Service.
    assert service["metadata"]["name"] == "geins-bridge"

    statefulset_docs = load_docs(STANDALONE / "statefulset.yaml")
    statefulset = find(statefulset_docs, "StatefulSet")
    assert statefulset["spec"]["template"]["metadata"]["labels"] == pod_labels
    # Its headless Service selects the same pods: scraped through it too, every
    # pod would be a second job (sums doubled, alerts twice).
    headless = find(statefulset_docs, "Service", "geins-bridge-pods")
    assert not labels_match(
        monitor["spec"]["selector"]["matchLabels"], headless["metadata"]["labels"]
    )

    # A removed replica of the Deployment takes its emptyDir spool with it: the HPA
    # must not remove one on its own (during a Kafka outage the spool holds events).
    assert hpa["spec"]["behavior"]["scaleDown"]["selectPolicy"] == "Disabled"


def test_statefulset_runs_the_same_pods_as_the_deployment() -> None:
    """Pins statefulset.yaml's pod template to deployment.yaml's but for the spool (a claim
    instead of an emptyDir, so no ephemeral storage for it), as deploy/README.md says: it
    had lost the zone spread, so a zone outage could take every replica."""

    def comparable(workload: dict[str, Any]) -> dict[str, Any]:
        template: dict[str, Any] = json.loads(json.dumps(workload["spec"]["template"]))
        spec = template["spec"]
        spec["volumes"] = [v for v in spec["volumes"] if v["name"] != "spool"]
        for container in spec["containers"]:
            container["resources"]["requests"].pop("ephemeral-storage", None)
        return template

    docs = manifests(STANDALONE)
    assert comparable(find(docs, "StatefulSet")) == comparable(find(docs, "Deployment"))


def quantity_bytes(quantity: str) -> int:
    """A Kubernetes quantity with a binary suffix (2Gi, 16Mi) in bytes."""
    match = re.fullmatch(r"(\d+)([KMGT])i", quantity)
    assert match is not None, quantity
    power: int = 1024 ** ("KMGT".index(match[2]) + 1)
    return int(match[1]) * power


def test_spool_volumes_hold_a_full_spool_and_its_keys() -> None:
    """Pins every spool volume above what a full spool can take on disk: twice
    BRIDGE_SPOOL_MAX_BYTES (SQLite gives an event of about 2 KB half a page) plus
    BRIDGE_SPOOL_MAX_KEYS keys of about 115 bytes, plus the spool's reserve file. An
    emptyDir over its sizeLimit is deleted with its pod, which would lose the spool
    exactly during a Kafka outage."""
    defaults = load_settings(environ={"BRIDGE_TOKENS": "test-token"})
    needed = 2 * defaults.spool_max_bytes + defaults.spool_max_keys * 115 + RESERVE_BYTES
    sizes: list[tuple[str, str]] = []
    for folder in (STANDALONE, SIDECAR):
        for path in folder.glob("*.yaml"):
            for doc in load_docs(path):
                if doc.get("kind") not in {"Deployment", "StatefulSet"}:
                    continue
                volumes = doc["spec"]["template"]["spec"].get("volumes", [])
                claims = doc["spec"].get("volumeClaimTemplates", [])
                sizes += [
                    (path.name, v["emptyDir"]["sizeLimit"]) for v in volumes if "spool" in v["name"]
                ]
                sizes += [
                    (path.name, c["spec"]["resources"]["requests"]["storage"]) for c in claims
                ]
    assert len(sizes) == 3, sizes
    for name, size in sizes:
        assert quantity_bytes(size) >= needed, (name, size)


#: Room for a container's logs beside its volumes: the kubelet keeps up to 5 files
#: of 10 MiB per container by default (containerLogMaxFiles, containerLogMaxSize).
LOG_ROOM = 50 * 1024**2


@pytest.mark.parametrize(("name", "workload", "docs"), WORKLOADS, ids=[w[0] for w in WORKLOADS])
def test_bridge_pods_request_the_disk_their_spool_may_use(
    name: str, workload: dict[str, Any], docs: list[dict[str, Any]]
) -> None:
    """Pins the bridge's ephemeral-storage request above its disk-backed emptyDirs (the
    spool) plus its logs, and no limit. Under node disk pressure the kubelet first evicts
    pods using more than they request, ignoring the PDB and the grace period, and an
    evicted pod's emptyDir spool is deleted; a limit would be one more way to that."""
    pod = workload["spec"]["template"]["spec"]
    bridge = bridge_container(pod)
    on_disk = sum(
        quantity_bytes(v["emptyDir"]["sizeLimit"])
        for v in pod.get("volumes", [])
        if "emptyDir" in v and v["emptyDir"].get("medium") != "Memory"
    )
    requested = quantity_bytes(bridge["resources"]["requests"]["ephemeral-storage"])
    assert requested >= on_disk + LOG_ROOM, name
    assert "ephemeral-storage" not in bridge["resources"].get("limits", {}), name


def number_of(container: dict[str, Any], port_name: str) -> int:
    """The number of a container's port, from its name."""
    [number] = [p["containerPort"] for p in container["ports"] if p["name"] == port_name]
    return int(number)


def test_sidecar_service_routes_the_webhook_port_and_path_to_the_bridge() -> None:
    """Pins the sidecar example: Service port `webhooks` and /webhooks/geins reach the bridge."""
    docs = manifests(SIDECAR)
    deployment = find(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert len(pod["containers"]) == 2
    bridge = bridge_container(pod)
    service = find(docs, "Service")
    assert labels_match(
        service["spec"]["selector"], deployment["spec"]["template"]["metadata"]["labels"]
    )
    ports = {p["name"]: p["targetPort"] for p in service["spec"]["ports"]}
    assert ports["webhooks"] in {p["name"] for p in bridge["ports"]}
    app = next(c for c in pod["containers"] if c is not bridge)
    assert ports["http"] in {p["name"] for p in app["ports"]}
    ingress = find(docs, "Ingress")
    paths = {
        p["path"]: p["backend"]["service"]
        for rule in ingress["spec"]["rules"]
        for p in rule["http"]["paths"]
    }
    assert paths["/webhooks/geins"] == {
        "name": service["metadata"]["name"],
        "port": {"name": "webhooks"},
    }
    assert number_of(bridge, ports["webhooks"]) == int(env_from(docs, bridge)["BRIDGE_PORT"])
    monitor = find(docs, "PodMonitor")  # on the operations port, where /metrics is
    scraped = monitor["spec"]["podMetricsEndpoints"][0]["port"]
    assert number_of(bridge, scraped) == int(env_from(docs, bridge)["BRIDGE_OPS_PORT"])
    assert {"targetLabel": "job", "replacement": "geins-bridge"} in monitor["spec"][
        "podMetricsEndpoints"
    ][0]["relabelings"]


@pytest.mark.parametrize(("name", "workload", "docs"), WORKLOADS, ids=[w[0] for w in WORKLOADS])
def test_bridge_pods_read_their_tokens_from_a_mounted_secret_that_can_rotate(
    name: str, workload: dict[str, Any], docs: list[dict[str, Any]]
) -> None:
    """Pins the tokens Secret mounted as the file BRIDGE_TOKENS_FILE names, whole (no
    subPath, which the kubelet never updates), and never in the environment: a Secret
    given as environment variables is read once, so a rotation of it (as deploy/README.md
    tells) never reached a running pod."""
    pod = workload["spec"]["template"]["spec"]
    bridge = bridge_container(pod)
    assert all("secretRef" not in source for source in bridge.get("envFrom", [])), name
    assert all("valueFrom" not in item for item in bridge.get("env", [])), name
    env = env_from(docs, bridge)
    assert "BRIDGE_TOKENS" not in env, name
    tokens_file = Path(env["BRIDGE_TOKENS_FILE"])
    [mount] = [m for m in bridge["volumeMounts"] if m["mountPath"] == str(tokens_file.parent)]
    assert "subPath" not in mount, name
    assert mount.get("readOnly") is True, name
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    secret_name = volume["secret"]["secretName"]
    folder = STANDALONE if name.startswith("standalone") else SIDECAR
    [example] = load_docs(folder / "secret.example.yaml")
    assert example["metadata"]["name"] == secret_name, name
    assert list(example["stringData"]) == [tokens_file.name], name
    assert "items" not in volume["secret"], name  # every key, by its own name
    # Readable by the bridge: its group (fsGroup) or everyone in its container.
    security = {**pod.get("securityContext", {}), **bridge["securityContext"]}
    mode = volume["secret"]["defaultMode"]
    assert mode & 0o004 or (mode & 0o040 and security.get("fsGroup") == IMAGE_UID), name


def test_secrets_in_deploy_hold_only_placeholders() -> None:
    """Pins that no manifest carries a real-looking token: every Secret value is a placeholder."""
    for folder in (STANDALONE, SIDECAR):
        for secret in (d for d in manifests(folder) if d["kind"] == "Secret"):
            assert "data" not in secret
            for value in secret["stringData"].values():
                assert value.startswith("REPLACE-ME"), secret["metadata"]["name"]


# --- Prometheus ----------------------------------------------------------------------


def test_prometheus_config_and_rules_pass_promtool_check() -> None:
    """Pins deploy/prometheus/prometheus.yml (and the rules it loads) valid for promtool."""
    promtool("check", "config", "prometheus.yml", cwd=DEPLOY / "prometheus")
    promtool("check", "rules", str(ALERTS))


def test_alert_rules_pass_their_promtool_unit_tests() -> None:
    """Pins each alert's behaviour: `promtool test rules alerts_test.yml` passes."""
    promtool("test", "rules", "alerts_test.yml", cwd=DEPLOY / "prometheus")


def test_every_alert_is_documented_and_unit_tested_firing_and_quiet() -> None:
    """Pins the required alerts, their annotations and runbook anchors, and both kinds of test."""
    rules = alert_rules()
    names = {rule["alert"] for rule in rules}
    assert names >= REQUIRED_ALERTS
    readme = (DEPLOY / "README.md").read_text()
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", heading.strip().lower()).replace(" ", "-")
        for heading in re.findall(r"^#+ (.+)$", readme, flags=re.MULTILINE)
    }
    for rule in rules:
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        annotations = rule["annotations"]
        assert {"summary", "description", "runbook"} <= set(annotations), rule["alert"]
        link = re.match(r"deploy/README\.md#([a-z0-9-]+): ", annotations["runbook"])
        assert link is not None, annotations["runbook"]
        assert link[1] in anchors, annotations["runbook"]

    firing: set[str] = set()
    quiet: set[str] = set()
    for case in load_yaml(DEPLOY / "prometheus" / "alerts_test.yml")["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    assert firing == names
    assert quiet == names


def test_dashboard_and_alerts_use_only_series_the_bridge_exports() -> None:
    """Pins every bridge_* name in the alerts and the dashboard to a series of bridge/metrics.py."""
    exported = exported_series_names()
    used = {
        name
        for expr in [r["expr"] for r in alert_rules()] + [t["expr"] for _, t in dashboard_targets()]
        for name in re.findall(r"\bbridge_[a-z0-9_]+", expr)
    }
    assert used, "no bridge series found in the queries"
    assert used - exported == set()


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Pins every dashboard query as PromQL that promtool parses (Grafana variables filled in)."""
    rules = [
        {"record": f"dashboard:query_{n}", "expr": promql_for_promtool(target["expr"])}
        for n, (_, target) in enumerate(dashboard_targets())
    ]
    assert len(rules) >= 20
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    promtool("check", "rules", str(path))


def test_dashboard_layout_and_variables_are_consistent() -> None:
    """Pins the dashboard JSON: unique ids, panels inside 24 columns without overlap, known vars."""
    board = json.loads(DASHBOARD.read_text())
    panels = board["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        pos = panel["gridPos"]
        assert 0 <= pos["x"] < pos["x"] + pos["w"] <= 24, panel["title"]
        area = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
    variables = {v["name"] for v in board["templating"]["list"]}
    text = json.dumps(panels)
    used = set(re.findall(r"\$\{?([a-z]+)\b", text))
    assert used <= variables, used - variables
    for panel, target in dashboard_targets():
        assert panel["datasource"] == target["datasource"] == DATASOURCE, panel["title"]
        assert 'job=~"$job"' in target["expr"], panel["title"]
    titles = {p["title"] for p in panels}
    assert {"Deliveries by outcome", "Stage latency (p99)", "Spool depth"} <= titles


def run_image_probe(environment: dict[str, str]) -> int:
    """The image's HEALTHCHECK command, run here with these BRIDGE_* variables."""
    health = next(s for s in dockerfile.parse(DOCKERFILE) if s.keyword == "HEALTHCHECK")
    probe = health.exec_form()
    assert probe[:2] == ["python", "-c"]
    done = subprocess.run(
        [sys.executable, "-c", probe[2]],
        env={"PATH": "/usr/bin:/bin", **environment},
        capture_output=True,
        timeout=30,
        check=False,
    )
    return done.returncode


def test_image_health_check_reads_a_port_as_the_bridge_does(tmp_path: Path) -> None:
    """The bridge takes BRIDGE_PORT=" 8080" (numbers may have spaces around them); the
    HEALTHCHECK put the value in its URL as it was, sent `Host: 127.0.0.1: 8080`,
    which the bridge refuses (400), and the container was unhealthy while it served
    (a review). A real bridge: a plain HTTP server takes that Host."""
    port = free_port()
    env = {
        "BRIDGE_TOKENS": "tok-AAAAAAAAAAAAAAAA",
        "BRIDGE_ACK": "memory",
        "BRIDGE_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",  # none needed for /healthz
        "BRIDGE_PORT": f" {port}\t",
    }
    with BridgeProcess(env, tmp_path / "bridge.log", port=port):
        assert run_image_probe({"BRIDGE_HOST": "127.0.0.1", "BRIDGE_PORT": f" {port}\t"}) == 0


@pytest.mark.parametrize(
    ("listen", "environment"),
    [
        ("127.0.0.2", {"BRIDGE_HOST": "127.0.0.2", "BRIDGE_PORT": "{port}"}),
        ("0.0.0.0", {"BRIDGE_PORT": "{port}"}),  # noqa: S104  # the image's default
        ("0.0.0.0", {"BRIDGE_HOST": "0.0.0.0", "BRIDGE_PORT": "{port}"}),  # noqa: S104
        (
            "127.0.0.3",
            {
                "BRIDGE_HOST": "127.0.0.2",
                "BRIDGE_OPS_HOST": "127.0.0.3",
                "BRIDGE_OPS_PORT": "{port}",
            },
        ),
        ("127.0.0.2", {"BRIDGE_HOST": "127.0.0.2", "BRIDGE_OPS_PORT": "{port}"}),
    ],
    ids=["host", "default", "wildcard", "ops host", "ops on host"],
)
def test_image_health_check_probes_the_address_the_bridge_listens_on(
    listen: str, environment: dict[str, str]
) -> None:
    """The probe went to 127.0.0.1 whatever BRIDGE_HOST / BRIDGE_OPS_HOST said: a bridge
    bound to one address (say the pod's) was marked unhealthy for ever. And through
    the proxy Docker puts in every container's environment (its config's "proxies"),
    which cannot reach the container's own addresses (NO_PROXY=localhost does not
    cover 127.0.0.1): a review's test."""

    class Healthz(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # the name http.server calls
            self.send_response(200 if self.path == "/healthz" else 404)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.HTTPServer((listen, 0), Healthz)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = str(server.server_address[1])
        filled = {name: value.format(port=port) for name, value in environment.items()}
        assert run_image_probe(filled) == 0, filled
        with socket.socket() as unused:
            unused.bind(("127.0.0.1", 0))
            proxy = f"http://127.0.0.1:{unused.getsockname()[1]}"  # nothing listens there
        for proxies in ({"http_proxy": proxy}, {"HTTP_PROXY": proxy, "no_proxy": "localhost"}):
            assert run_image_probe({**filled, **proxies}) == 0, proxies
        if listen != "0.0.0.0":  # noqa: S104
            used = "BRIDGE_OPS_HOST" if "BRIDGE_OPS_HOST" in filled else "BRIDGE_HOST"
            assert run_image_probe({**filled, used: "127.0.0.9"}) != 0
    finally:
        server.shutdown()
        server.server_close()


def test_the_manifests_outlast_the_idle_connections_of_the_proxy_in_front() -> None:
    """Both manifest sets sit behind an Ingress or load balancer, which keeps its
    connections to the bridge idle 60 s (ingress-nginx, an AWS ALB) or 600 s (Google
    Cloud's): the bridge's 5 s default closed them under the proxy, a 502 for Geins
    now and then (a review's test)."""
    for folder in (STANDALONE, SIDECAR):
        (config,) = [d for d in load_docs(folder / "configmap.yaml") if d["kind"] == "ConfigMap"]
        assert int(config["data"]["BRIDGE_KEEP_ALIVE_TIMEOUT"]) > 600, folder


def test_the_bridges_up_stat_shows_0_when_every_bridge_is_down(tmp_path: Path) -> None:
    """The 'Bridges up' stat (red below 1) joined `up` with bridge_build_info, which a
    failed scrape marks stale: a down bridge dropped out of the sum (one of three
    killed read 2, green), and with every bridge down the panel said 'No data', never
    the red 0 its thresholds are drawn for (a review). Nor does it count the scrape
    targets that are no bridge, which `up` of every job ("All") holds (a review)."""
    (panel,) = [p for p, _ in dashboard_targets() if p["title"] == "Bridges up"]
    expr = promql_for_promtool(panel["targets"][0]["expr"])
    instance = 'job="geins-bridge", instance="bridge-a:8080"'
    case = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": f"up{{{instance}}}", "values": "1 1 0 0 0 0"},
                    # another scrape target (Prometheus itself): no bridge, not counted
                    {"series": 'up{job="prometheus", instance="localhost:9090"}', "values": "1x5"},
                    # a failed scrape writes staleness markers for the target's series
                    {
                        "series": f'bridge_build_info{{{instance}, version="0.3.0"}}',
                        "values": "1 1 stale",
                    },
                ],
                "promql_expr_test": [
                    {
                        "expr": expr,
                        "eval_time": "1m",
                        "exp_samples": [{"labels": "{}", "value": 1}],
                    },
                    {
                        "expr": expr,
                        "eval_time": "4m",
                        "exp_samples": [{"labels": "{}", "value": 0}],
                    },
                ],
            }
        ],
    }
    path = tmp_path / "bridges_up.yml"
    path.write_text(yaml.safe_dump(case, sort_keys=False))
    done = run(binary("promtool"), "test", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_dead_letters_runbook_names_every_dead_letter_reason() -> None:
    """BridgeDeadLetters fires by reason; its runbook says what each means and what to
    fix, and left token_in_path out (whose fix is the webhook URL, not the body
    template it pointed to: a review)."""
    readme = (DEPLOY / "README.md").read_text()
    section = re.search(r"^### BridgeDeadLetters\n(.*?)^### ", readme, re.S | re.M)
    assert section is not None
    worded = {  # the reasons as the runbook words them
        "body_not_json": "not JSON",
        "missing_event_type": "missing",
        "malformed_event_type": "malformed",
        "unknown_event_type": "unknown type",
    }
    missing = [
        r for r in DEAD_LETTER_REASONS if r not in section[1] and worded.get(r, r) not in section[1]
    ]
    assert missing == []
