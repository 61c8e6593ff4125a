"""Checks of the deployment files (docker/) without a container engine or a cluster.

Schema level: every Kubernetes object validates against the bundled OpenAPI schemas of a real Kubernetes
version (kubernetes-validate, strict: unknown fields fail), and the compose file parses with a Compose
Specification parser (compose-spec) after variable interpolation.

Semantic level: selectors, ports, probes, volumes, Secret and ConfigMap references agree with each other
and with the pgproxy config; the compose services' dependencies and healthchecks agree; and both pgproxy
configs pass pgproxy's own config loader and ``pgproxy check`` inside a simulated container filesystem
(each mount point mapped to a temporary directory holding what the volume would hold).
"""

from __future__ import annotations

import importlib.util
import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import Any, cast

import kubernetes_validate
import pytest
import yaml
from aiohttp import web
from click.testing import CliRunner
from compose_spec import PyCompose

from pgproxy.admin.operations import add_operations_routes
from pgproxy.audit.keys import generate_key
from pgproxy.cli import main
from pgproxy.config import ProxyConfig, parse_config
from pgproxy.identity import TokenVerifier, mint_token
from pgproxy.masking.rules import load_rules
from pgproxy.policy.rules import check_policy, load_policy
from pgproxy.testing import RunningProxy
from pgproxy.tlsutil import generate_dev_ca_and_cert

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
K8S_FILE = DOCKER / "k8s" / "pgproxy.yaml"
COMPOSE_FILE = DOCKER / "compose.yaml"
COMPOSE_CONFIG = DOCKER / "pgproxy.compose.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
DEFAULT_POLICY = ROOT / "pgproxy" / "policy" / "default_policy.yaml"
K8S_VERSION = "1.30"  # oldest Kubernetes release the manifests are meant for
IMAGE = "pgproxy:dev"
COMPOSE_VARIABLES = {"POSTGRES_PASSWORD": "compose-test-password"}


# --------------------------------------------------------------------------------------------------
# Loading


def _k8s_docs() -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(K8S_FILE.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs)
    return docs


def _objects(kind: str) -> list[dict[str, Any]]:
    return [d for d in _k8s_docs() if d["kind"] == kind]


def _one(kind: str) -> dict[str, Any]:
    found = _objects(kind)
    assert len(found) == 1, f"expected exactly one {kind}, found {len(found)}"
    return found[0]


def _named(kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in _objects(kind) if d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind} {name!r} is referenced but not defined exactly once"
    return matches[0]


def _workload() -> dict[str, Any]:
    return _one("StatefulSet")


def _pod() -> dict[str, Any]:
    return dict(_workload()["spec"]["template"]["spec"])


def _pod_labels() -> dict[str, str]:
    return dict(_workload()["spec"]["template"]["metadata"]["labels"])


def _container() -> dict[str, Any]:
    matches = [c for c in _pod()["containers"] if c["name"] == "pgproxy"]
    assert len(matches) == 1
    return dict(matches[0])


def _secret_items(secret: dict[str, Any]) -> dict[str, str]:
    assert not secret.get("data"), "use stringData placeholders, never encoded values"
    return dict(secret.get("stringData") or {})


def _k8s_config_data() -> dict[str, Any]:
    data = yaml.safe_load(_named("ConfigMap", "pgproxy-config")["data"]["pgproxy.yaml"])
    assert isinstance(data, dict)
    return data


def _resolve_port(port: int | str, container: dict[str, Any]) -> int:
    """A probe's or Service's target port (number or name) as the container port it points at."""
    ports = container.get("ports") or []
    if isinstance(port, str):
        matches = [p["containerPort"] for p in ports if p.get("name") == port]
        assert len(matches) == 1, f"port name {port!r} is not a port of container {container['name']}"
        return int(matches[0])
    assert port in [p["containerPort"] for p in ports], f"port {port} is not exposed by {container['name']}"
    return port


