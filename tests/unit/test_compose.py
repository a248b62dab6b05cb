"""docker-compose.yml and its GPU override, checked without a Docker engine.

Both files (raw, interpolated with .env.example, and merged) are validated against the Compose
Specification's JSON schema (tests/unit/data/compose-spec.json, see its NOTICE), then the promises
of the README are asserted: services, ports, healthchecks, profiles, service-name URLs inside the
compose network, and every variable documented in .env.example. Where a `docker-compose` v2 binary
is on PATH, its own loader checks the files too.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from backends.settings import Settings
from tests.support.ci import unavailable

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE = REPO_ROOT / "docker-compose.yml"
GPU_OVERRIDE = REPO_ROOT / "docker-compose.gpu.yml"
ENV_EXAMPLE = REPO_ROOT / ".env.example"
SCHEMA = Path(__file__).resolve().parent / "data" / "compose-spec.json"

BACKENDS = {"segmentation": 7070, "sam": 9090}
# The `scale` profile (README "At scale"): a second SAM replica behind an nginx proxy, two Redis
# servers (cache: evicts; queue: never) and a training worker.
SCALE = {"sam-2", "sam-proxy", "segmentation-worker", "redis-cache", "redis-queue"}
SAM_PROXY_CONF = REPO_ROOT / "deploy" / "nginx" / "sam-proxy.conf"
PORTS = {"label-studio": 8080, "fake-gcs-server": 4443, **BACKENDS}
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)|\$([A-Za-z_][A-Za-z0-9_]*)")


# ---------------------------------------------------------------- helpers (pure)
def parse_env_file(text: str) -> dict[str, str]:
    """`KEY=value` lines of a .env file (comments and blank lines skipped)."""
    env = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not KEY=value: {line!r}"
        env[key.strip()] = value.strip()
    return env


def variables_in(text: str) -> set[str]:
    """Names of every ${VAR...} / $VAR reference, also those nested inside defaults."""
    return {braced or bare for braced, bare in _VARIABLE.findall(text.replace("$$", ""))}


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose-style interpolation: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err},
    ${VAR?err}, nested defaults, $$ as a literal $."""
    out, i = [], 0
    while i < len(value):
        if value.startswith("$$", i):
            out.append("$")
            i += 2
        elif value.startswith("${", i):
            depth, j = 1, i + 2
            while depth:
                # Braces balance inside defaults too ("b/{bucket_name}/o"), as in compose-go.
                depth += {"{": 1, "}": -1}.get(value[j], 0)
                j += 1
            out.append(_substitute(value[i + 2 : j - 1], env))
            i = j
        else:
            out.append(value[i])
            i += 1
    return "".join(out)


def _substitute(expression: str, env: dict[str, str]) -> str:
    match = re.match(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])(.*))?$", expression, re.S)
    assert match, f"bad interpolation ${{{expression}}}"
    name, operator, rest = match.groups()
    current = env.get(name)
    unset = current is None or (operator in (":-", ":?") and current == "")
    if operator in (":-", "-"):
        return interpolate(rest, env) if unset else current
    if operator in (":?", "?"):
        if unset:
            raise ValueError(f"{name}: {rest}")
        return current
    return current or ""


