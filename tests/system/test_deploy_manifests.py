"""The deployment files (Dockerfile, deploy/docker-compose.yml, deploy/k8s/) agree with the code.

Everything is parsed, nothing is run: no Docker engine, no cluster, no network. Checked:

- every ``BUDGETER_*`` name anywhere in those files is a field of ``Settings``, and every
  value they set is one ``Settings`` accepts;
- every container command is a ``budgeter`` subcommand with flags the parser accepts,
  listening on 0.0.0.0 on the port its container/Service/healthcheck declares;
- every probe, healthcheck and scrape path is a route the process behind it serves;
- kustomizations list only files that exist; the overlay renders as intended;
- the KEDA query and the ServiceMonitor use metric names and ports that exist;
- secrets are referenced (secretKeyRef, ``${VAR:?}``), never written in a manifest.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
from argparse import Namespace
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from aiohttp import web

from budgeter.api.app import create_app
from budgeter.api.health import HealthState, add_health_routes
from budgeter.cli.commands import build_parser
from budgeter.metrics import Metrics
from budgeter.settings import Settings, SettingsError, load_settings
from budgeter.upstream import mock as mock_upstream

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = DEPLOY / "docker-compose.yml"
PROMETHEUS_COMPOSE = DEPLOY / "prometheus" / "prometheus-compose.yml"
K8S_BASE = DEPLOY / "k8s" / "base"
K8S_OVERLAY = DEPLOY / "k8s" / "overlays" / "example"

SECRET_VARS = {"BUDGETER_UPSTREAM_API_KEY", "BUDGETER_ADMIN_TOKEN"}
SECRET_NAME = "budgeter-secrets"
KEDA_QUERY = "sum(max by (tenant) (budgeter_queue_depth))"
GATEWAY_URL = "https://gateway.api.anyint.ai/anthropic"
IMAGE_UID = 10001
ENV_NAME_RE = re.compile(r"\bBUDGETER_[A-Z0-9_]*[A-Z0-9]")
INTERPOLATION_RE = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")
LOCAL_URL_RE = re.compile(r"http://127\.0\.0\.1:(\d+)(/[\w./-]*)")
METRIC_RE = re.compile(r"\bbudgeter_[a-z0-9_]+\b")


def yaml_files() -> list[Path]:
    return sorted({*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml")})


def load_docs(path: Path) -> list[Any]:
    with path.open(encoding="utf-8") as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc is not None]


def load_one(path: Path) -> Any:
    docs = load_docs(path)
    assert len(docs) == 1, f"{path}: expected one YAML document"
    return docs[0]


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# what the code offers ---------------------------------------------------------------------


def settings_env_names() -> set[str]:
    return {f"BUDGETER_{name.upper()}" for name in Settings.model_fields}


def parse_budgeter(args: list[str], where: str) -> Namespace:
    """``budgeter ARGS`` as the real parser reads it; a SystemExit is a test failure."""
    try:
        return build_parser().parse_args([str(arg) for arg in args])
    except SystemExit as exc:
        pytest.fail(f"{where}: `budgeter {shlex.join(map(str, args))}` is refused (exit {exc})")


def _paths(app: web.Application) -> frozenset[str]:
    return frozenset(
        route.resource.canonical
        for route in app.router.routes()
        if route.method in ("GET", "*") and route.resource is not None
    )


@cache
def routes_of(command: str) -> frozenset[str]:
    """GET paths served by the process a subcommand runs (on the port its flags give)."""
    if command == "api":
        return _paths(create_app(Settings()))
    if command == "worker":
        app = web.Application()
        add_health_routes(app, HealthState(Metrics()))
        return _paths(app)
    if command == "mock-upstream":
        return _paths(mock_upstream.create_app())
    raise AssertionError(f"`budgeter {command}` is not a long-running server")


@cache
def metric_names() -> frozenset[str]:
    """Series names as exposed by /metrics (counters with _total, histograms with _bucket...)."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "gauge": ("",),
        "summary": ("", "_sum", "_count", "_created"),
    }
    names: set[str] = set()
    for family in Metrics().registry.collect():
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
    return frozenset(names)


def server_port(args: Namespace) -> int:
    return int(args.port)