def _interpolate(text: str, variables: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:?msg}, ${VAR:-default} substitution; an unknown variable fails."""

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        assert name in variables, f"compose file uses ${{{name}}}, which docker/README.md does not document"
        return variables[name]

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:[:?-][^}]*)?\}", substitute, text)


def _compose() -> dict[str, Any]:
    data = yaml.safe_load(_interpolate(COMPOSE_FILE.read_text(), COMPOSE_VARIABLES))
    assert isinstance(data, dict)
    return data


def _service(name: str) -> dict[str, Any]:
    return dict(_compose()["services"][name])


def _mounts(service: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(source, target, read-only) of each volume entry in short or long syntax."""
    mounts = []
    for entry in service.get("volumes") or []:
        if isinstance(entry, str):
            parts = entry.split(":")
            assert len(parts) in (2, 3), f"unexpected volume entry {entry!r}"
            mounts.append((parts[0], parts[1], len(parts) == 3 and "ro" in parts[2].split(",")))
        else:
            mounts.append((str(entry.get("source", "")), str(entry["target"]), bool(entry.get("read_only"))))
    return mounts


def _is_bind(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or source in (".", "..")


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _final_stage() -> list[tuple[str, str]]:
    instructions = _dockerfile_instructions()
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def _load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, DOCKER / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------------
# A simulated container filesystem: config paths are mapped through the mounts to temporary directories.


def _walk_strings(node: Any, path: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk_strings(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from _walk_strings(item, f"{path}[{i}]")
    elif isinstance(node, str):
        yield path, node


def _config_paths(data: dict[str, Any]) -> dict[str, str]:
    """{dotted setting: absolute container path} for every path-valued setting in a loaded config."""
    return {key: value for key, value in _walk_strings(data) if value.startswith("/")}


def _relocate(data: Any, mounts: dict[str, Path]) -> Any:
    """A copy of ``data`` with every absolute container path moved under the host dir of its mount."""
    if isinstance(data, dict):
        return {k: _relocate(v, mounts) for k, v in data.items()}
    if isinstance(data, list):
        return [_relocate(v, mounts) for v in data]
    if isinstance(data, str) and data.startswith("/"):
        path = PurePosixPath(data)
        owners = [t for t in mounts if path.is_relative_to(PurePosixPath(t))]
        assert owners, f"{data} is not inside any mounted volume"
        target = max(owners, key=len)  # the innermost mount wins, as in a container
        return str(mounts[target] / path.relative_to(PurePosixPath(target)))
    return data


def _check_in_container(data: dict[str, Any], mounts: dict[str, Path], env: dict[str, str], tmp_path: Path,
                        monkeypatch: pytest.MonkeyPatch) -> ProxyConfig:
    """Run pgproxy's config loader and ``pgproxy check`` on ``data`` as the container would see it."""
    relocated = _relocate(data, mounts)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    config_file = tmp_path / "pgproxy-under-test.yaml"
    config_file.write_text(yaml.safe_dump(relocated))
    result = CliRunner().invoke(main, ["check", "--offline", "-c", str(config_file)])
    assert result.exit_code == 0, result.output
    assert result.output.strip().endswith(": OK"), result.output
    config = parse_config(relocated, tmp_path)
    for listener in config.listeners:
        assert listener.tls is not None and not listener.insecure_plaintext, "deployments must use TLS"
    # Masking rules and key load as the proxy loads them.
    assert config.masking is not None
    load_rules(config.masking.rules_dir)
    assert config.masking.key() is not None, "keyed_hash rules need the key: deployments always set one"
    return config


def _env_references(data: dict[str, Any]) -> set[str]:
    """Every environment variable a pgproxy config reads (settings named *_env)."""
    return {value for key, value in _walk_strings(data) if re.search(r"(^|\.)[a-z0-9_]*_env$", key)}


# --------------------------------------------------------------------------------------------------
# Kubernetes: schema


@pytest.mark.parametrize("index", range(len(_k8s_docs())))
def test_k8s_object_validates_against_the_kubernetes_schema(index: int) -> None:
    doc = _k8s_docs()[index]
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{doc['kind']} {doc['metadata']['name']}: {exc}")


def test_k8s_schema_validation_rejects_a_broken_object() -> None:
    """The validator is really strict: a misspelt field and a wrong type both fail."""
    workload = json.loads(json.dumps(_workload()))
    workload["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(workload, K8S_VERSION, strict=True)
    workload = json.loads(json.dumps(_workload()))
    workload["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(workload, K8S_VERSION, strict=True)


def test_k8s_objects_are_unique_and_namespaced() -> None:
    namespaces = {d["metadata"]["name"] for d in _objects("Namespace")}
    seen = set()
    for doc in _k8s_docs():
        key = (doc["kind"], doc["metadata"].get("namespace"), doc["metadata"]["name"])
        assert key not in seen, f"duplicate object {key}"
        seen.add(key)
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") in namespaces, key
    kinds = [d["kind"] for d in _k8s_docs()]
    for kind in ("ConfigMap", "Secret", "StatefulSet", "PodDisruptionBudget"):
        assert kinds.count(kind) == 1, kind
    assert not _objects("Deployment"), "per-replica audit volumes need a StatefulSet"


def test_secret_holds_placeholders_only() -> None:
    for key, value in _secret_items(_named("Secret", "pgproxy-secrets")).items():
        assert "REPLACE" in value, f"Secret key {key!r} looks like a real value"


# --------------------------------------------------------------------------------------------------
# Kubernetes: workload


def test_statefulset_has_replicas_selector_and_headless_service() -> None:
    spec = _workload()["spec"]
    assert spec["replicas"] >= 2
    assert spec["selector"]["matchLabels"].items() <= _pod_labels().items()
    governing = _named("Service", spec["serviceName"])
    assert governing["spec"]["clusterIP"] == "None"
    assert governing["spec"]["selector"].items() <= _pod_labels().items()
    assert spec["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain", "whenScaled": "Retain"}


def test_each_replica_writes_its_signed_audit_log_to_its_own_claim() -> None:
    audit = _k8s_config_data()["audit"]
    assert "dir" in audit and "jsonl_path" not in audit, "the k8s config should use the signed log"
    claims = {t["metadata"]["name"]: t for t in _workload()["spec"]["volumeClaimTemplates"]}
    pod_volumes = {v["name"] for v in _pod()["volumes"]}
    owners = [m for m in _container()["volumeMounts"] if m["mountPath"] == audit["dir"]]
    assert len(owners) == 1 and not owners[0].get("readOnly", False)
    name = owners[0]["name"]
    assert name in claims and name not in pod_volumes, "audit.dir must be a per-replica claim"
    assert claims[name]["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_pod_runs_unprivileged_with_resources_and_spread() -> None:
    pod = _pod()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["automountServiceAccountToken"] is False
    for container in pod["containers"]:
        ctx = container["securityContext"]
        assert ctx["allowPrivilegeEscalation"] is False
        assert ctx["readOnlyRootFilesystem"] is True
        assert ctx["capabilities"]["drop"] == ["ALL"]
        assert {"cpu", "memory"} <= set(container["resources"]["requests"])
        assert "memory" in container["resources"]["limits"]
    terms = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert any(t["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
               and t["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= _pod_labels().items()
               for t in terms)
    # SIGTERM: 5 s drain, then up to 5 s wind-down; the grace period must cover both.
    assert pod["terminationGracePeriodSeconds"] >= 15


def test_k8s_image_user_matches_dockerfile() -> None:
    user = next(rest for w, rest in reversed(_final_stage()) if w == "USER")
    uid, _, gid = user.partition(":")
    ctx = _pod()["securityContext"]
    assert str(ctx["runAsUser"]) == uid
    assert str(ctx["runAsGroup"]) == gid


def test_pod_disruption_budget_keeps_a_replica() -> None:
    pdb = _one("PodDisruptionBudget")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= _pod_labels().items()
    assert pdb["selector"]["matchLabels"] == _workload()["spec"]["selector"]["matchLabels"]
    assert pdb["maxUnavailable"] < _workload()["spec"]["replicas"]


def _health_routes() -> set[str]:
    """The GET paths pgproxy's health endpoints are served at (registered as the proxy registers them)."""
    app = web.Application()
    add_operations_routes(app, cast(Any, None))
    return {r.resource.canonical for r in app.router.routes() if r.method == "GET" and r.resource is not None}


def test_probes_use_the_health_endpoints() -> None:
    admin = _k8s_config_data()["admin"]
    container = _container()
    paths = {}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert _resolve_port(get["port"], container) == admin["port"], probe
        assert get["scheme"] == ("HTTPS" if admin.get("tls") else "HTTP"), probe
        paths[probe] = get["path"]
    assert set(paths.values()) <= _health_routes() == {"/livez", "/readyz"}
    # Readiness follows the dependencies; liveness and startup only the process (no restart loops when
    # the database is down).
    assert paths == {"startupProbe": "/livez", "readinessProbe": "/readyz", "livenessProbe": "/livez"}


def test_ports_agree_between_config_container_and_services() -> None:
    data = _k8s_config_data()
    container = _container()
    listener_ports = {listener["port"] for listener in data["listeners"]}
    assert {p["containerPort"] for p in container["ports"]} == listener_ports | {data["admin"]["port"]}
    assert all(listener["host"] == "0.0.0.0" for listener in data["listeners"])
    targets = {}
    for service in _objects("Service"):
        assert service["spec"]["selector"].items() <= _pod_labels().items(), service["metadata"]["name"]
        for port in service["spec"]["ports"]:
            targets[service["metadata"]["name"]] = _resolve_port(port["targetPort"], container)
    assert targets["pgproxy"] in listener_ports
    assert _named("Service", "pgproxy")["spec"]["ports"][0]["port"] == 5432
    assert _named("Service", "pgproxy")["spec"]["sessionAffinity"] == "ClientIP"  # cancel requests
    assert targets["pgproxy-admin"] == data["admin"]["port"]


def test_volumes_mounts_and_references_exist() -> None:
    pod = _pod()
    volumes = {v["name"]: v for v in pod["volumes"]}
    claims = {t["metadata"]["name"] for t in _workload()["spec"]["volumeClaimTemplates"]}
    assert len(volumes) == len(pod["volumes"]) and not set(volumes) & claims
    mounted = set()
    for mount in _container()["volumeMounts"]:
        assert mount["name"] in volumes or mount["name"] in claims, mount["name"]
        mounted.add(mount["name"])
    assert mounted == set(volumes) | claims, "unused volumes"
    for volume in volumes.values():
        if "configMap" in volume:
            data = _named("ConfigMap", volume["configMap"]["name"])["data"]
            assert all(item["key"] in data for item in volume["configMap"]["items"])
        if "secret" in volume:
            items = _secret_items(_named("Secret", volume["secret"]["secretName"]))
            assert all(item["key"] in items for item in volume["secret"]["items"])


def test_every_variable_the_config_reads_comes_from_the_secret() -> None:
    env = {var["name"]: var for var in _container()["env"]}
    secret = _secret_items(_named("Secret", "pgproxy-secrets"))
    referenced = _env_references(_k8s_config_data())
    assert {"PGPROXY_UPSTREAM_PASSWORD", "PGPROXY_APPROVALS_DSN", "PGPROXY_MASKING_KEY"} <= referenced
    for name in referenced:
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "pgproxy-secrets" and ref["key"] in secret, name


def test_k8s_approvals_are_shared_in_postgres() -> None:
    approvals = _k8s_config_data()["approvals"]
    assert approvals["store"] == "postgres" and approvals["schema"]


def _k8s_container_fs(tmp_path: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """Host directories for the pod's mounts, filled as Kubernetes would (Secret files with real keys in
    place of the placeholders), and the container's environment."""
    pod = _pod()
    volumes = {v["name"]: v for v in pod["volumes"]}
    secret = _secret_items(_named("Secret", "pgproxy-secrets"))
    tls = generate_dev_ca_and_cert(tmp_path / "generated-tls")
    real_files = {"tls.crt": tls.cert_file.read_bytes(), "tls.key": tls.key_file.read_bytes(),
                  "upstream-ca.crt": tls.ca_file.read_bytes()}
    generate_key(tmp_path / "generated-audit" / "key")
    real_files["audit-signing.key"] = (tmp_path / "generated-audit" / "key").read_bytes()
    mounts: dict[str, Path] = {}
    for i, mount in enumerate(_container()["volumeMounts"]):
        host = tmp_path / "fs" / str(i)
        host.mkdir(parents=True)
        mounts[mount["mountPath"]] = host
        volume = volumes.get(mount["name"], {})
        if "configMap" in volume:
            data = _named("ConfigMap", volume["configMap"]["name"])["data"]
            for item in volume["configMap"]["items"]:
                (host / item["path"]).write_text(data[item["key"]])
        if "secret" in volume:
            for item in volume["secret"]["items"]:
                assert item["key"] in secret
                (host / item["path"]).write_bytes(real_files[item["key"]])
    env = {var["name"]: secret[var["valueFrom"]["secretKeyRef"]["key"]] for var in _container()["env"]}
    return mounts, env


def test_k8s_config_passes_pgproxy_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mounts, env = _k8s_container_fs(tmp_path)
    args = _container()["args"]
    assert args[:2] == ["serve", "-c"]
    config_file = Path(_relocate(args[2], mounts))
    assert yaml.safe_load(config_file.read_text()) == _k8s_config_data(), "serve -c must point at the ConfigMap"
    config = _check_in_container(_k8s_config_data(), mounts, env, tmp_path, monkeypatch)
    assert config.approvals is not None and config.admin is not None and config.policy is not None
    assert config.audit.dir is not None and config.audit.signing_key_file is not None
    # Every file setting (certificates, keys, policy, masking rules) is under a read-only mount.
    read_only = {m["mountPath"] for m in _container()["volumeMounts"] if m.get("readOnly")}
    for key, value in _config_paths(_k8s_config_data()).items():
        if key != "audit.dir":
            assert any(PurePosixPath(value).is_relative_to(PurePosixPath(m)) for m in read_only), key
    assert config.masking is not None and load_rules(config.masking.rules_dir).rules


def test_k8s_policy_is_the_shipped_default(tmp_path: Path) -> None:
    policy_text = _named("ConfigMap", "pgproxy-config")["data"]["policy.yaml"]
    assert yaml.safe_load(policy_text) == yaml.safe_load(DEFAULT_POLICY.read_text())
    (tmp_path / "policy.yaml").write_text(policy_text)
    assert check_policy(load_policy(tmp_path / "policy.yaml")) == []


# --------------------------------------------------------------------------------------------------
# Docker Compose


def test_compose_file_validates_against_the_compose_specification() -> None:
    PyCompose.from_json(json.dumps(_compose())).validate()


def test_compose_validation_rejects_a_broken_file() -> None:
    broken = _compose()
    broken["services"]["pgproxy"]["healthcheck"]["retries"] = "three"
    with pytest.raises(ValueError):
        PyCompose.from_json(json.dumps(broken))
    broken = _compose()
    broken["services"]["pgproxy"]["stop_grace"] = "15s"
    with pytest.raises(ValueError):
        PyCompose.from_json(json.dumps(broken))


def test_compose_variables_are_all_documented() -> None:
    used = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", COMPOSE_FILE.read_text()))
    assert used == set(COMPOSE_VARIABLES)
    readme = (DOCKER / "README.md").read_text()
    assert all(name in readme for name in used)


def test_compose_volumes_and_dependencies_are_consistent() -> None:
    compose = _compose()
    services = compose["services"]
    declared = set(compose.get("volumes") or {})
    used = set()
    for name, service in services.items():
        for source, target, _ in _mounts(service):
            assert PurePosixPath(target).is_absolute(), target
            if _is_bind(source):
                assert (COMPOSE_FILE.parent / source).exists(), f"{name}: bind source {source} missing"
            else:
                assert source in declared, f"{name}: volume {source!r} not declared"
                used.add(source)
        for dep, condition in (service.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            dependency = services[dep]
            if condition["condition"] == "service_healthy":
                assert "test" in dependency.get("healthcheck", {}), f"{dep} has no healthcheck for {name}"
            if condition["condition"] == "service_completed_successfully":
                assert dependency.get("restart") == "no", f"{dep} must be a one-shot service"
    assert used == declared, f"declared but unused volumes: {declared - used}"

    def reaches(start: str, goal: str, seen: frozenset[str] = frozenset()) -> bool:
        deps = services[start].get("depends_on") or {}
        return goal in deps or any(reaches(d, goal, seen | {start}) for d in deps if d not in seen)

    assert not any(reaches(name, name) for name in services), "dependency cycle"
    assert reaches("pgproxy", "postgres") and reaches("pgproxy", "init") and reaches("pgproxy", "jwks")


def test_compose_postgres_is_15_with_healthcheck() -> None:
    postgres = _service("postgres")
    assert str(postgres["image"]).startswith("postgres:15")
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])


def test_compose_builds_the_image_from_the_dockerfile() -> None:
    for name in ("init", "jwks", "pgproxy"):
        service = _service(name)
        assert service["image"] == IMAGE
        context = (COMPOSE_FILE.parent / service["build"]["context"]).resolve()
        assert context == ROOT and (context / service["build"]["dockerfile"]).resolve() == DOCKERFILE


def test_named_volumes_start_owned_by_the_image_user() -> None:
    """A new named volume takes the ownership of the image directory it is mounted on: every such mount
    of the pgproxy image must land on a directory the Dockerfile creates for uid 10001."""
    run = " ".join(rest for word, rest in _final_stage() if word == "RUN")
    created = re.search(r"mkdir -p ([^&]*)", run)
    owned = re.search(r"chown -R pgproxy:pgproxy ([^&]*)", run)
    assert created and owned
    for name in ("init", "jwks", "pgproxy"):
        for source, target, read_only in _mounts(_service(name)):
            if not _is_bind(source) and not read_only:
                assert target in created.group(1).split(), f"{name}: {target} is not created in the Dockerfile"
                assert any(PurePosixPath(target).is_relative_to(PurePosixPath(d)) for d in owned.group(1).split())


def _compose_container_fs(tmp_path: Path, service: str) -> dict[str, Path]:
    """Host directories for a service's mounts; the `keys` volume holds what compose_setup creates."""
    mounts: dict[str, Path] = {}
    for source, target, _ in _mounts(_service(service)):
        if _is_bind(source):
            mounts[target] = (COMPOSE_FILE.parent / source).resolve()
        else:
            mounts[target] = tmp_path / "volumes" / source
            mounts[target].mkdir(parents=True, exist_ok=True)
    return mounts


def test_compose_setup_creates_keys_once(tmp_path: Path) -> None:
    setup = _load_script("compose_setup")
    created = setup.ensure_keys(tmp_path)
    assert {p.relative_to(tmp_path).as_posix() for p in created} == {
        "identity/dev-signing-key.pem", "identity/jwks.json", "tls/ca.crt", "tls/server.crt", "tls/server.key",
        "audit/audit-signing.key", "audit/audit-signing.key.pub", "masking.key"}
    assert not (tmp_path / "tls" / "ca.key").exists()
    assert len((tmp_path / "masking.key").read_bytes()) >= 32
    before = {p: p.read_bytes() for p in created}
    assert setup.ensure_keys(tmp_path) == []
    assert {p: p.read_bytes() for p in created} == before


def test_compose_config_passes_pgproxy_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    setup = _load_script("compose_setup")
    pgproxy = _service("pgproxy")
    mounts = _compose_container_fs(tmp_path, "pgproxy")
    setup.ensure_keys(mounts["/etc/pgproxy/keys"])
    # The config is mounted where the image's CMD reads it, and PGPROXY_CONFIG agrees.
    cmd = next(json.loads(rest) for word, rest in _final_stage() if word == "CMD")
    config_path = cmd[cmd.index("-c") + 1]
    assert mounts[config_path] == COMPOSE_CONFIG
    assert pgproxy["environment"]["PGPROXY_CONFIG"] == config_path
    data = yaml.safe_load(COMPOSE_CONFIG.read_text())
    env = {k: str(v) for k, v in pgproxy["environment"].items()}
    assert _env_references(data) <= set(env)
    config = _check_in_container(data, mounts, env, tmp_path, monkeypatch)
    assert config.audit.dir is not None and config.approvals is not None and config.approvals.store == "sqlite"
    assert config.policy is not None and config.policy.file.read_bytes() == DEFAULT_POLICY.read_bytes()
    assert config.upstream.host in _compose()["services"]
    assert config.identity.jwks_url is not None and config.identity.dev_signing_key_file is not None
    # The JWKS URL names the jwks service and the port its command serves on.
    jwks = _service("jwks")
    assert re.fullmatch(rf"https://jwks:{jwks['command'][3]}/\.well-known/jwks\.json", config.identity.jwks_url)
    # The JWKS server's files are the ones compose_setup wrote to the same volume.
    jwks_mounts = _compose_container_fs(tmp_path, "jwks")
    for path in jwks["command"][:3]:
        assert Path(_relocate(path, jwks_mounts)).is_file(), path
    assert Path(_relocate(env["SSL_CERT_FILE"], mounts)).is_file()


def test_compose_ports_and_healthchecks_match_the_config() -> None:
    data = yaml.safe_load(COMPOSE_CONFIG.read_text())
    expected = {listener["port"] for listener in data["listeners"]} | {data["admin"]["port"]}
    published = set()
    for entry in _service("pgproxy")["ports"]:
        host_ip, host_port, container_port = str(entry).split(":")
        assert host_ip == "127.0.0.1", "publish on loopback only"
        assert host_port == container_port, "docs use the same port numbers inside and outside"
        published.add(int(container_port))
    assert published == expected
    check = " ".join(_service("pgproxy")["healthcheck"]["test"])
    url = re.search(r"'(https?)://localhost:(\d+)(/\w+)'", check)
    assert url is not None, check
    assert url.group(1) == ("https" if data["admin"].get("tls") else "http")
    assert int(url.group(2)) == data["admin"]["port"] and url.group(3) == "/readyz"
    assert url.group(3) in _health_routes()
    cafile = re.search(r"cafile='([^']+)'", check)
    assert cafile is not None and cafile.group(1).startswith("/etc/pgproxy/keys/")  # the keys volume


def test_compose_healthcheck_runs_against_a_real_proxy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The compose healthcheck command, run as the container runs it, against a real admin listener
    with the compose keys: healthy while the proxy's dependencies work, unhealthy when the upstream is not."""
    setup = _load_script("compose_setup")
    keys = tmp_path / "keys"
    setup.ensure_keys(keys)
    admin_port, upstream = _free_port(), socket.socket()
    upstream.bind(("127.0.0.1", 0))
    upstream.listen()
    command = _service("pgproxy")["healthcheck"]["test"]
    assert command[:2] == ["CMD", "python"]
    script = command[3].replace("/etc/pgproxy/keys/", f"{keys}/").replace(":6480/", f":{admin_port}/")
    config = parse_config({
        "listeners": [{"host": "127.0.0.1", "port": 0, "insecure_plaintext": True}],
        "identity": {"issuer": "i", "audience": "a", "algorithms": ["ES256"],
                     "jwks_file": str(keys / "identity" / "jwks.json")},
        "upstream": {"port": upstream.getsockname()[1], "credentials": [{"role": "*"}]},
        "audit": {"jsonl_path": str(tmp_path / "audit.jsonl")},
        "approvals": {"store": "sqlite", "path": str(tmp_path / "approvals.sqlite")},
        "admin": {"host": "127.0.0.1", "port": admin_port, "ui": False,
                  "tls": {"cert_file": str(keys / "tls" / "server.crt"), "key_file": str(keys / "tls" / "server.key")}},
    }, tmp_path)
    with RunningProxy(config):
        assert subprocess.run([sys.executable, "-c", script], capture_output=True).returncode == 0
        upstream.close()
        failed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
        assert failed.returncode != 0 and "503" in failed.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_jwks_server_serves_the_keys_the_proxy_verifies_with(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The compose `jwks` service, run as compose runs it, and pgproxy's jwks_url path against it."""
    setup = _load_script("compose_setup")
    keys = tmp_path / "keys"
    setup.ensure_keys(keys)
    port = _free_port()
    command = [str(keys / "identity" / "jwks.json"), str(keys / "tls" / "server.crt"),
               str(keys / "tls" / "server.key"), str(port)]
    server = subprocess.Popen([sys.executable, str(DOCKER / "jwks_server.py"), *command], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while True:  # readiness wait, not a timing assertion
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "jwks_server.py did not start"
                time.sleep(0.05)
        monkeypatch.setenv("SSL_CERT_FILE", str(keys / "tls" / "ca.crt"))
        data = yaml.safe_load(COMPOSE_CONFIG.read_text())["identity"]
        data.update(jwks_url=f"https://localhost:{port}/.well-known/jwks.json", dev_signing_key_file=None)
        config = parse_config({"listeners": [{"insecure_plaintext": True}], "identity": data,
                               "upstream": {"credentials": [{"role": "*"}]}}, tmp_path)
        verifier = TokenVerifier(config.identity)
        assert await verifier.prefetch_keys() == 1
        token = mint_token(keys / "identity" / "dev-signing-key.pem", issuer=data["issuer"],
                           audience=data["audience"], subject="alice")
        assert (await verifier.verify(token)).subject == "alice"
    finally:
        server.terminate()
        server.wait(timeout=10)


# --------------------------------------------------------------------------------------------------
# The image


def test_dockerfile_shape() -> None:
    instructions = _dockerfile_instructions()
    arg = next(rest for word, rest in instructions if word == "ARG" and rest.startswith("PYTHON_IMAGE="))
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.11\.\d+-slim-bookworm@sha256:[0-9a-f]{64}", arg), "pin the base"
    assert all(rest.startswith("${PYTHON_IMAGE}") for word, rest in instructions if word == "FROM")
    final = _final_stage()
    words = [w for w, _ in final]
    users = [rest for w, rest in final if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN"), "USER must follow RUN"
    assert [json.loads(rest) for w, rest in final if w == "ENTRYPOINT"] == [["pgproxy"]]
    assert [json.loads(rest) for w, rest in final if w == "CMD"] == [["serve", "-c", "/etc/pgproxy/pgproxy.yaml"]]
    assert ("EXPOSE", "6432") in final
    healthcheck = next(rest for w, rest in final if w == "HEALTHCHECK")
    assert "('127.0.0.1', 6432)" in healthcheck
    for copied in ("pyproject.toml", "README.md", "pgproxy"):
        assert (ROOT / copied).exists()
