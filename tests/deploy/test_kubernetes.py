"""The Kubernetes manifests (docker/k8s): valid objects for a pinned Kubernetes version, and
wired to each other, to the images and to what the proxy and the model read.

No cluster runs on the development or CI machines: kubernetes-validate checks every object
against the OpenAPI schema of KUBERNETES_VERSION, and the tests below check the structure, as
tests/deploy/test_docker.py does for compose. docs/kubernetes.md explains the objects.
"""

from __future__ import annotations

import dataclasses

import pytest
import yaml
from deploy_files import (
    DOCKER,
    K8S,
    MODEL_DOCKERFILE,
    PROXY_DOCKERFILE,
    ROOT,
    container_env,
    copies,
    env_values,
    exec_form,
    flag_value,
    k8s_kustomization,
    k8s_object,
    k8s_objects,
    last,
    load_script,
    model_config_parameters,
    pod_containers,
)

# The schema version the manifests are checked against (kubernetes-validate bundles schemas for
# 1.25 onwards). HPA autoscaling/v2, PDB policy/v1 and NetworkPolicy networking.k8s.io/v1 are all
# GA there and in every supported release.
KUBERNETES_VERSION = "1.33.0"

API_VERSIONS = {
    "Namespace": "v1",
    "PersistentVolumeClaim": "v1",
    "ConfigMap": "v1",
    "Service": "v1",
    "Deployment": "apps/v1",
    "HorizontalPodAutoscaler": "autoscaling/v2",
    "PodDisruptionBudget": "policy/v1",
    "NetworkPolicy": "networking.k8s.io/v1",
}

TRITON, PROXY = "qwen-vl-triton", "qwen-vl-proxy"
MODEL_PY = ROOT / "model_repository" / "qwen2_5_vl" / "1" / "model.py"


def _triton() -> dict:
    return k8s_object("Deployment", TRITON)


def _proxy() -> dict:
    return k8s_object("Deployment", PROXY)


def _container(workload: dict, name: str) -> dict:
    found = [c for c in pod_containers(workload) if c["name"] == name]
    assert len(found) == 1, f"{workload['metadata']['name']} has {len(found)} containers {name}"
    return found[0]


def _pod_labels(workload: dict) -> dict:
    return workload["spec"]["template"]["metadata"]["labels"]


def _selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, f"only matchLabels selectors are checked: {selector}"
    return selector["matchLabels"].items() <= labels.items()


def _port(container: dict, port) -> int:
    """A probe's or Service's target port (number or container port name) as a number."""
    if isinstance(port, int):
        assert any(p["containerPort"] == port for p in container["ports"]), port
        return port
    found = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    assert found, f"{container['name']} has no port named {port}"
    return found[0]


# --- the files and their schema ----------------------------------------------------------------


# Applied on their own, not by the kustomization (each says how in its header).
OPTIONAL = {"otel-collector.yaml"}


def test_kustomization_lists_every_manifest():
    listed = k8s_kustomization()["resources"]
    on_disk = sorted(
        p.name for p in K8S.glob("*.yaml") if p.name not in {"kustomization.yaml", *OPTIONAL}
    )
    assert sorted(listed) == on_disk, "list every docker/k8s/*.yaml in kustomization.yaml"
    assert len(listed) == len(set(listed))
    assert (
        k8s_kustomization()["namespace"] == k8s_object("Namespace", "qwen-vl")["metadata"]["name"]
    )


@pytest.mark.parametrize(
    "obj",
    [doc for _, doc in k8s_objects()],
    ids=lambda doc: f"{doc['kind']}/{doc['metadata']['name']}",
)
def test_manifest_validates_against_the_pinned_kubernetes_schema(obj):
    import kubernetes_validate

    assert obj["apiVersion"] == API_VERSIONS[obj["kind"]], (obj["kind"], obj["apiVersion"])
    try:
        # strict: unknown fields (a typo, a field in the wrong place) fail too.
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message} at {exc.path}")


def test_every_object_kind_is_there():
    kinds = [doc["kind"] for _, doc in k8s_objects()]
    assert kinds.count("Deployment") == 2 and kinds.count("PodDisruptionBudget") == 2
    for kind in ("HorizontalPodAutoscaler", "NetworkPolicy", "PersistentVolumeClaim", "ConfigMap"):
        assert kind in kinds, kind


# --- Triton ------------------------------------------------------------------------------------