def check_values(values: dict[str, str], where: str) -> None:
    """Every BUDGETER_* value is accepted by Settings (names checked elsewhere)."""
    overrides = {
        name.removeprefix("BUDGETER_").lower(): value
        for name, value in values.items()
        if name.startswith("BUDGETER_")
    }
    try:
        load_settings(**overrides)
    except SettingsError as exc:
        pytest.fail(f"{where}: {exc}")


def check_url(url: str, port: int, command: str, where: str) -> None:
    match = LOCAL_URL_RE.search(url)
    assert match, f"{where}: no http://127.0.0.1:PORT/PATH in {url!r}"
    assert int(match.group(1)) == port, f"{where}: probes port {match.group(1)}, serves {port}"
    assert match.group(2) in routes_of(command), f"{where}: `{command}` does not serve {url}"


# every file --------------------------------------------------------------------------------


def test_deploy_yaml_files_parse() -> None:
    names = {rel(path) for path in yaml_files()}
    for expected in (COMPOSE, PROMETHEUS_COMPOSE, K8S_BASE / "kustomization.yaml"):
        assert rel(expected) in names
    for path in yaml_files():
        assert load_docs(path), f"{rel(path)}: empty"


def test_every_budgeter_variable_is_a_setting() -> None:
    known = settings_env_names()
    files = [*yaml_files(), DOCKERFILE, DOCKERIGNORE]
    seen: set[str] = set()
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for name in ENV_NAME_RE.findall(line):
                seen.add(name)
                assert name in known, f"{rel(path)}:{number}: {name} is not a Settings field"
    # the files do configure budgeter
    assert {"BUDGETER_REDIS_URL", "BUDGETER_UPSTREAM_URL", *SECRET_VARS} <= seen


def test_no_secret_is_written_down() -> None:
    for path in yaml_files():
        for doc in load_docs(path):
            if isinstance(doc, dict):
                assert doc.get("kind") != "Secret", f"{rel(path)}: inline Secret"
                assert "secretGenerator" not in doc, f"{rel(path)}: secretGenerator"
    for path in [*yaml_files(), DOCKERFILE]:
        text = path.read_text(encoding="utf-8")
        assert "sk-ant-" not in text, f"{rel(path)}: looks like an API key"
        for var in SECRET_VARS:
            # `VAR=value` / `VAR: value` only through references
            for match in re.finditer(rf"^\s*(?:ENV\s+|-\s+)?{var}\s*[:=]\s*(\S.*)$", text, re.M):
                value = match.group(1).strip().strip("'\"")
                assert value.startswith("${") or value.startswith("..."), (
                    f"{rel(path)}: {var} is given a literal value"
                )


# Dockerfile --------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        pending += line
        keyword, _, rest = pending.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    assert not pending, "Dockerfile ends inside a continued line"
    return instructions


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for keyword, rest in dockerfile_instructions():
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", rest, re.I)
            assert match, f"FROM without a stage name: {rest}"
            assert match.group(1) == "python:3.11-slim", rest
            current = stages.setdefault(match.group(2), [])
        else:
            assert current is not None, f"{keyword} before FROM"
            current.append((keyword, rest))
    return stages


def last(stage: list[tuple[str, str]], keyword: str) -> str:
    values = [rest for kw, rest in stage if kw == keyword]
    assert values, f"no {keyword} in the runtime stage"
    return values[-1]


