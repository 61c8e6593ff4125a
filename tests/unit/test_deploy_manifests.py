"""Structural checks of the deployment files (docker/), without a container engine or a cluster.

Every YAML document is loaded with yaml.safe_load_all and cross-checked: Kubernetes object identity,
selectors and labels, ports, volumes, Secret/ConfigMap references; the compose services, volumes and
dependencies; and the pgproxy configs embedded in both, which must pass ``pgproxy.config.parse_config``
and ``pgproxy check`` once their absolute paths point at real (generated) files.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from pgproxy.cli import main
from pgproxy.config import ConfigError, ProxyConfig, parse_config
from pgproxy.identity import generate_dev_keys
from pgproxy.tlsutil import generate_dev_ca_and_cert

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
K8S_FILE = DOCKER / "k8s" / "pgproxy.yaml"
COMPOSE_FILE = DOCKER / "compose.yaml"
COMPOSE_CONFIG = DOCKER / "pgproxy.compose.yaml"
DOCKERFILE = DOCKER / "Dockerfile"

NAMESPACED_KINDS = {"ConfigMap", "Secret", "Deployment", "Service"}
# Config keys whose value is a file path, and whether the file must exist for parse_config.
PATH_KEYS = {"cert_file": True, "key_file": True, "jwks_file": True, "sslrootcert": True,
             "password_file": True, "dev_signing_key_file": False, "jsonl_path": False}
UPSTREAM_PASSWORD = "test-upstream-password"


# --------------------------------------------------------------------------------------------------
# Helpers


def _k8s_docs() -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(K8S_FILE.read_text()) if d is not None]
    assert docs, f"{K8S_FILE} holds no YAML documents"
    assert all(isinstance(d, dict) for d in docs)
    return docs


def _objects(kind: str) -> list[dict[str, Any]]:
    return [d for d in _k8s_docs() if d.get("kind") == kind]


def _one(kind: str) -> dict[str, Any]:
    found = _objects(kind)
    assert len(found) == 1, f"expected exactly one {kind}, found {len(found)}"
    return found[0]


def _named(kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in _objects(kind) if d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind} {name!r} is referenced but not defined exactly once"
    return matches[0]


def _containers() -> list[dict[str, Any]]:
    containers = _one("Deployment")["spec"]["template"]["spec"]["containers"]
    assert containers
    return list(containers)


def _pgproxy_container() -> dict[str, Any]:
    matches = [c for c in _containers() if c["name"] == "pgproxy"]
    assert len(matches) == 1
    return matches[0]


def _secret_keys(secret: dict[str, Any]) -> set[str]:
    return set(secret.get("data") or {}) | set(secret.get("stringData") or {})


def _resolve_container_port(port: int | str, container: dict[str, Any]) -> int:
    """A probe or Service targetPort (number or name) as the container port number it points at."""
    ports = container.get("ports") or []
    if isinstance(port, str):
        matches = [p["containerPort"] for p in ports if p.get("name") == port]
        assert matches, f"port name {port!r} is not a port of container {container['name']}"
        return int(matches[0])
    assert port in [p["containerPort"] for p in ports], f"port {port} is not exposed by {container['name']}"
    return port


def _k8s_config_text() -> str:
    data = _named("ConfigMap", "pgproxy-config")["data"]
    assert isinstance(data.get("pgproxy.yaml"), str)
    return str(data["pgproxy.yaml"])


def _walk_paths(node: Any) -> Iterator[tuple[dict[str, Any], str]]:
    """(mapping, key) for every path-valued setting anywhere in a loaded config."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in PATH_KEYS and isinstance(value, str):
                yield node, key
            else:
                yield from _walk_paths(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk_paths(item)


def _config_paths(data: Any) -> dict[str, str]:
    """{setting name: absolute path} for every path setting in a loaded config."""
    found: dict[str, str] = {}
    for mapping, key in _walk_paths(data):
        value = mapping[key]
        assert PurePosixPath(value).is_absolute(), f"{key}: {value} should be an absolute container path"
        found.setdefault(key, value)
    return found


def _rebase(data: Any, root: Path) -> Any:
    """A copy of a loaded config whose absolute paths live under ``root``; required files are created
    empty (``_materialise`` fills the ones that must hold real keys and certificates)."""
    data = copy.deepcopy(data)
    for mapping, key in _walk_paths(data):
        target = root / PurePosixPath(mapping[key]).relative_to("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if PATH_KEYS[key]:
            target.touch()
        mapping[key] = str(target)
    return data


def _materialise(config: ProxyConfig, tmp_path: Path) -> None:
    """Put a real certificate/key, CA and JWKS at the paths a parsed config names."""
    tls = generate_dev_ca_and_cert(tmp_path / "generated-tls")
    for listener in config.listeners:
        if listener.tls is not None:
            listener.tls.cert_file.write_bytes(tls.cert_file.read_bytes())
            listener.tls.key_file.write_bytes(tls.key_file.read_bytes())
    if config.upstream.sslrootcert is not None:
        config.upstream.sslrootcert.write_bytes(tls.ca_file.read_bytes())
    if config.identity.jwks_file is not None:
        keys = generate_dev_keys(tmp_path / "generated-keys")
        config.identity.jwks_file.write_bytes(keys.jwks_file.read_bytes())


def _check_config_text(text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ProxyConfig:
    """Parse a deployment's pgproxy config as the proxy would, then run ``pgproxy check`` on it."""
    data = yaml.safe_load(text)
    assert isinstance(data, dict)
    # Unchanged, the only possible complaint is a file that does not exist on this machine.
    try:
        parse_config(data, tmp_path)
    except ConfigError as exc:
        assert "file not found" in str(exc), str(exc)
    rebased = _rebase(data, tmp_path / "root")
    config = parse_config(rebased, tmp_path)
    _materialise(config, tmp_path)
    for listener in config.listeners:
        assert listener.tls is not None and not listener.insecure_plaintext, "deployments must use TLS"
    for cred in config.upstream.credentials:
        if cred.password_env is not None:
            monkeypatch.setenv(cred.password_env, UPSTREAM_PASSWORD)
    config_file = tmp_path / "pgproxy.yaml"
    config_file.write_text(yaml.safe_dump(rebased))
    result = CliRunner().invoke(main, ["check", "-c", str(config_file)])
    assert result.exit_code == 0, result.output
    assert result.output.strip().endswith(": OK")
    return config


def _compose() -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(COMPOSE_FILE.read_text()) if d is not None]
    assert len(docs) == 1 and isinstance(docs[0], dict)
    return docs[0]


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of each volume entry in short or long syntax."""
    mounts = []
    for entry in service.get("volumes") or []:
        if isinstance(entry, str):
            parts = entry.split(":")
            assert len(parts) in (2, 3), f"unexpected volume entry {entry!r}"
            mounts.append((parts[0], parts[1]))
        else:
            mounts.append((str(entry.get("source", "")), str(entry["target"])))
    return mounts


def _is_bind(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or source in (".", "..")


def _under(path: str, directory: str) -> bool:
    return PurePosixPath(path).is_relative_to(PurePosixPath(directory))


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


# --------------------------------------------------------------------------------------------------
# Kubernetes


def test_k8s_objects_are_complete_and_unique() -> None:
    docs = _k8s_docs()
    seen = set()
    for doc in docs:
        assert isinstance(doc.get("apiVersion"), str) and doc["apiVersion"]
        assert isinstance(doc.get("kind"), str) and doc["kind"]
        name = (doc.get("metadata") or {}).get("name")
        assert isinstance(name, str) and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name), name
        key = (doc["kind"], doc["metadata"].get("namespace"), name)
        assert key not in seen, f"duplicate object {key}"
        seen.add(key)
    kinds = {d["kind"] for d in docs}
    assert {"ConfigMap", "Secret", "Deployment", "Service"} <= kinds


def test_k8s_namespaced_objects_use_the_declared_namespace() -> None:
    namespaces = {d["metadata"]["name"] for d in _objects("Namespace")}
    for doc in _k8s_docs():
        if doc["kind"] in NAMESPACED_KINDS:
            ns = doc["metadata"].get("namespace")
            assert ns is not None, f"{doc['kind']} {doc['metadata']['name']} has no namespace"
            if namespaces:
                assert ns in namespaces


def test_k8s_api_versions() -> None:
    expected = {"Namespace": "v1", "ConfigMap": "v1", "Secret": "v1", "Service": "v1",
                "Deployment": "apps/v1"}
    for doc in _k8s_docs():
        assert doc["apiVersion"] == expected[doc["kind"]], doc["kind"]


def test_deployment_selector_matches_template_labels() -> None:
    spec = _one("Deployment")["spec"]
    assert spec["replicas"] == 2
    selector = spec["selector"]["matchLabels"]
    labels = spec["template"]["metadata"]["labels"]
    assert selector
    assert selector.items() <= labels.items()


def test_service_selects_the_pods_and_targets_the_container_port() -> None:
    service = _one("Service")
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    labels = _one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"]
    assert service["spec"]["selector"].items() <= labels.items()
    ports = service["spec"]["ports"]
    assert [p["port"] for p in ports] == [5432]
    assert _resolve_container_port(ports[0]["targetPort"], _pgproxy_container()) == 6432
    assert service["metadata"]["namespace"] == _one("Deployment")["metadata"]["namespace"]


def test_container_ports_match_the_configured_listener(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    config = _check_config_text(_k8s_config_text(), tmp_path, monkeypatch)
    container_ports = {p["containerPort"] for p in _pgproxy_container()["ports"]}
    assert {listener.port for listener in config.listeners} == container_ports
    assert all(listener.host == "0.0.0.0" for listener in config.listeners)


def test_probes_are_tcp_checks_of_the_listener() -> None:
    container = _pgproxy_container()
    for probe in ("readinessProbe", "livenessProbe"):
        tcp = container[probe]["tcpSocket"]
        assert _resolve_container_port(tcp["port"], container) == 6432


def test_pod_runs_unprivileged_with_resources() -> None:
    pod = _one("Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    for container in pod["containers"]:
        ctx = container["securityContext"]
        assert ctx["allowPrivilegeEscalation"] is False
        assert "ALL" in ctx["capabilities"]["drop"]
        assert container["resources"]["requests"]["cpu"]
        assert container["resources"]["requests"]["memory"]
        assert container["resources"]["limits"]["memory"]


def test_volume_mounts_reference_defined_volumes() -> None:
    pod = _one("Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert len(volumes) == len(pod["volumes"]), "duplicate volume names"
    mounted = set()
    for container in pod["containers"]:
        paths = [m["mountPath"] for m in container["volumeMounts"]]
        assert len(paths) == len(set(paths))
        for mount in container["volumeMounts"]:
            assert mount["name"] in volumes, f"volumeMount {mount['name']!r} has no volume"
            mounted.add(mount["name"])
    assert mounted == set(volumes), f"unused volumes: {set(volumes) - mounted}"
    assert "emptyDir" in volumes["audit"] or "persistentVolumeClaim" in volumes["audit"]


def test_volumes_reference_existing_configmaps_and_secret_keys() -> None:
    for volume in _one("Deployment")["spec"]["template"]["spec"]["volumes"]:
        if "configMap" in volume:
            cm = _named("ConfigMap", volume["configMap"]["name"])
            for item in volume["configMap"].get("items", []):
                assert item["key"] in cm["data"], f"ConfigMap key {item['key']!r} missing"
        if "secret" in volume:
            secret = _named("Secret", volume["secret"]["secretName"])
            for item in volume["secret"].get("items", []):
                assert item["key"] in _secret_keys(secret), f"Secret key {item['key']!r} missing"


def test_env_secret_refs_exist() -> None:
    refs = 0
    for container in _containers():
        for var in container.get("env", []):
            source = var.get("valueFrom") or {}
            if "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                assert ref["key"] in _secret_keys(_named("Secret", ref["name"])), ref
                refs += 1
            if "configMapKeyRef" in source:
                ref = source["configMapKeyRef"]
                assert ref["key"] in _named("ConfigMap", ref["name"])["data"], ref
    assert refs >= 1


def test_k8s_config_parses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = _check_config_text(_k8s_config_text(), tmp_path, monkeypatch)
    env = {var["name"] for var in _pgproxy_container().get("env", [])}
    for cred in config.upstream.credentials:
        assert cred.password_env is None or cred.password_env in env, cred.password_env
    assert config.audit.jsonl_path is not None


def test_k8s_command_points_at_the_mounted_config() -> None:
    container = _pgproxy_container()
    args = container["args"]
    assert args[:2] == ["serve", "-c"]
    config_path = PurePosixPath(args[2])
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volume = {v["name"]: v for v in _one("Deployment")["spec"]["template"]["spec"]["volumes"]}
    owners = [name for name, path in mounts.items() if config_path.parent == PurePosixPath(path)]
    assert len(owners) == 1, f"{config_path} is not in a mounted directory"
    cm_volume = volume[owners[0]]["configMap"]
    projected = {item["path"]: item["key"] for item in cm_volume.get("items", [])} or {
        k: k for k in _named("ConfigMap", cm_volume["name"])["data"]}
    assert projected.get(config_path.name) == "pgproxy.yaml"


def test_k8s_config_files_are_mounted_from_the_secret() -> None:
    """Every file the config names is projected into the container by some volume."""
    container = _pgproxy_container()
    pod = _one("Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = [(m["mountPath"], volumes[m["name"]], m.get("readOnly", False))
              for m in container["volumeMounts"]]
    paths = _config_paths(yaml.safe_load(_k8s_config_text()))
    assert {"cert_file", "key_file", "jsonl_path"} <= set(paths)
    for key, value in paths.items():
        path = PurePosixPath(value)
        owners = [(mp, vol, ro) for mp, vol, ro in mounts if path.is_relative_to(PurePosixPath(mp))]
        assert len(owners) == 1, f"{key}: {value} is not under exactly one volumeMount"
        mount_path, vol, read_only = owners[0]
        relative = str(path.relative_to(PurePosixPath(mount_path)))
        if key == "jsonl_path":
            assert ("emptyDir" in vol or "persistentVolumeClaim" in vol) and not read_only
            continue
        assert "secret" in vol, f"{key}: {value} should come from the Secret"
        items = vol["secret"].get("items")
        names = ({i["path"] for i in items} if items
                 else _secret_keys(_named("Secret", vol["secret"]["secretName"])))
        assert relative in names, f"{key}: {relative} is not projected from the Secret"


# --------------------------------------------------------------------------------------------------
# Docker Compose and the image


def test_compose_services_volumes_and_dependencies() -> None:
    compose = _compose()
    services = compose["services"]
    assert {"postgres", "pgproxy"} <= set(services)
    declared_volumes = set(compose.get("volumes") or {})
    used_named = set()
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        for dep in service.get("depends_on") or {}:
            assert dep in services, f"{name} depends on unknown service {dep}"
        for source, target in _mounts(service):
            assert PurePosixPath(target).is_absolute(), target
            if not _is_bind(source):
                assert source in declared_volumes, f"{name}: volume {source!r} not declared"
                used_named.add(source)
    assert used_named == declared_volumes, f"declared but unused volumes: {declared_volumes - used_named}"


def test_compose_postgres_has_healthcheck_and_password_from_env() -> None:
    postgres = _compose()["services"]["postgres"]
    assert str(postgres["image"]).startswith("postgres:15")
    assert re.fullmatch(r"\$\{POSTGRES_PASSWORD[^}]*\}", _env(postgres)["POSTGRES_PASSWORD"])
    test = postgres["healthcheck"]["test"]
    assert "pg_isready" in (test if isinstance(test, str) else " ".join(test))


def test_compose_pgproxy_waits_for_healthy_postgres() -> None:
    pgproxy = _compose()["services"]["pgproxy"]
    assert pgproxy["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_compose_build_uses_the_dockerfile() -> None:
    build = _compose()["services"]["pgproxy"]["build"]
    context = (COMPOSE_FILE.parent / build["context"]).resolve()
    assert context == ROOT
    assert (context / build["dockerfile"]).resolve() == DOCKERFILE
    for copied in ("pyproject.toml", "README.md", "pgproxy"):
        assert (context / copied).exists()


def test_compose_mounts_cover_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pgproxy = _compose()["services"]["pgproxy"]
    mounts = _mounts(pgproxy)
    targets = {target: source for source, target in mounts}
    # The config file mounted where the image's CMD reads it.
    cmd = next(json.loads(rest) for word, rest in _dockerfile_instructions() if word == "CMD")
    config_target = cmd[cmd.index("-c") + 1]
    assert (COMPOSE_FILE.parent / targets[config_target]).resolve() == COMPOSE_CONFIG
    # Every path in the config is under a mounted directory.
    for key, value in _config_paths(yaml.safe_load(COMPOSE_CONFIG.read_text())).items():
        owners = [t for t in targets if t != config_target and _under(value, t)]
        assert owners, f"{key}: {value} is not under any mounted directory"
    # The upstream credential's environment variable is set, the host is the postgres service.
    config = _check_config_text(COMPOSE_CONFIG.read_text(), tmp_path, monkeypatch)
    env = _env(pgproxy)
    for cred in config.upstream.credentials:
        assert cred.password_env is None or cred.password_env in env
    assert config.upstream.host in _compose()["services"]
    assert _env(pgproxy).get("PGPROXY_CONFIG") == config_target


def test_compose_publishes_the_listener_port() -> None:
    config = yaml.safe_load(COMPOSE_CONFIG.read_text())
    listener_ports = {listener.get("port", 6432) for listener in config["listeners"]}
    published = set()
    for entry in _compose()["services"]["pgproxy"]["ports"]:
        container_port = str(entry).rsplit(":", 1)[-1].split("/")[0] if isinstance(entry, (str, int)) \
            else str(entry["target"])
        published.add(int(container_port))
    assert listener_ports == published


def test_compose_config_parses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = _check_config_text(COMPOSE_CONFIG.read_text(), tmp_path, monkeypatch)
    assert [listener.port for listener in config.listeners] == [6432]
    assert config.identity.jwks_file is not None
    assert config.identity.jwks_file.as_posix().endswith("/etc/pgproxy/jwks/jwks.json")


def test_dockerfile_shape() -> None:
    instructions = _dockerfile_instructions()
    words = [w for w, _ in instructions]
    assert instructions[0] == ("FROM", "python:3.11-slim")
    assert any(w == "RUN" and "pip install ." in rest for w, rest in instructions)
    users = [rest for w, rest in instructions if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN"), "USER must follow RUN"
    entrypoint = [json.loads(rest) for w, rest in instructions if w == "ENTRYPOINT"]
    cmd = [json.loads(rest) for w, rest in instructions if w == "CMD"]
    assert entrypoint == [["pgproxy"]]
    assert cmd == [["serve", "-c", "/etc/pgproxy/pgproxy.yaml"]]
    assert ("EXPOSE", "6432") in instructions


def test_k8s_image_user_matches_dockerfile() -> None:
    user = next(rest for w, rest in reversed(_dockerfile_instructions()) if w == "USER")
    uid, _, gid = user.partition(":")
    ctx = _one("Deployment")["spec"]["template"]["spec"]["securityContext"]
    assert str(ctx["runAsUser"]) == uid
    assert not gid or str(ctx["runAsGroup"]) == gid
