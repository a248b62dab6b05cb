"""deploy/helm: the chart rendered by Helm's own engine, every manifest checked against Kubernetes' schemas.

No `helm` binary is packaged where CI installs from (PyPI, Debian, npm), so the chart is linted and
rendered by helm-python-sdk: Helm's official Go SDK (v4) compiled into a C library, called through
ctypes: the same chart loader, template engine (Go templates + sprig), values merging and linter as
`helm lint` / `helm template`. Every rendered document is then validated by kubernetes-validate
(the Kubernetes OpenAPI schemas, strict: unknown fields are errors) for the oldest Kubernetes the
chart supports and the newest bundled. What no cluster runs here: scheduling, the GPU device plugin,
the ReadWriteMany volume and the NetworkPolicy's enforcement. The health probe's command is run
for real against a real backend (e2e-marked).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from tests.support.ci import unavailable

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "deploy" / "helm" / "ls-segmentation-assist"
LS_VALUES = REPO_ROOT / "deploy" / "helm" / "label-studio-values.yaml"
KUBE_VERSIONS = ("1.25.0", "1.37.0")  # Chart.yaml's kubeVersion floor, the newest schemas bundled
RELEASE = "seg"
PREFIX = f"{RELEASE}-ls-segmentation-assist"
GPU_KEY = "nvidia.com/gpu"
SECRET_KEYS = {"LABEL_STUDIO_API_KEY", "BASIC_AUTH_USER", "BASIC_AUTH_PASS"}


# ---------------------------------------------------------------- helpers (pure)
def load_values(name: str) -> dict:
    return yaml.safe_load((CHART / name).read_text())


def render(values: dict | None = None) -> list[dict]:
    """`helm template seg <chart> -f values`: every non-empty manifest, parsed."""
    with helm.Chart.load(str(CHART)) as chart:
        files = chart.render(values, name=RELEASE, namespace="labeling", is_install=True)
    documents = []
    for path, text in sorted(files.items()):
        if path.endswith("NOTES.txt"):
            continue
        documents += [doc for doc in yaml.safe_load_all(text) if doc]
    return documents


def by_kind(documents: list[dict], kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for doc in documents if doc["kind"] == kind}


def container(workload: dict) -> dict:
    (only,) = workload["spec"]["template"]["spec"]["containers"]
    return only


def env_of(workload: dict) -> dict[str, dict]:
    return {entry["name"]: entry for entry in container(workload).get("env", [])}


def env_value(workload: dict, name: str) -> str:
    return env_of(workload)[name]["value"]


def schema_errors(document: dict, version: str) -> str | None:
    try:
        kubernetes_validate.validate(document, version, strict=True)
    except kubernetes_validate.ValidationError as error:
        return f"{document['kind']}/{document['metadata']['name']}: {error.message} at {list(error.path)}"
    return None


def secret_values(values: dict) -> dict:
    return {**values, "secrets": {"labelStudioApiKey": "k" * 40, "basicAuthUser": "ls", "basicAuthPass": "pw"}}


VARIANTS = {
    "defaults": {},
    "3gpu": load_values("values-3gpu.yaml"),
    "secrets-from-values": secret_values({"redis": {"cache": {"enabled": False, "externalUrl": "redis://ext:6379/1"}}}),
}


# ---------------------------------------------------------------- Helm itself
def test_the_engine_is_helms_own():
    assert helm.helm_sdk_version().startswith("v4.")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_helm_lint_is_clean(variant):
    report = helm.lint(str(CHART), VARIANTS[variant] or None, strict=True, kube_version="v1.30.0")
    assert report["errors"] == [] and report["total_charts_linted"] == 1
    # Severity 1 is information ("icon is recommended"); warnings and errors fail.
    assert [m for m in report["messages"] if m["severity"] >= 2] == [], report["messages"]


def test_lint_can_say_no(tmp_path):
    """The linter catches a broken template (so a clean report above means something)."""
    broken = tmp_path / "chart"
    subprocess.run(["cp", "-r", str(CHART), str(broken)], check=True)
    (broken / "templates" / "broken.yaml").write_text("kind: ConfigMap\n{{ .Values.nothing.here }}\n")
    report = helm.lint(str(broken), None)
    assert any(m["severity"] == 3 for m in report["messages"]), report


# ---------------------------------------------------------------- Kubernetes schemas
@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_manifest_matches_the_kubernetes_schema(variant, version):
    documents = render(VARIANTS[variant])
    assert len(documents) >= 10
    errors = [error for doc in documents if (error := schema_errors(doc, version))]
    assert not errors, errors


def test_the_schema_can_say_no():
    (deployment,) = [d for d in render({}) if d["kind"] == "Deployment" and d["metadata"]["name"] == f"{PREFIX}-sam"]
    container(deployment)["livenesProbe"] = {}  # a typo: strict validation rejects unknown fields
    assert schema_errors(deployment, KUBE_VERSIONS[0])


# ---------------------------------------------------------------- the 3-GPU example
@pytest.fixture(scope="module")
def three_gpu() -> list[dict]:
    return render(VARIANTS["3gpu"])


def test_three_sam_replicas_on_three_gpus_behind_one_service(three_gpu):
    deployments, services = by_kind(three_gpu, "Deployment"), by_kind(three_gpu, "Service")
    sam = deployments[f"{PREFIX}-sam"]
    assert sam["spec"]["replicas"] == 3
    resources = container(sam)["resources"]
    assert resources["limits"][GPU_KEY] == 1 and resources["requests"][GPU_KEY] == 1
    assert env_value(sam, "DEVICE") == "cuda"
    pod = sam["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": GPU_KEY, "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    # One Service, one URL, selecting exactly the SAM pods.
    service = services[f"{PREFIX}-sam"]
    assert service["spec"]["selector"] == sam["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["port"] == 9090


def test_two_training_workers_share_the_models_volume_with_the_serving_replicas(three_gpu):
    deployments = by_kind(three_gpu, "Deployment")
    worker, serving = deployments[f"{PREFIX}-worker"], deployments[f"{PREFIX}-segmentation"]
    assert worker["spec"]["replicas"] == 2
    assert container(worker)["command"] == ["python", "-m", "segmentation.worker"]
    assert container(worker)["resources"]["limits"][GPU_KEY] == 1
    assert container(worker)["image"] == container(serving)["image"]
    (claim,) = by_kind(three_gpu, "PersistentVolumeClaim").values()
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for workload in (worker, serving):
        volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
        assert volumes["models"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        mounts = {m["name"]: m["mountPath"] for m in container(workload)["volumeMounts"]}
        assert mounts["models"] == env_value(workload, "MODEL_DIR") == "/models"
    # The worker finishes its job on SIGTERM: its grace period covers TRAIN_MINUTES.
    grace = worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > 60 * float(env_value(worker, "TRAIN_MINUTES"))


def test_every_pod_template_is_covered_by_a_disruption_budget_and_selected_by_its_service(three_gpu):
    budgets = list(by_kind(three_gpu, "PodDisruptionBudget").values())
    for name in ("sam", "segmentation", "worker"):
        labels = by_kind(three_gpu, "Deployment")[f"{PREFIX}-{name}"]["spec"]["template"]["metadata"]["labels"]
        matching = [b for b in budgets if b["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        assert len(matching) == 1, name
        assert matching[0]["spec"]["maxUnavailable"] == 1
    pods = [
        w["spec"]["template"]["metadata"]["labels"] for w in three_gpu if w["kind"] in ("Deployment", "StatefulSet")
    ]
    for service in by_kind(three_gpu, "Service").values():
        selector = service["spec"]["selector"]
        assert sum(selector.items() <= labels.items() for labels in pods) == 1, service["metadata"]["name"]


def test_secrets_come_from_the_existing_secret_and_never_sit_in_a_manifest(three_gpu):
    assert by_kind(three_gpu, "Secret") == {}
    for workload in by_kind(three_gpu, "Deployment").values():
        env = env_of(workload)
        for key in SECRET_KEYS | {"REDIS_PASSWORD"}:
            ref = env[key]["valueFrom"]["secretKeyRef"]
            assert ref == {
                "name": "segmentation-assist",
                "key": key,
                **({"optional": True} if key in SECRET_KEYS else {}),
            }
        # The password reaches REDIS_URL through Kubernetes' $(VAR) expansion, declared before it.
        names = list(env)
        assert names.index("REDIS_PASSWORD") < names.index("REDIS_URL")
        assert env["REDIS_URL"]["value"].startswith("redis://:$(REDIS_PASSWORD)@")


def test_secrets_given_as_values_become_one_secret():
    documents = render(VARIANTS["secrets-from-values"])
    (secret,) = by_kind(documents, "Secret").values()
    assert set(secret["stringData"]) == SECRET_KEYS
    sam = by_kind(documents, "Deployment")[f"{PREFIX}-sam"]
    assert env_of(sam)["BASIC_AUTH_PASS"]["valueFrom"]["secretKeyRef"]["name"] == secret["metadata"]["name"]
    # An external Redis for the cache: SAM takes it as it is.
    assert env_value(sam, "REDIS_URL") == "redis://ext:6379/1"
    assert f"{PREFIX}-redis-cache" not in by_kind(documents, "StatefulSet")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"secrets": {"basicAuthUser": "only-the-user"}}, "set both or neither"),
        ({"redis": {"auth": {"enabled": True}}}, "redis.auth.enabled needs"),
        ({"redis": {"queue": {"enabled": False}}}, "worker.enabled needs a queue"),
        # values.schema.json: a misspelt key or a queue that could evict jobs stops the install.
        ({"sam": {"replica": 3}}, "additional properties 'replica' not allowed"),
        ({"redis": {"queue": {"maxmemoryPolicy": "allkeys-lru"}}}, "maxmemoryPolicy"),
    ],
)
def test_broken_values_stop_the_render_with_a_message(values, message):
    with pytest.raises(helm.HelmError, match=message):
        render(values)


# ---------------------------------------------------------------- Redis
def test_two_redis_servers_with_opposite_eviction_rules(three_gpu):
    configs = {n: d["data"]["redis.conf"] for n, d in by_kind(three_gpu, "ConfigMap").items()}
    cache, queue = configs[f"{PREFIX}-redis-cache"], configs[f"{PREFIX}-redis-queue"]
    assert "maxmemory 2gb" in cache and "maxmemory-policy allkeys-lru" in cache and "appendonly no" in cache
    assert "maxmemory-policy noeviction" in queue and "appendonly yes" in queue
    deployments = by_kind(three_gpu, "Deployment")
    assert f"@{PREFIX}-redis-cache:6379/" in env_value(deployments[f"{PREFIX}-sam"], "REDIS_URL")
    for name in ("segmentation", "worker"):
        assert f"@{PREFIX}-redis-queue:6379/" in env_value(deployments[f"{PREFIX}-{name}"], "REDIS_URL")
    # The queue keeps its jobs on a volume of its own; redis-server gets the password from the Secret.
    statefulsets = by_kind(three_gpu, "StatefulSet")
    assert statefulsets[f"{PREFIX}-redis-queue"]["spec"]["volumeClaimTemplates"]
    assert container(statefulsets[f"{PREFIX}-redis-cache"])["args"][-2:] == ["--requirepass", "$(REDIS_PASSWORD)"]
    assert set(by_kind(three_gpu, "NetworkPolicy")) == {f"{PREFIX}-redis-cache", f"{PREFIX}-redis-queue"}


def test_the_redis_conf_is_accepted_by_a_real_redis_server(three_gpu, tmp_path):
    """Each rendered redis.conf, started by Debian's redis-server on loopback, has the settings it says."""
    from devstack.processes import free_port

    redis_server = Path("/usr/bin/redis-server")
    if not redis_server.exists():
        unavailable("no redis-server (apt-get install redis-server)")
    for name, config in by_kind(three_gpu, "ConfigMap").items():
        text = (
            config["data"]["redis.conf"]
            .replace("bind 0.0.0.0", "bind 127.0.0.1")
            .replace("dir /data", f"dir {tmp_path}")
        )
        port = free_port()
        path = tmp_path / f"{name}.conf"
        path.write_text(text.replace("port 6379", f"port {port}"))
        process = subprocess.Popen([str(redis_server), str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            answers = _redis_config_get(port, ["maxmemory-policy", "appendonly"])
        finally:
            process.terminate()
            process.wait(timeout=10)
        policy = "allkeys-lru" if name.endswith("cache") else "noeviction"
        assert answers == {"maxmemory-policy": policy, "appendonly": "no" if name.endswith("cache") else "yes"}


def _redis_config_get(port: int, keys: list[str]) -> dict[str, str]:
    import time

    import redis

    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2)
    deadline = time.monotonic() + 10
    while True:
        try:
            return {key: client.config_get(key)[key] for key in keys}
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# ---------------------------------------------------------------- probes, for real
def _probe_command(documents: list[dict], port: int) -> list[str]:
    sam = by_kind(documents, "Deployment")[f"{PREFIX}-sam"]
    probes = {
        kind: container(sam)[kind]["exec"]["command"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")
    }
    command = probes["readinessProbe"]
    assert all(p[:2] == ["python", "-c"] for p in probes.values())
    assert "/health" in command[2] and ":9090/" in command[2]
    return [sys.executable, "-c", command[2].replace(":9090/", f":{port}/")]


@pytest.mark.e2e
def test_the_health_probe_passes_basic_auth_against_a_real_backend(tmp_path):
    """The rendered probe command, run against a real SAM backend with basic auth on: it passes
    with the pod's BASIC_AUTH_* environment and fails without it (as an httpGet probe would)."""
    from devstack.processes import child_env, free_port, spawn, wait_until

    port = free_port()
    command = _probe_command(render(VARIANTS["secrets-from-values"]), port)
    auth = {"BASIC_AUTH_USER": "ls", "BASIC_AUTH_PASS": "pw"}
    backend_env = {
        **auth,
        "SAM_ENGINE": "classic",
        "LABEL_STUDIO_URL": f"http://127.0.0.1:{free_port()}",  # nothing there: /health says DEGRADED, 200
        "IMAGE_CACHE_DIR": str(tmp_path / "cache"),
        "PYTHONUNBUFFERED": "1",
    }
    argv = [sys.executable, "-m", "sam", "--host", "127.0.0.1", "--port", str(port)]
    process = spawn("sam", argv, child_env(backend_env), tmp_path / "sam.log")

    def probe(extra: dict[str, str]) -> int:
        env = child_env(extra, drop=("BASIC_AUTH_USER", "BASIC_AUTH_PASS"))
        return subprocess.run(command, env=env, capture_output=True, timeout=20).returncode

    try:
        wait_until(process, lambda: probe(auth) == 0, timeout=120, what="passing its probe")
        assert probe({}) != 0
        assert probe({**auth, "BASIC_AUTH_PASS": "wrong"}) != 0
    finally:
        process.stop()


# ---------------------------------------------------------------- Label Studio's own chart
def test_label_studio_values_for_the_official_chart():
    """deploy/helm/label-studio-values.yaml (for heartex/label-studio, which cannot be fetched here):
    the version the backends are tested with, the settings they need, and no secret inline."""
    values = yaml.safe_load(LS_VALUES.read_text())
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    _, _, compose_tag = compose["services"]["label-studio"]["image"].partition(":")
    assert values["global"]["image"]["tag"] == compose_tag
    env = values["global"]["extraEnvironmentVars"]
    assert env["LABEL_STUDIO_ML_BLOCK_LOCAL_IP"] == env["LABEL_STUDIO_SSRF_PROTECTION_ENABLED"] == "false"
    assert env["LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN"] == "true"
    secrets = values["global"]["extraEnvironmentSecrets"]
    assert set(secrets) == {"LABEL_STUDIO_USERNAME", "LABEL_STUDIO_PASSWORD", "LABEL_STUDIO_USER_TOKEN"}
    assert all(set(ref) == {"secretName", "secretKey"} for ref in secrets.values())
    assert not {"LABEL_STUDIO_PASSWORD", "LABEL_STUDIO_USER_TOKEN"} & set(env)
    # Our chart's default URL is that chart's Service for a release named label-studio.
    assert load_values("values.yaml")["labelStudio"]["url"] == "http://label-studio-ls-app:80"
