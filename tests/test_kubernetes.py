"""deploy/kubernetes/: every manifest is valid offline (the Kubernetes kinds against the 1.30
OpenAPI schemas shipped in the kubernetes-validate wheel, strict so that an unknown field
fails; the ServiceMonitor against the fields of the prometheus-operator CRD it uses), and the
pieces agree with each other: ports, labels, probe paths, the metric the HPA reads and the
adapter publishes, the drain time, the launcher's environment variables."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

KUBE_DIR = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.30"  # oldest minor still widely run; pinned so results never drift
LAUNCHER_DRAIN_SECONDS = 90  # the launcher's --graceful-termination-timeout default

# The ServiceMonitor fields these manifests use, copied from the CRD's openAPIV3Schema in
# prometheus-operator/prometheus-operator
# example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml (operator
# v0.84.1): spec requires selector and endpoints; endpoints[].port is the Service port's name;
# interval/scrapeTimeout follow the CRD's duration pattern. additionalProperties: false (the
# CRD allows many more fields) so that a typo or a field not checked here fails.
DURATION = (
    r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
)
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "additionalProperties": False,
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                "namespace": {"type": "string"},
                "labels": STRING_MAP,
                "annotations": STRING_MAP,
            },
        },
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["endpoints", "selector"],
            "properties": {
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchLabels": STRING_MAP},
                },
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "any": {"type": "boolean"},
                        "matchNames": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": DURATION},
                            "scrapeTimeout": {"type": "string", "pattern": DURATION},
                        },
                    },
                },
            },
        },
    },
}

# kustomize.config.k8s.io/v1beta1 Kustomization, the fields used here.
KUSTOMIZATION_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "resources"],
    "properties": {
        "apiVersion": {"const": "kustomize.config.k8s.io/v1beta1"},
        "kind": {"const": "Kustomization"},
        "namespace": {"type": "string"},
        "resources": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
        "images": {"type": "array"},
    },
}

# Environment the Deployment sets that is not a launcher flag, and who reads it.
ENV_NOT_LAUNCHER_FLAGS = {
    "HF_HOME": "huggingface_hub",
    "HF_TOKEN": "huggingface_hub",
    "TEXTGEN_CACHE": "shard.config.default_cache_dir",
    "LOG_LEVEL": "launcher, router and shards (README)",
    "OMP_NUM_THREADS": "torch",
}


def manifest_files() -> list[Path]:
    return sorted(p for p in KUBE_DIR.glob("*.yaml") if p.name != "kustomization.yaml")


def load(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


@pytest.fixture(scope="module")
def by_kind() -> dict[str, dict]:
    """Every resource by kind (each kind appears once in these manifests)."""
    found: dict[str, dict] = {}
    for path in manifest_files():
        for doc in load(path):
            assert doc["kind"] not in found, f"{path.name}: a second {doc['kind']}"
            found[doc["kind"]] = doc
    assert set(found) == {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "ConfigMap",
        "ServiceMonitor",
    }
    return found


@pytest.fixture(scope="module")
def container(by_kind) -> dict:
    (only,) = by_kind["Deployment"]["spec"]["template"]["spec"]["containers"]
    return only


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container["env"]}


def adapter_config(by_kind) -> dict:
    return yaml.safe_load(by_kind["ConfigMap"]["data"]["config.yaml"])


def kubernetes_kinds() -> list[tuple[str, dict]]:
    return [
        (f"{p.name}:{d['kind']}", d)
        for p in manifest_files()
        for d in load(p)
        if d["kind"] != "ServiceMonitor"
    ]


# --- schemas ---------------------------------------------------------------------------------


def test_schemas_ship_in_the_wheel():
    """Offline: kubernetes-validate reads its schemas from the installed package."""
    assert KUBERNETES_VERSION <= kubernetes_validate.latest_version()
    schema = kubernetes_validate.utils.schema_contents(
        f"kubernetes-json-schema/v{KUBERNETES_VERSION}.0-local-strict/deployment-apps-v1.json",
        KUBERNETES_VERSION,
    )
    assert schema["properties"]["kind"]


@pytest.mark.parametrize(
    "doc", [d for _, d in kubernetes_kinds()], ids=[i for i, _ in kubernetes_kinds()]
)
def test_kubernetes_kinds_validate_strictly(doc):
    validated = kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    assert validated == KUBERNETES_VERSION


def test_service_monitor_matches_crd_fields(by_kind):
    jsonschema.validate(by_kind["ServiceMonitor"], SERVICE_MONITOR_SCHEMA)


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((KUBE_DIR / "kustomization.yaml").read_text())
    jsonschema.validate(kustomization, KUSTOMIZATION_SCHEMA)
    assert set(kustomization["resources"]) == {p.name for p in manifest_files()}
    assert not list(KUBE_DIR.glob("*.yml")), "name manifests *.yaml"


@pytest.mark.parametrize(
    "break_it",
    [
        pytest.param(lambda d: d["spec"].update(replica=2), id="unknown-field"),
        pytest.param(
            lambda d: d["spec"]["template"]["spec"]["containers"][0]["ports"][0].update(
                containerPort="eighty"
            ),
            id="wrong-type",
        ),
        pytest.param(lambda d: d["spec"].pop("selector"), id="missing-required"),
        pytest.param(
            lambda d: d["spec"]["template"]["spec"]["containers"][0]["readinessProbe"][
                "httpGet"
            ].update(pth="/health"),
            id="nested-typo",
        ),
    ],
)
def test_a_broken_deployment_fails(by_kind, break_it):
    """The validation above is not vacuous: these schemas do reject bad manifests."""
    broken = copy.deepcopy(by_kind["Deployment"])
    break_it(broken)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_a_broken_service_monitor_fails(by_kind):
    broken = copy.deepcopy(by_kind["ServiceMonitor"])
    broken["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SERVICE_MONITOR_SCHEMA)
    broken = copy.deepcopy(by_kind["ServiceMonitor"])
    broken["spec"]["endpoints"][0]["interval"] = "15 seconds"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SERVICE_MONITOR_SCHEMA)


# --- the prometheus-adapter rule -------------------------------------------------------------


def test_adapter_rule_exposes_queue_size_per_pod(by_kind):
    config = adapter_config(by_kind)
    assert set(config) == {"rules"}
    (rule,) = config["rules"]
    assert set(rule) == {"seriesQuery", "resources", "name", "metricsQuery"}
    assert rule["seriesQuery"] == 'tgi_queue_size{namespace!="",pod!=""}'
    assert rule["resources"] == {
        "overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    }
    assert re.fullmatch(rule["name"]["matches"], "tgi_queue_size")
    assert rule["metricsQuery"] == "sum(<<.Series>>{<<.LabelMatchers>>}) by (<<.GroupBy>>)"


def exposed_metric_name(rule: dict) -> str:
    """The custom metric name prometheus-adapter derives from a rule."""
    series = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)\{", rule["seriesQuery"]).group(1)
    name = rule.get("name", {})
    if "as" in name:
        return re.sub(name.get("matches", ".*"), name["as"], series)
    return series


# --- consistency -----------------------------------------------------------------------------


def test_probes_check_health_on_the_http_port(container):
    port_names = {p["name"] for p in container["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/health", probe
        assert get["port"] in port_names, probe
        # /health waits up to 10 s for the shards (router/batching/health.py)
        assert container[probe]["timeoutSeconds"] > 10, probe
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 15 * 60, "model load time"


def test_ports_and_env(container):
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = env_of(container)
    assert ports == {"http": 80, "metrics": 9000}
    assert env["PORT"]["value"] == str(ports["http"])
    assert env["PROMETHEUS_PORT"]["value"] == str(ports["metrics"])
    assert container["args"] == ["--model-id", "$(MODEL_ID)"]
    assert env["MODEL_ID"]["value"]  # Kubernetes expands $(MODEL_ID) only when env defines it
    assert env["HF_HOME"]["value"] == "/data"
    assert env["JSON_OUTPUT"]["value"] == "true"
    token = env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert token["optional"] is True


def test_env_names_are_launcher_flags(container):
    """A misspelt variable (MAX_INPUT_TOKEN) would be ignored silently by the launcher."""
    import click
    import typer.main

    from launcher import cli

    command = cli.app if isinstance(cli.app, click.Command) else typer.main.get_command(cli.app)
    flags = {p.envvar for p in command.params if isinstance(p.envvar, str)}
    unknown = set(env_of(container)) - flags - set(ENV_NOT_LAUNCHER_FLAGS)
    assert not unknown


def test_service_targets_the_pods(by_kind, container):
    service = by_kind["Service"]
    pod_labels = by_kind["Deployment"]["spec"]["template"]["metadata"]["labels"]
    selector = service["spec"]["selector"]
    assert selector.items() <= pod_labels.items()
    assert by_kind["Deployment"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    container_ports = {p["name"] for p in container["ports"]}
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in container_ports, port
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]}["http"] == 80


def test_hpa_scales_the_deployment_on_the_adapters_metric(by_kind):
    hpa = by_kind["HorizontalPodAutoscaler"]["spec"]
    deployment = by_kind["Deployment"]
    target = hpa["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        deployment["apiVersion"],
        deployment["kind"],
        deployment["metadata"]["name"],
    )
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    assert 1 <= hpa["minReplicas"] < hpa["maxReplicas"]
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["target"]["type"] == "AverageValue"
    assert float(metric["pods"]["target"]["averageValue"]) > 0
    (rule,) = adapter_config(by_kind)["rules"]
    assert metric["pods"]["metric"]["name"] == exposed_metric_name(rule) == "tgi_queue_size"
    assert hpa["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 60


def seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+)(ms|s|m|h)", duration)
    assert "".join(n + u for n, u in parts) == duration, duration
    return sum(int(n) * units[u] for n, u in parts)


def test_service_monitor_scrapes_the_service(by_kind):
    service = by_kind["Service"]
    monitor = by_kind["ServiceMonitor"]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["endpoints"]:
        assert endpoint["port"] in service_ports
        assert endpoint["path"] == "/metrics"
        assert endpoint["interval"] == "15s"
        # the operator refuses a scrapeTimeout above the interval
        assert seconds(endpoint.get("scrapeTimeout", "0s")) <= seconds(endpoint["interval"])


def test_pods_drain_before_they_are_killed(by_kind, container):
    pod = by_kind["Deployment"]["spec"]["template"]["spec"]
    drain = float(env_of(container)["GRACEFUL_TERMINATION_TIMEOUT"]["value"])
    assert drain >= LAUNCHER_DRAIN_SECONDS
    pause = 0
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {})
    if pre_stop:
        assert pre_stop["command"][0] == "sleep"
        pause = int(pre_stop["command"][1])
    assert pod["terminationGracePeriodSeconds"] > drain + pause
    assert pod["terminationGracePeriodSeconds"] > LAUNCHER_DRAIN_SECONDS


def quantity_bytes(text: str) -> int:
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti|KiB|MiB|GiB|TiB)?", text)
    assert match, text
    powers = {"K": 1, "M": 2, "G": 3, "T": 4}
    unit = match.group(2)
    return int(match.group(1)) * (1024 ** powers[unit[0]] if unit else 1)


def test_volumes_resources_and_security(by_kind, container):
    pod = by_kind["Deployment"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    shm = volumes[mounts["/dev/shm"]]["emptyDir"]
    assert shm["medium"] == "Memory"
    assert quantity_bytes(shm["sizeLimit"]) >= 1024**3
    assert "/data" in mounts
    resources = container["resources"]
    for kind in ("cpu", "memory"):
        assert kind in resources["requests"] and kind in resources["limits"], kind
    limit = quantity_bytes(resources["limits"]["memory"])
    assert quantity_bytes(resources["requests"]["memory"]) <= limit
    # A fraction would be of the node's free memory, which ignores the container's limit.
    kv_cache = env_of(container)["KV_CACHE_MEMORY"]["value"]
    assert quantity_bytes(kv_cache) + quantity_bytes(shm["sizeLimit"]) < limit
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_security_context_matches_the_image(by_kind, name):
    dockerfile = KUBE_DIR.parent.parent / "docker" / name
    if not dockerfile.exists():
        pytest.skip(f"docker/{name} not written yet: the manifests assume uid 1000")
    users = re.findall(r"^\s*USER\s+(\S+)", dockerfile.read_text(), re.MULTILINE)
    assert users, "the image must not run as root (runAsNonRoot)"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    if user.isdigit():
        run_as = by_kind["Deployment"]["spec"]["template"]["spec"]["securityContext"]
        assert int(user) == run_as["runAsUser"]


def test_a_non_root_server_may_bind_its_ports(by_kind, container):
    """Below 1024 a non-root process needs net.ipv4.ip_unprivileged_port_start (Docker sets
    it to 0 in every container; Kubernetes only when the pod asks)."""
    pod = by_kind["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] != 0
    sysctls = {s["name"]: s["value"] for s in pod["securityContext"].get("sysctls", [])}
    lowest = min(p["containerPort"] for p in container["ports"])
    allowed_from = int(sysctls.get("net.ipv4.ip_unprivileged_port_start", "1024"))
    assert lowest >= allowed_from


def test_labels_are_the_recommended_ones(by_kind):
    for kind, doc in by_kind.items():
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "textgen-server", kind
        assert labels["app.kubernetes.io/part-of"] == "textgen", kind