def interpolate_tree(node, env: dict[str, str]):
    if isinstance(node, dict):
        return {key: interpolate_tree(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate_tree(value, env) for value in node]
    return interpolate(node, env) if isinstance(node, str) else node


def merge(base, override):
    """Compose-style merge for what our override uses: mappings merge, everything else replaces."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = merge(base[key], value) if key in base else value
        return merged
    return override


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def container_ports(service: dict) -> set[int]:
    ports = set()
    for port in service.get("ports", []):
        if isinstance(port, dict):
            ports.add(int(port["target"]))
        else:
            ports.add(int(str(port).rsplit(":", 1)[-1].split("/")[0]))
    return ports


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def schema() -> dict:
    return json.loads(SCHEMA.read_text())


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    return parse_env_file(ENV_EXAMPLE.read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def gpu() -> dict:
    return yaml.safe_load(GPU_OVERRIDE.read_text())


@pytest.fixture(scope="module")
def resolved(compose, env_example) -> dict:
    return interpolate_tree(compose, env_example)


# ---------------------------------------------------------------- the helpers themselves
def test_interpolation_follows_compose_rules():
    env = {"SET": "x", "EMPTY": ""}
    assert interpolate("${SET:-d}|${EMPTY:-d}|${EMPTY-d}|${UNSET-d}|$${SET}", env) == "x|d||d|${SET}"
    assert interpolate("${UNSET:-${ALSO:-${SET}}}", env) == "x"
    assert interpolate("a{b}c ${SET}", env) == "a{b}c x"
    assert interpolate("${UNSET:-b/{bucket}/o/{blob}?alt=media}!", env) == "b/{bucket}/o/{blob}?alt=media!"
    with pytest.raises(ValueError, match="needed"):
        interpolate("${EMPTY:?needed}", env)
    assert variables_in("${A:-${B:-c}} $D $${E}") == {"A", "B", "D"}


# ---------------------------------------------------------------- schema
def test_schema_is_the_compose_specification(schema):
    assert schema["title"] == "Compose Specification"
    jsonschema.Draft7Validator.check_schema(schema)
    # The schema can say no: an unknown service key and a wrong type are rejected.
    validator = jsonschema.Draft7Validator(schema)
    assert list(validator.iter_errors({"services": {"a": {"image": "x", "heathcheck": {}}}}))
    assert list(validator.iter_errors({"services": {"a": {"image": "x", "ports": "8080"}}}))


@pytest.mark.parametrize("which", ["compose", "gpu", "merged"])
def test_files_match_the_compose_schema(schema, compose, gpu, env_example, which):
    document = {"compose": compose, "gpu": gpu, "merged": merge(compose, gpu)}[which]
    validator = jsonschema.Draft7Validator(schema)
    for doc in (document, interpolate_tree(document, env_example)):
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
        assert not errors, errors


# ---------------------------------------------------------------- services
def test_services_images_and_builds(compose):
    services = compose["services"]
    assert set(services) == {"label-studio", "segmentation", "sam", "fake-gcs-server", *SCALE}
    assert services["label-studio"]["image"] == "heartexlabs/label-studio:1.23.2"
    gcs_image, _, tag = services["fake-gcs-server"]["image"].partition(":")
    assert gcs_image == "fsouza/fake-gcs-server" and re.fullmatch(r"\d+\.\d+\.\d+", tag)
    for name in BACKENDS:
        build = services[name]["build"]
        assert build["context"] == "."
        assert build["dockerfile"] == f"{name}/Dockerfile"
        assert (REPO_ROOT / build["dockerfile"]).is_file(), f"{build['dockerfile']} is missing"


def test_ports_restart_and_healthchecks(resolved):
    for name, port in PORTS.items():
        service = resolved["services"][name]
        assert container_ports(service) == {port}, name
        assert service["restart"] in {"unless-stopped", "always"}, name
        test = " ".join(service["healthcheck"]["test"])
        assert service["healthcheck"]["test"][0] == "CMD", name
        assert f"127.0.0.1:{port}/" in test, f"{name}'s healthcheck does not probe its own port: {test}"
    # Backends are only published on the host's loopback; Label Studio is the public entry point.
    for name in (*BACKENDS, "fake-gcs-server"):
        assert all(str(p).startswith("127.0.0.1:") for p in resolved["services"][name]["ports"]), name


def test_only_the_emulator_and_the_scale_services_are_behind_profiles(compose):
    services = compose["services"]
    assert services["fake-gcs-server"]["profiles"] == ["dev"]
    profiles = {name: service["profiles"] for name, service in services.items() if "profiles" in service}
    assert profiles == {"fake-gcs-server": ["dev"], **{name: ["scale"] for name in SCALE}}


def test_persistent_volumes(compose):
    declared = set(compose["volumes"])
    mounts = {name: [v.split(":") for v in service.get("volumes", [])] for name, service in compose["services"].items()}
    assert ["label-studio-data", "/label-studio/data"] in mounts["label-studio"]
    assert ["segmentation-models", "/models"] in mounts["segmentation"]
    for service_mounts in mounts.values():
        for source, *_ in service_mounts:
            if source.startswith("./"):  # a file of this repository, bind-mounted
                assert (REPO_ROOT / source).is_file(), f"{source} is missing"
            else:
                assert source in declared, f"volume {source} is not declared"


def test_backends_wait_for_a_healthy_label_studio(compose):
    for name in BACKENDS:
        assert compose["services"][name]["depends_on"]["label-studio"]["condition"] == "service_healthy"


# ---------------------------------------------------------------- environment
def test_containers_use_service_names_never_localhost(resolved):
    for name, service in resolved["services"].items():
        for key, value in environment(service).items():
            assert not re.search(r"localhost|127\.0\.0\.1", value), f"{name}: {key}={value}"
        for arg in service.get("command", []):
            assert not re.search(r"localhost|127\.0\.0\.1", str(arg)), f"{name}: {arg}"
    for name in BACKENDS:
        assert environment(resolved["services"][name])["LABEL_STUDIO_URL"] == "http://label-studio:8080"


def test_label_studio_environment(resolved, env_example):
    env = environment(resolved["services"]["label-studio"])
    assert env["LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN"] == "true"
    # Real GCS by default: Label Studio's own default proxied-read URL, placeholders intact.
    assert env["STORAGE_EMULATOR_HOST"] == ""
    assert env["LABEL_STUDIO_RESOLVER_PROXY_GCS_DOWNLOAD_URL"] == (
        "https://storage.googleapis.com/download/storage/v1/b/{bucket_name}/o/{blob_name}?alt=media"
    )
    assert env["LABEL_STUDIO_ML_BLOCK_LOCAL_IP"] == "false"
    assert env["LABEL_STUDIO_SSRF_PROTECTION_ENABLED"] == "false"
    for key in ("LABEL_STUDIO_USERNAME", "LABEL_STUDIO_PASSWORD", "LABEL_STUDIO_USER_TOKEN"):
        assert env[key] == env_example[key]
    assert env["COLLECT_ANALYTICS"] == "false" and env["SENTRY_DSN"] == ""
    # The backends' token defaults to the admin's legacy token (Settings falls back to it: compose
    # v1 cannot nest the default).
    for name in BACKENDS:
        backend_env = environment(resolved["services"][name])
        assert backend_env["LABEL_STUDIO_API_KEY"] == ""
        assert Settings.from_env(backend_env).label_studio_api_key == env_example["LABEL_STUDIO_USER_TOKEN"]
        assert Settings.from_env({**backend_env, "LABEL_STUDIO_API_KEY": "pat"}).label_studio_api_key == "pat"


def test_dev_profile_values_point_label_studio_at_the_emulator(compose, env_example):
    dev = {
        **env_example,
        "LS_STORAGE_EMULATOR_HOST": "http://fake-gcs-server:4443",
        "LS_GCS_DOWNLOAD_URL": "http://fake-gcs-server:4443/download/storage/v1/b/{bucket_name}/o/{blob_name}?alt=media",
    }
    env = environment(interpolate_tree(compose, dev)["services"]["label-studio"])
    assert env["STORAGE_EMULATOR_HOST"] == "http://fake-gcs-server:4443"
    assert env["LABEL_STUDIO_RESOLVER_PROXY_GCS_DOWNLOAD_URL"].startswith("http://fake-gcs-server:4443/download/")
    # ...and the documented dev values are the ones .env.example gives in its comments.
    for key, value in dev.items():
        if key.startswith("LS_"):
            assert f"#   {key}={value}" in ENV_EXAMPLE.read_text()


def test_missing_credentials_stop_compose_with_a_message(compose, env_example):
    without_token = {k: v for k, v in env_example.items() if k != "LABEL_STUDIO_USER_TOKEN"}
    with pytest.raises(ValueError, match="LABEL_STUDIO_USER_TOKEN"):
        interpolate_tree(compose, without_token)


def test_every_variable_is_in_env_example(env_example):
    used = variables_in(COMPOSE.read_text()) | variables_in(GPU_OVERRIDE.read_text())
    missing = sorted(used - set(env_example))
    assert not missing, f"variables used in compose but not in .env.example: {missing}"


def test_env_example_values_match_compose_defaults(env_example):
    text = COMPOSE.read_text() + GPU_OVERRIDE.read_text()
    for name, default in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*):-([^${}]*)\}", text):
        example = env_example[name]
        assert example in ("", default), f"{name}: .env.example says {example!r}, compose defaults to {default!r}"


def test_env_example_holds_no_real_secrets(env_example):
    assert env_example["LABEL_STUDIO_PASSWORD"] == "change-me"
    assert not re.fullmatch(r"[0-9a-f]{40}", env_example["LABEL_STUDIO_USER_TOKEN"])
    assert env_example["BASIC_AUTH_PASS"] == "" and env_example["LABEL_STUDIO_API_KEY"] == ""


# ---------------------------------------------------------------- GPU override
def test_gpu_override_gives_each_backend_a_gpu(compose, gpu, env_example):
    merged = interpolate_tree(merge(compose, gpu), env_example)
    assert set(gpu["services"]) == set(BACKENDS)
    for name in BACKENDS:
        service = merged["services"][name]
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia"
        assert int(device["count"]) >= 1
        assert environment(service)["DEVICE"] == "cuda"
        # The override keeps the base service whole: same Dockerfile, URL and port.
        assert service["build"]["dockerfile"] == f"{name}/Dockerfile"
        assert environment(service)["LABEL_STUDIO_URL"] == "http://label-studio:8080"
        assert container_ports(service) == {BACKENDS[name]}


# ---------------------------------------------------------------- Docker's own loader, when present
def _compose_command() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


def test_docker_compose_config_accepts_the_files(tmp_path):
    command = _compose_command()
    if command is None:
        pytest.skip("no docker compose v2 on PATH (the schema tests above still ran)")
    env_file = tmp_path / ".env"
    env_file.write_text(ENV_EXAMPLE.read_text())
    result = subprocess.run(
        [
            *command,
            "--project-directory",
            str(REPO_ROOT),
            "--env-file",
            str(env_file),
            "-f",
            str(COMPOSE),
            "-f",
            str(GPU_OVERRIDE),
            "--profile",
            "dev",
            "config",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- the scale profile
def scale_env(env_example: dict[str, str]) -> dict[str, str]:
    """.env.example with the scale profile's values, as its comments give them."""
    documented = dict(re.findall(r"^#\s+((?:SAM|SEGMENTATION)_REDIS_URL)=(\S+)$", ENV_EXAMPLE.read_text(), re.M))
    assert set(documented) == {"SAM_REDIS_URL", "SEGMENTATION_REDIS_URL"}
    return {**env_example, **documented}


def mounts_of(service: dict) -> dict[str, str]:
    """target -> source, from short ("src:dst:ro") or long ({source, target}) volume syntax."""
    pairs = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target, *_ = volume.split(":")
        else:
            source, target = volume["source"], volume["target"]
        pairs[target] = source
    return pairs


def test_default_services_never_need_the_scale_profile(compose, resolved):
    services = compose["services"]
    default = {name for name, service in services.items() if "profiles" not in service}
    assert default == {"label-studio", "segmentation", "sam"}
    for name in default:
        assert set(services[name].get("depends_on", {})) <= default, name
    # Without the profile's values Redis is off: one process per backend, exactly as before.
    for name in BACKENDS:
        assert environment(resolved["services"][name])["REDIS_URL"] == ""


def test_scale_profile_shape(compose, env_example):
    services = interpolate_tree(compose, scale_env(env_example))["services"]
    sam, sam_2 = services["sam"], services["sam-2"]
    # Two identical SAM replicas sharing the cache; only the first is published on the host.
    assert environment(sam) == environment(sam_2)
    assert environment(sam)["REDIS_URL"] == "redis://redis-cache:6379/0"
    assert sam_2["image"] == sam["image"] and sam_2["build"] == sam["build"]
    assert sam_2["healthcheck"] == sam["healthcheck"] and "ports" not in sam_2
    # The worker: the segmentation image and environment, its queue, its models volume.
    worker, segmentation = services["segmentation-worker"], services["segmentation"]
    assert worker["image"] == segmentation["image"]
    assert worker["command"] == ["python", "-m", "segmentation.worker"]
    assert environment(worker) == environment(segmentation)
    assert environment(worker)["REDIS_URL"] == "redis://redis-queue:6379/0"
    assert mounts_of(worker) == mounts_of(segmentation) == {"/models": "segmentation-models"}
    # Redis: the cache evicts within its budget, the queue never evicts and keeps its jobs on disk.
    cache, queue = " ".join(services["redis-cache"]["command"]), " ".join(services["redis-queue"]["command"])
    assert services["redis-cache"]["image"] == services["redis-queue"]["image"] == "redis:7"
    assert "--maxmemory 1gb --maxmemory-policy allkeys-lru" in cache and "--appendonly no" in cache
    assert "--maxmemory-policy noeviction" in queue and "--appendonly yes" in queue
    assert mounts_of(services["redis-queue"]) == {"/data": "redis-queue-data"}
    # The proxy: one URL (sam-proxy:9090) over exactly the two replicas, both started before it.
    proxy = services["sam-proxy"]
    assert mounts_of(proxy) == {"/etc/nginx/nginx.conf": "./deploy/nginx/sam-proxy.conf"}
    upstreams = re.findall(r"^\s*server\s+([\w.-]+):(\d+)", SAM_PROXY_CONF.read_text(), re.M)
    assert sorted(upstreams) == [("sam", "9090"), ("sam-2", "9090")]
    assert set(proxy["depends_on"]) == {"sam", "sam-2"}
    assert re.search(r"^\s*listen 9090;", SAM_PROXY_CONF.read_text(), re.M)
    assert container_ports(proxy) == {9090} and all(p.startswith("127.0.0.1:") for p in proxy["ports"])


def test_docker_compose_loads_the_scale_profile(tmp_path, env_example):
    """Docker's own loader (Debian's docker-compose 1.29 supports profiles since 1.28) on the
    file with the scale profile's values: the merged environments and the resolved paths."""
    command = _compose_command()
    if command is None:
        unavailable("no docker-compose on PATH (apt-get install docker-compose)")
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{key}={value}\n" for key, value in scale_env(env_example).items()))
    argv = [*command, "--project-directory", str(REPO_ROOT), "--env-file", str(env_file), "-f", str(COMPOSE)]
    result = subprocess.run([*argv, "--profile", "scale", "config"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert set(services) >= SCALE
    assert environment(services["sam-2"]) == environment(services["sam"])
    assert environment(services["sam-2"])["REDIS_URL"] == "redis://redis-cache:6379/0"
    assert environment(services["segmentation-worker"])["REDIS_URL"] == "redis://redis-queue:6379/0"
    assert environment(services["segmentation-worker"])["MODEL_DIR"] == "/models"
    assert Path(mounts_of(services["sam-proxy"])["/etc/nginx/nginx.conf"]) == SAM_PROXY_CONF