def test_triton_runs_the_model_image_with_its_command():
    triton = _container(_triton(), "triton")
    assert triton["image"].split(":")[0] == "qwen-vl-triton"
    assert triton["args"] == exec_form(last(MODEL_DOCKERFILE, "CMD").args)
    assert "command" not in triton, "keep the image's ENTRYPOINT (nvidia_entrypoint.sh)"
    fetch = _container(_triton(), "fetch-weights")
    assert fetch["image"] == triton["image"]
    assert fetch["args"][-1] == "/opt/qwen-vl/fetch_weights.py"
    assert (DOCKER / "fetch_weights.py").is_file()


def test_triton_requests_a_gpu():
    resources = _container(_triton(), "triton")["resources"]
    assert int(resources["limits"]["nvidia.com/gpu"]) >= 1
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]


def test_triton_probes_wait_for_the_load_then_ask_the_model_itself():
    triton = _container(_triton(), "triton")
    get = triton["startupProbe"]["httpGet"]
    assert get["path"] == "/v2/health/ready" and _port(triton, get["port"]) == 8000, get
    # The startup probe covers a first load (minutes): at least the 30 minutes compose allows.
    startup = triton["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 30 * 60
    # Triton's own health endpoints stay 200 after the model's process died: readiness and
    # liveness run the model probe the image carries, within the probe's own timeout.
    for probe in ("readinessProbe", "livenessProbe"):
        command = triton[probe]["exec"]["command"]
        assert command[:2] == ["python3", "/opt/qwen-vl/model_probe.py"], (probe, command)
        assert float(command[command.index("--timeout") + 1]) < triton[probe]["timeoutSeconds"]
    assert any(
        "docker/model_probe.py" in sources and dest.rstrip("/") == "/opt/qwen-vl"
        for sources, dest in copies(MODEL_DOCKERFILE)
    )


def test_triton_has_time_to_drain_before_sigkill():
    exit_timeout = int(flag_value(_container(_triton(), "triton")["args"], "--exit-timeout-secs"))
    grace = _triton()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > exit_timeout, f"grace {grace}s must exceed --exit-timeout-secs={exit_timeout}"


def test_triton_caches_weights_on_the_claim_and_has_shared_memory():
    hf_home = env_values(MODEL_DOCKERFILE)["HF_HOME"]
    spec = _triton()["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    claims = {
        doc["metadata"]["name"]
        for _, doc in k8s_objects()
        if doc["kind"] == "PersistentVolumeClaim"
    }
    for name in ("fetch-weights", "triton"):
        container = _container(_triton(), name)
        assert container_env(container)["HF_HOME"] == hf_home
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        claim = volumes[mounts[hf_home]]["persistentVolumeClaim"]["claimName"]
        assert claim in claims, f"{name} mounts no PersistentVolumeClaim at {hf_home}"
    triton = _container(_triton(), "triton")
    shm = {m["mountPath"]: m["name"] for m in triton["volumeMounts"]}["/dev/shm"]
    assert volumes[shm]["emptyDir"]["medium"] == "Memory"
    env = container_env(triton)
    assert env["HF_HUB_OFFLINE"] == "1", "the serving container loads from the cache only"
    assert (
        env["QWEN_VL_MODEL"]
        == container_env(_container(_triton(), "fetch-weights"))["QWEN_VL_MODEL"]
    )


def test_triton_service_is_headless_with_its_grpc_port():
    service = k8s_object("Service", TRITON)
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert service["spec"]["selector"].items() <= _pod_labels(_triton()).items()
    triton = _container(_triton(), "triton")
    ports = {
        p["port"]: _port(triton, p.get("targetPort", p["port"])) for p in service["spec"]["ports"]
    }
    assert ports[8001] == 8001 and ports[8000] == 8000


def test_triton_pods_are_annotated_for_prometheus_on_the_metrics_port():
    annotations = _triton()["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "8002"
    assert annotations.get("prometheus.io/path", "/metrics") == "/metrics"
    _port(_container(_triton(), "triton"), 8002)


def test_hpa_scales_triton_on_interactive_waiting_requests_the_model_exports():
    hpa = k8s_object("HorizontalPodAutoscaler", TRITON)
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        "apps/v1",
        "Deployment",
        TRITON,
    )
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    assert metric["pods"]["target"]["type"] == "AverageValue"
    assert float(metric["pods"]["target"]["averageValue"]) > 0
    # prometheus-adapter serves it per pod from the model's gauge, interactive class only: a
    # batch backlog waits by design and must not scale the GPUs.
    adapter = k8s_object("ConfigMap", "qwen-vl-prometheus-adapter-rules")
    rules = yaml.safe_load(adapter["data"]["config.yaml"])["rules"]
    serving = [rule for rule in rules if rule["name"]["as"] == name]
    assert len(serving) == 1, f"no adapter rule exposes {name}"
    (rule,) = serving
    series = rule["seriesQuery"].split("{")[0]
    assert f'"{series}"' in MODEL_PY.read_text(), f"model.py exports no gauge {series}"
    assert 'priority="interactive"' in rule["seriesQuery"]
    assert 'priority="interactive"' in rule["metricsQuery"]
    overrides = rule["resources"]["overrides"]
    assert overrides["pod"] == {"resource": "pod"}
    assert overrides["namespace"] == {"resource": "namespace"}
    assert "<<.Series>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]


def test_network_policy_lets_only_proxy_pods_reach_triton():
    policy = k8s_object("NetworkPolicy", TRITON)["spec"]
    assert _selects(policy["podSelector"], _pod_labels(_triton()))
    assert policy["policyTypes"] == ["Ingress"]
    allowed: dict[int, list[dict]] = {}
    for rule in policy["ingress"]:
        assert rule.get("from") and rule.get("ports"), f"a rule allowing everyone: {rule}"
        for port in rule["ports"]:
            allowed.setdefault(port["port"], []).extend(rule["from"])
    assert set(allowed) == {8000, 8001, 8002}, allowed
    for port in (8000, 8001):
        for peer in allowed[port]:
            assert set(peer) == {"podSelector"}, f"port {port}: {peer}"
            assert _selects(peer["podSelector"], _pod_labels(_proxy()))
            assert not _selects(peer["podSelector"], _pod_labels(_triton()))
    for peer in allowed[8002]:
        assert set(peer) == {"namespaceSelector"}, peer
        assert peer["namespaceSelector"]["matchLabels"] == {
            "kubernetes.io/metadata.name": "monitoring"
        }


# --- the proxy ---------------------------------------------------------------------------------


def test_proxy_runs_the_proxy_image():
    proxy = _container(_proxy(), "proxy")
    assert proxy["image"].split(":")[0] == "qwen-vl-proxy"
    assert "command" not in proxy and "args" not in proxy, "the image's CMD runs the proxy"
    assert _port(proxy, "http") == 9000


def test_proxy_probes_are_health_and_ready():
    proxy = _container(_proxy(), "proxy")
    for probe, path in (("livenessProbe", "/health"), ("readinessProbe", "/ready")):
        get = proxy[probe]["httpGet"]
        assert get["path"] == path and _port(proxy, get["port"]) == 9000, (probe, get)


def test_proxy_has_time_to_drain_before_sigkill():
    from proxy.config import parse_config

    env = container_env(_container(_proxy(), "proxy"))
    default = parse_config([]).server.shutdown_timeout_s
    drain = float(env.get("PROXY_SHUTDOWN_TIMEOUT_S") or default)
    grace = _proxy()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > drain, f"grace {grace}s must exceed the proxy's shutdown timeout {drain}s"


def test_proxy_service_is_the_only_external_one():
    services = [doc for _, doc in k8s_objects() if doc["kind"] == "Service"]
    for service in services:
        spec = service["spec"]
        if service["metadata"]["name"] == PROXY:
            assert spec.get("clusterIP") != "None"
            assert [p["port"] for p in spec["ports"]] == [9000]
            assert spec["selector"].items() <= _pod_labels(_proxy()).items()
            proxy = _container(_proxy(), "proxy")
            assert _port(proxy, spec["ports"][0].get("targetPort", 9000)) == 9000
        else:
            assert spec.get("clusterIP") == "None", f"{service['metadata']['name']} is not headless"
            assert spec.get("type", "ClusterIP") == "ClusterIP"


def test_proxy_points_at_the_headless_triton_service(monkeypatch):
    from proxy.config import env_names, parse_config

    env = container_env(_container(_proxy(), "proxy"))
    for key in env_names():
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        if value is not None:
            monkeypatch.setenv(key, value)
    server = parse_config([]).server
    host, port = server.triton_url.rsplit(":", 1)
    assert host == k8s_object("Service", TRITON)["metadata"]["name"] and port == "8001"
    assert (ROOT / "model_repository" / server.triton_model / "config.pbtxt").is_file()
    assert server.port == 9000 and server.host == "0.0.0.0"


# --- both --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [TRITON, PROXY])
def test_pod_disruption_budget_covers_the_deployment(name):
    budget = k8s_object("PodDisruptionBudget", name)["spec"]
    assert _selects(budget["selector"], _pod_labels(k8s_object("Deployment", name)))
    assert ("minAvailable" in budget) != ("maxUnavailable" in budget)


@pytest.mark.parametrize(
    ("name", "dockerfile"), [(TRITON, MODEL_DOCKERFILE), (PROXY, PROXY_DOCKERFILE)]
)
def test_pods_run_as_the_images_non_root_user(name, dockerfile):
    security = k8s_object("Deployment", name)["spec"]["template"]["spec"]["securityContext"]
    user = last(dockerfile, "USER").args.split(":")[0]
    assert security["runAsNonRoot"] is True and str(security["runAsUser"]) == user


def _hf_reads(name: str) -> bool:
    """Whether huggingface_hub reads the variable (its settings, or the token lookup)."""
    import inspect

    import huggingface_hub.constants
    import huggingface_hub.utils._auth

    sources = (huggingface_hub.constants, huggingface_hub.utils._auth)
    return any(f'"{name}"' in inspect.getsource(module) for module in sources)


def test_every_env_var_set_is_one_the_proxy_or_the_model_reads():
    from proxy.config import env_names
    from qwen_vl_backend.settings import ENV_PREFIX, ModelSettings

    model_env = {ENV_PREFIX + f.name.upper() for f in dataclasses.fields(ModelSettings)}
    launcher = (DOCKER / "triton_launch.py").read_text()
    for workload in (_triton(), _proxy()):
        is_proxy = workload["metadata"]["name"] == PROXY
        for container in pod_containers(workload):
            where = f"{workload['metadata']['name']}/{container['name']}"
            for key in container_env(container):
                if is_proxy or key in env_names():
                    assert key in env_names(), f"{where}: the proxy reads no {key}"
                elif key.startswith(ENV_PREFIX):
                    assert key in model_env, f"{where}: {key} is no ModelSettings field"
                elif key.startswith("TRITON_INSTANCE_"):
                    assert f'"{key}"' in launcher, f"{where}: triton_launch.py does not read {key}"
                else:
                    assert key.startswith("HF_") and _hf_reads(key), f"{where}: nothing reads {key}"


def test_triton_env_parses_as_model_settings():
    from qwen_vl_backend.settings import ModelSettings

    env = {k: v for k, v in container_env(_container(_triton(), "triton")).items() if v}
    settings = ModelSettings.from_parameters(model_config_parameters(), env)
    assert settings.model == env["QWEN_VL_MODEL"]
    assert load_script("triton_launch").instance_override(env) == (1, "KIND_GPU")


# --- the optional OpenTelemetry collector (docs/observability.md "Traces") --------------------


def _collector() -> list[dict]:
    return [doc for doc in yaml.safe_load_all((K8S / "otel-collector.yaml").read_text()) if doc]


@pytest.mark.parametrize("obj", _collector(), ids=lambda doc: doc["kind"])
def test_the_collector_validates_against_the_pinned_kubernetes_schema(obj):
    test_manifest_validates_against_the_pinned_kubernetes_schema(obj)


def test_the_collector_runs_compose_s_image_and_configuration():
    config_map, deployment, service = _collector()
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]["otel-collector"]
    assert yaml.safe_load(config_map["data"]["config.yaml"]) == yaml.safe_load(
        (DOCKER / "otel-collector.yaml").read_text()
    )
    container = _container(deployment, "otel-collector")
    assert compose["image"].endswith(f":-{container['image']}}}")
    mount = container["volumeMounts"][0]["mountPath"]
    assert container["args"] == [f"--config={mount}/config.yaml"] == compose["command"]
    volume = deployment["spec"]["template"]["spec"]["volumes"][0]
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    assert _selects(deployment["spec"]["selector"], _pod_labels(deployment))
    assert service["spec"]["selector"].items() <= _pod_labels(deployment).items()
    ports = {_port(container, p["targetPort"]) for p in service["spec"]["ports"]}
    assert ports == {4317, 4318} == {p["port"] for p in service["spec"]["ports"]}


def test_what_the_collector_s_header_sets_is_read_by_the_proxy_and_the_model():
    header = (K8S / "otel-collector.yaml").read_text().split("apiVersion", 1)[0]
    assert "OTEL_EXPORTER_OTLP_ENDPOINT=http://otel-collector:4318" in header
    assert "QWEN_VL_OTLP_TRACES_ENDPOINT=http://otel-collector:4318" in header
    assert "otlp_traces_endpoint" in model_config_parameters()