def test_dockerfile_is_multi_stage_with_wheels_and_no_build_tools_at_runtime() -> None:
    stages = dockerfile_stages()
    assert list(stages) == ["builder", "runtime"]
    builder_runs = " ".join(rest for kw, rest in stages["builder"] if kw == "RUN")
    assert "pip wheel" in builder_runs
    runtime = stages["runtime"]
    runtime_runs = " ".join(rest for kw, rest in runtime if kw == "RUN")
    assert re.search(r"pip install --no-index --find-links=?\s*/wheels budgeter", runtime_runs)
    assert "from=builder" in runtime_runs
    for tool in ("apt-get install", "build-essential", "gcc", "pip wheel"):
        assert tool not in runtime_runs, f"runtime stage installs {tool}"
    # what the builder copies exists and is not excluded from the build context
    ignored = {
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    for kw, rest in stages["builder"]:
        if kw == "COPY":
            *sources, _dest = rest.split()
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: no such file"
                assert source.rstrip("/") not in ignored, f"COPY {source}: in .dockerignore"
    for entry in (".venv", ".git", ".budgeter", "test-artifacts", "**/__pycache__"):
        assert entry in ignored, f".dockerignore lacks {entry}"
    for needed in ("pyproject.toml", "README.md", "budgeter"):
        assert needed not in ignored


def test_dockerfile_runtime_user_ports_command_and_healthcheck() -> None:
    runtime = dockerfile_stages()["runtime"]
    assert last(runtime, "USER").split(":")[0] == str(IMAGE_UID)
    assert f"--uid {IMAGE_UID}" in " ".join(rest for kw, rest in runtime if kw == "RUN")
    exposed = {int(port.split("/")[0]) for port in last(runtime, "EXPOSE").split()}
    assert exposed == {8080, 9108}
    assert json.loads(last(runtime, "ENTRYPOINT")) == ["budgeter"]
    cmd = json.loads(last(runtime, "CMD"))
    args = parse_budgeter(cmd, "Dockerfile CMD")
    assert args.command == "api" and args.host == "0.0.0.0"
    assert server_port(args) in exposed
    healthcheck = last(runtime, "HEALTHCHECK")
    assert "urllib" in healthcheck and "python" in healthcheck
    check_url(healthcheck, server_port(args), "api", "Dockerfile HEALTHCHECK")


def test_dockerfile_documented_commands_parse() -> None:
    """`docker run budgeter:local ARGS` lines in the Dockerfile's comments are valid."""
    exposed = {int(p) for p in last(dockerfile_stages()["runtime"], "EXPOSE").split()}
    commands = []
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        match = re.search(r"docker run .*?budgeter:local(.*)$", line)
        if match and match.group(1).strip():
            commands.append(shlex.split(match.group(1)))
    assert any(cmd[0] == "worker" for cmd in commands), "the worker override is not documented"
    for cmd in commands:
        args = parse_budgeter(cmd, "Dockerfile comment")
        assert args.host == "0.0.0.0" and server_port(args) in exposed


# docker compose ----------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    return load_one(COMPOSE)


def interpolate(value: str, *, required: str = "set-in-dotenv") -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?error}, with no environment at all."""

    def repl(match: re.Match[str]) -> str:
        operator, argument = match.group(2), match.group(3)
        if operator in (":-", "-"):
            return argument
        return required

    return INTERPOLATION_RE.sub(repl, value)


def budgeter_services() -> dict[str, dict[str, Any]]:
    services = compose()["services"]
    return {
        name: service
        for name, service in services.items()
        if str(service.get("image", "")).startswith("budgeter") or "build" in service
    }


def container_port(spec: Any) -> int:
    return int(str(spec).split(":")[-1].split("/")[0])


def compose_healthcheck_url(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    return " ".join(test) if isinstance(test, list) else test


def test_compose_budgeter_services_run_real_commands_on_their_ports() -> None:
    services = budgeter_services()
    assert set(services) == {"api", "worker", "mock-upstream"}
    for name, service in services.items():
        where = f"compose service {name}"
        assert service["build"]["context"] == ".."
        assert (
            COMPOSE.parent / service["build"]["context"] / service["build"]["dockerfile"]
        ).is_file()
        args = parse_budgeter(service["command"], where)
        assert args.command == {"api": "api", "worker": "worker"}.get(name, name), where
        assert args.host == "0.0.0.0", f"{where}: listens on {args.host}"
        port = server_port(args)
        declared = {container_port(p) for p in service.get("ports", [])}
        declared |= {container_port(p) for p in service.get("expose", [])}
        assert port in declared, f"{where}: serves {port}, declares {sorted(declared)}"
        # the image's HEALTHCHECK probes 8080: every other process must override it
        assert "healthcheck" in service, f"{where}: no healthcheck"
        check_url(compose_healthcheck_url(service), port, args.command, where)
    assert container_port(services["api"]["ports"][0]) == 8080
    assert services["worker"]["deploy"]["replicas"] == 2
    assert services["mock-upstream"]["profiles"] == ["mock"]
    worker_grace = services["worker"]["stop_grace_period"]
    drain = float(interpolate(services["worker"]["environment"]["BUDGETER_DRAIN_SECONDS"]))
    assert float(worker_grace.removesuffix("s")) > drain


def test_compose_environment_and_secrets() -> None:
    services = budgeter_services()
    known = settings_env_names()
    for name in ("api", "worker"):
        env = services[name]["environment"]
        assert isinstance(env, dict), f"{name}: environment must be a mapping"
        for var, value in env.items():
            assert var in known, f"compose {name}: {var} is not a Settings field"
            if var in SECRET_VARS:
                match = INTERPOLATION_RE.fullmatch(str(value))
                assert match and match.group(1) == var and match.group(2) == ":?", (
                    f"compose {name}: {var} must come from deploy/.env as ${{{var}:?...}}"
                )
        check_values({k: interpolate(str(v)) for k, v in env.items()}, f"compose {name}")
        assert env["BUDGETER_REDIS_URL"] == "redis://redis:6379/0"
        assert "BUDGETER_UPSTREAM_API_KEY" in env
    assert "BUDGETER_ADMIN_TOKEN" in services["api"]["environment"]
    # the default upstream is the mock service, on the port it listens on
    upstream = urlsplit(interpolate(services["api"]["environment"]["BUDGETER_UPSTREAM_URL"]))
    mock_args = parse_budgeter(services["mock-upstream"]["command"], "mock-upstream")
    assert (upstream.hostname, upstream.port) == ("mock-upstream", server_port(mock_args))


def test_compose_redis_persists_with_aof() -> None:
    doc = compose()
    redis = doc["services"]["redis"]
    assert str(redis["image"]).startswith("redis:7")
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and "--appendfsync everysec" in command
    volume = redis["volumes"][0].split(":")
    assert volume[1] == "/data" and volume[0] in doc["volumes"]
    assert "redis" in " ".join(redis["healthcheck"]["test"])
    for name in ("api", "worker"):
        assert doc["services"][name]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_compose_bind_mounts_exist_and_observability_fits() -> None:
    doc = compose()
    services = doc["services"]
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith((".", "/")):
                assert (COMPOSE.parent / source).exists(), f"compose {name}: {source} missing"
            else:
                assert source in doc["volumes"], f"compose {name}: undeclared volume {source}"
            assert target.startswith("/")
    prom = {v.split(":")[1]: v.split(":")[0] for v in services["prometheus"]["volumes"]}
    assert str(services["prometheus"]["image"]).startswith("prom/prometheus")
    config = (COMPOSE.parent / prom["/etc/prometheus/prometheus.yml"]).resolve()
    assert config.parent == DEPLOY / "prometheus"
    assert (COMPOSE.parent / prom["/etc/prometheus/alerts.yml"]).resolve() == (
        DEPLOY / "prometheus" / "alerts.yml"
    )
    graf = {v.split(":")[1]: v.split(":")[0] for v in services["grafana"]["volumes"]}
    assert str(services["grafana"]["image"]).startswith("grafana/grafana")
    assert (COMPOSE.parent / graf["/etc/grafana/provisioning"]).resolve() == (
        ROOT / "grafana" / "provisioning"
    )
    assert (COMPOSE.parent / graf["/var/lib/grafana/dashboards"]).resolve() == (
        ROOT / "grafana" / "dashboards"
    )
    assert any(container_port(p) == 3000 for p in services["grafana"]["ports"])
    provider = load_one(ROOT / "grafana" / "provisioning" / "dashboards" / "budgeter.yml")
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    datasource = load_one(ROOT / "grafana" / "provisioning" / "datasources" / "prometheus.yml")
    url = urlsplit(datasource["datasources"][0]["url"])
    assert url.hostname in services and url.hostname == "prometheus"
    assert any(container_port(p) == url.port for p in services["prometheus"]["ports"])


def scrape_targets(config: dict[str, Any]) -> dict[str, list[tuple[str, int, str]]]:
    """job name -> [(host, port, metrics path)]."""
    jobs: dict[str, list[tuple[str, int, str]]] = {}
    for job in config["scrape_configs"]:
        path = job.get("metrics_path", "/metrics")
        targets = jobs.setdefault(job["job_name"], [])
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                targets.append((host, int(port), path))
        for dns in job.get("dns_sd_configs", []):
            targets.extend((name, int(dns["port"]), path) for name in dns["names"])
    return jobs


def test_prometheus_compose_config_scrapes_the_compose_services() -> None:
    original = load_one(DEPLOY / "prometheus" / "prometheus.yml")
    adapted = load_one(PROMETHEUS_COMPOSE)
    # the same jobs (alerts.yml and the dashboards select on them), rules and intervals
    assert adapted["rule_files"] == original["rule_files"]
    assert adapted["global"] == original["global"]
    assert set(scrape_targets(adapted)) == set(scrape_targets(original))
    services = budgeter_services()
    for job, targets in scrape_targets(adapted).items():
        assert targets, job
        for host, port, path in targets:
            assert host in services, f"{job}: {host} is not a compose service"
            args = parse_budgeter(services[host]["command"], host)
            assert port == server_port(args), f"{job}: {host}:{port}"
            assert path in routes_of(args.command)
    alerts = (DEPLOY / "prometheus" / "alerts.yml").read_text(encoding="utf-8")
    for job in re.findall(r'job="([^"]+)"', alerts):
        assert job in scrape_targets(adapted), f"alerts.yml selects unknown job {job}"


# kustomize ---------------------------------------------------------------------------------


def kustomization(directory: Path) -> dict[str, Any]:
    return load_one(directory / "kustomization.yaml")


def deep_merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            deep_merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


def pod_containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return doc["spec"]["template"]["spec"]["containers"]


def render(directory: Path) -> list[dict[str, Any]]:
    """The subset of kustomize these manifests use: resources, patches, namespace, images."""
    spec = kustomization(directory)
    docs: list[dict[str, Any]] = []
    for entry in spec.get("resources", []):
        path = (directory / entry).resolve()
        docs.extend(render(path) if path.is_dir() else load_docs(path))
    for item in spec.get("patches", []):
        body = (
            yaml.safe_load(item["patch"]) if "patch" in item else load_one(directory / item["path"])
        )
        assert isinstance(body, dict), "only strategic-merge patches are rendered here"
        target = item.get("target", {"kind": body["kind"], "name": body["metadata"]["name"]})
        matched = [
            doc
            for doc in docs
            if doc["kind"] == target["kind"] and doc["metadata"]["name"] == target["name"]
        ]
        assert matched, f"{directory}: patch matches nothing: {target}"
        for doc in matched:
            deep_merge(doc, body)
    if "namespace" in spec:
        for doc in docs:
            doc["metadata"]["namespace"] = spec["namespace"]
    for image in spec.get("images", []):
        for doc in docs:
            if doc["kind"] != "Deployment":
                continue
            for container in pod_containers(doc):
                name, _, tag = container["image"].partition(":")
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
    return docs


def kustomization_dirs() -> list[Path]:
    return sorted(path.parent for path in (DEPLOY / "k8s").rglob("kustomization.yaml"))


def test_kustomizations_list_only_existing_files() -> None:
    assert kustomization_dirs() == [K8S_BASE, K8S_OVERLAY]
    for directory in kustomization_dirs():
        spec = kustomization(directory)
        assert spec["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
        assert spec["kind"] == "Kustomization"
        for entry in spec.get("resources", []):
            path = directory / entry
            assert path.exists(), f"{rel(directory)}: {entry} does not exist"
            if path.is_dir():
                assert (path / "kustomization.yaml").is_file()
        for item in spec.get("patches", []):
            assert ("patch" in item) != ("path" in item)
            if "path" in item:
                assert (directory / item["path"]).is_file()
        referenced = list(spec.get("components", [])) + list(spec.get("crds", []))
        for generator in spec.get("configMapGenerator", []):
            referenced += [f.split("=")[-1] for f in generator.get("files", [])]
            referenced += generator.get("envs", [])
        for name in referenced:
            assert (directory / name).exists(), f"{rel(directory)}: {name} does not exist"
    # every YAML file in the base is used by it
    listed = {(K8S_BASE / entry).resolve() for entry in kustomization(K8S_BASE)["resources"]}
    unused = {p for p in K8S_BASE.glob("*.yaml") if p.name != "kustomization.yaml"} - listed
    assert not unused, f"files not in the base kustomization: {sorted(map(rel, unused))}"


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def container_port_number(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    assert port in named, f"{container['name']}: no port named {port}"
    return int(named[port])


def check_rendered(docs: list[dict[str, Any]], where: str) -> None:
    known = settings_env_names()
    config_maps = by_kind(docs, "ConfigMap")
    deployments = by_kind(docs, "Deployment")
    services = by_kind(docs, "Service")
    assert set(config_maps) == {"budgeter-config"}, where
    assert set(deployments) == {"budgeter-api", "budgeter-worker"}, where
    config = config_maps["budgeter-config"]["data"]
    for var in config:
        assert var in known, f"{where}: ConfigMap key {var} is not a Settings field"
        assert var not in SECRET_VARS, f"{where}: {var} in a ConfigMap"
    assert config["BUDGETER_LOG_FORMAT"] == "json"
    assert {"BUDGETER_UPSTREAM_URL", "BUDGETER_REDIS_URL"} <= set(config)
    check_values(config, f"{where} ConfigMap")
    drain = float(
        config.get("BUDGETER_DRAIN_SECONDS", Settings.model_fields["drain_seconds"].default)
    )

    # Deployments: commands, ports, probes, env, security, resources
    process_of: dict[str, tuple[Namespace, dict[str, Any], dict[str, Any]]] = {}
    for name, deployment in deployments.items():
        pod = deployment["spec"]["template"]["spec"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert matches(deployment["spec"]["selector"]["matchLabels"], labels), name
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"].get("runAsUser", IMAGE_UID) == IMAGE_UID, name
        assert pod["terminationGracePeriodSeconds"] > drain, f"{name}: grace <= drain"
        (container,) = pod["containers"]
        assert "command" not in container, f"{name}: keep the image's ENTRYPOINT budgeter"
        args = parse_budgeter(container["args"], f"{where} {name}")
        assert args.host == "0.0.0.0", name
        port = server_port(args)
        assert port in {p["containerPort"] for p in container["ports"]}, name
        routes = routes_of(args.command)
        probes = {kind: container[kind] for kind in ("readinessProbe", "livenessProbe")}
        assert probes["readinessProbe"]["httpGet"]["path"] == "/readyz", name
        assert probes["livenessProbe"]["httpGet"]["path"] == "/healthz", name
        for kind, probe in probes.items():
            get = probe["httpGet"]
            assert get["path"] in routes, f"{name} {kind}: {get['path']} not served"
            assert container_port_number(container, get["port"]) == port, f"{name} {kind}"
        for key in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][key]), f"{name}: {key}"
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        refs = [item["configMapRef"]["name"] for item in container["envFrom"]]
        assert refs == ["budgeter-config"], name
        env = {item["name"]: item for item in container.get("env", [])}
        for var, item in env.items():
            assert var in known or not var.startswith("BUDGETER_"), f"{name}: {var}"
            if var in SECRET_VARS:
                assert "value" not in item, f"{name}: {var} inlined"
                ref = item["valueFrom"]["secretKeyRef"]
                assert ref["name"] == SECRET_NAME and ref["key"], f"{name}: {var}"
        assert "BUDGETER_UPSTREAM_API_KEY" in env, name
        process_of[name] = (args, container, labels)
    assert process_of["budgeter-api"][0].command == "api"
    assert process_of["budgeter-worker"][0].command == "worker"
    assert "BUDGETER_ADMIN_TOKEN" in {e["name"] for e in process_of["budgeter-api"][1]["env"]}
    assert "replicas" not in deployments["budgeter-worker"]["spec"], "KEDA owns worker replicas"

    # Services: select one Deployment, target a named port of its container
    backend: dict[str, tuple[Namespace, dict[str, Any]]] = {}
    for name, service in services.items():
        selected = [
            dep
            for dep, (_, _, labels) in process_of.items()
            if matches(service["spec"]["selector"], labels)
        ]
        assert len(selected) == 1, f"Service {name} selects {selected}"
        args, container, _ = process_of[selected[0]]
        for port in service["spec"]["ports"]:
            assert container_port_number(container, port["targetPort"]) == server_port(args)
        backend[name] = (args, service)
    assert set(services) == {"budgeter-api", "budgeter-worker"}
    assert services["budgeter-worker"]["spec"].get("clusterIP") == "None"
    # the Service names are the Prometheus job names of prometheus.yml and alerts.yml
    assert set(services) == set(scrape_targets(load_one(DEPLOY / "prometheus" / "prometheus.yml")))

    # PodDisruptionBudgets: one per Deployment
    pdbs = by_kind(docs, "PodDisruptionBudget")
    covered = sorted(
        dep
        for pdb in pdbs.values()
        for dep, (_, _, labels) in process_of.items()
        if matches(pdb["spec"]["selector"]["matchLabels"], labels)
    )
    assert covered == sorted(deployments), f"{where}: PDBs cover {covered}"
    for pdb in pdbs.values():
        assert pdb["apiVersion"] == "policy/v1"
        assert ("minAvailable" in pdb["spec"]) != ("maxUnavailable" in pdb["spec"])

    # KEDA: scale the worker on the queue backlog, with metrics the code exports
    (scaled,) = by_kind(docs, "ScaledObject").values()
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == "budgeter-worker"
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (1, 20)
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus"
    assert trigger["metadata"]["query"] == KEDA_QUERY
    for metric in METRIC_RE.findall(trigger["metadata"]["query"]):
        assert metric in metric_names(), f"KEDA query: unknown metric {metric}"
    assert float(trigger["metadata"]["threshold"]) > 0
    assert urlsplit(trigger["metadata"]["serverAddress"]).scheme in ("http", "https")

    # ServiceMonitor: every Service's metrics port and path
    (monitor,) = by_kind(docs, "ServiceMonitor").values()
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selected = {
        name: svc
        for name, svc in services.items()
        if matches(monitor["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
    }
    assert set(selected) == set(services)
    scraped: set[str] = set()
    for endpoint in monitor["spec"]["endpoints"]:
        owners = [
            name
            for name, svc in selected.items()
            if endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}
        ]
        assert owners, f"ServiceMonitor port {endpoint['port']} is on no Service"
        for name in owners:
            args, _ = backend[name]
            path = endpoint.get("path", "/metrics")
            assert path in routes_of(args.command), f"{name}: {path} not served"
            scraped.add(name)
    assert scraped == set(services)


def test_k8s_base_is_consistent_and_namespace_agnostic() -> None:
    docs = render(K8S_BASE)
    for doc in docs:
        assert "namespace" not in doc["metadata"], f"base sets a namespace on {doc['kind']}"
    check_rendered(docs, "base")


def test_k8s_example_overlay() -> None:
    spec = kustomization(K8S_OVERLAY)
    assert spec["resources"] == ["../../base"]
    assert spec.get("namespace")
    docs = render(K8S_OVERLAY)
    check_rendered(docs, "overlay")
    assert by_kind(docs, "ConfigMap")["budgeter-config"]["data"]["BUDGETER_UPSTREAM_URL"] == (
        GATEWAY_URL
    )
    deployments = by_kind(docs, "Deployment")
    base_replicas = by_kind(render(K8S_BASE), "Deployment")["budgeter-api"]["spec"]["replicas"]
    assert deployments["budgeter-api"]["spec"]["replicas"] != base_replicas
    (image,) = spec["images"]
    for deployment in deployments.values():
        for container in pod_containers(deployment):
            assert container["image"] == f"{image['newName']}:{image['newTag']}"
    for doc in docs:
        assert doc["metadata"]["namespace"] == spec["namespace"]


def _kubectl() -> str:
    """kubectl's path; without it the cross-check skips, or fails under
    ``BUDGETER_REQUIRE_KUBECTL=1`` (CI sets it, and installs kubectl)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        if os.environ.get("BUDGETER_REQUIRE_KUBECTL") == "1":
            pytest.fail("kubectl not on PATH, and BUDGETER_REQUIRE_KUBECTL=1")
        pytest.skip("kubectl not on PATH")
    return kubectl


@pytest.mark.parametrize("directory", [K8S_BASE, K8S_OVERLAY], ids=["base", "overlay"])
def test_kubectl_kustomize_renders_the_same(directory: Path) -> None:
    """Cross-check of render() against the real kustomize (kubectl's)."""
    kubectl = _kubectl()
    done = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    real = [doc for doc in yaml.safe_load_all(done.stdout) if doc]
    ours = render(directory)
    key = lambda doc: (doc["kind"], doc["metadata"]["name"])  # noqa: E731 - a one-line sort key
    assert sorted(map(key, real)) == sorted(map(key, ours))
    real_by_key = {key(doc): doc for doc in real}
    for doc in ours:
        other = real_by_key[key(doc)]
        assert other["metadata"].get("namespace") == doc["metadata"].get("namespace")
        assert other.get("data") == doc.get("data")
        if doc["kind"] == "Deployment":
            assert other["spec"].get("replicas") == doc["spec"].get("replicas")
            assert pod_containers(other)[0]["image"] == pod_containers(doc)[0]["image"]
            assert pod_containers(other)[0]["args"] == pod_containers(doc)[0]["args"]
    check_rendered(real, f"kubectl kustomize {rel(directory)}")
