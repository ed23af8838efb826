"""deploy/rayservice.yaml (KubeRay) agrees with the code: image, ports, env names, Serve config."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

import loraplex
from loraplex.server.config import FLAGS, ServerConfig
from loraplex.server.fleet.app import DEPLOYMENT_NAME, SERVICER_FUNCTIONS
from loraplex.server.fleet.config import FLEET_FLAGS

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = yaml.safe_load((ROOT / "deploy" / "rayservice.yaml").read_text())
SERVE = yaml.safe_load(MANIFEST["spec"]["serveConfigV2"])
CLUSTER = MANIFEST["spec"]["rayClusterConfig"]


def _containers() -> list[dict]:
    groups = [CLUSTER["headGroupSpec"]] + CLUSTER["workerGroupSpecs"]
    return [c for group in groups for c in group["template"]["spec"]["containers"]]


def _env(container: dict) -> dict[str, dict]:
    return {item["name"]: item for item in container["env"]}


def test_kind_and_image_match_the_package_and_its_ray_pin():
    assert MANIFEST["apiVersion"] == "ray.io/v1" and MANIFEST["kind"] == "RayService"
    for container in _containers():
        assert container["image"] == f"ghcr.io/loraplex/loraplex:{loraplex.__version__}"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'"ray[serve]=={CLUSTER["rayVersion"]}"' in pyproject          # head/workers run this Ray
    dockerfile = (ROOT / "Dockerfile").read_text()
    extras = re.search(r'pip install [^\n]*"\.\[([^\]]+)\]"', dockerfile).group(1)
    if extras == "${EXTRAS}":                                               # the build argument's default
        extras = re.search(r"^ARG EXTRAS=(\S+)", dockerfile, re.M).group(1)
    install = extras.split(",")
    assert "fleet" in install and "server" in install                      # the image has Ray Serve


def test_serve_config_names_the_code():
    assert SERVE["grpc_options"]["grpc_servicer_functions"] == list(SERVICER_FUNCTIONS)
    (app,) = SERVE["applications"]
    module, _, attribute = app["import_path"].partition(":")
    entry = __import__(module, fromlist=[attribute])
    assert callable(getattr(entry, attribute))
    assert [d["name"] for d in app["deployments"]] == [DEPLOYMENT_NAME]
    flag_names = {flag.flag.removeprefix("--") for flag in FLAGS + FLEET_FLAGS}
    assert set(app.get("args", {})) <= flag_names


def test_ports_are_the_code_defaults():
    defaults = ServerConfig()
    assert SERVE["grpc_options"]["port"] == defaults.port
    head = _containers()[0]
    assert {p["name"]: p["containerPort"] for p in head["ports"]}["grpc"] == defaults.port
    worker_ports = {p["name"]: p["containerPort"] for c in _containers()[1:] for p in c["ports"]}
    assert worker_ports["metrics"] == defaults.metrics_port
    for container in _containers():
        assert int(_env(container)["LORAPLEX_METRICS_PORT"]["value"]) == defaults.metrics_port


def test_env_holds_only_settings_the_code_reads():
    known = {flag.env_name for flag in FLAGS + FLEET_FLAGS}
    for container in _containers():
        env = _env(container)
        assert set(env) <= known | {name for name in env if name.startswith("AWS_")}, set(env) - known
        for secret in ("LORAPLEX_API_KEYS", "LORAPLEX_ADMIN_KEYS"):
            assert "valueFrom" in env[secret] and "value" not in env[secret]    # keys only from Secrets


def test_replicas_share_one_store_with_secrets_from_secrets():
    """Every container names the same PostgreSQL registry and S3 blob store (a replica on its own
    disk would not see adapters uploaded through another); the registry URL (it holds a
    password) and the AWS keys come only from Secrets; every value parses as the code parses it."""
    from loraplex.server.config import ServerConfig, load_server_config

    for container in _containers():
        env = _env(container)
        for secret in ("LORAPLEX_STORE_REGISTRY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert "valueFrom" in env[secret] and "value" not in env[secret], secret
        assert env["LORAPLEX_STORE_BLOBS"]["value"].startswith("s3://")
        plain = {name: item["value"] for name, item in env.items() if "value" in item}
        plain["LORAPLEX_STORE_REGISTRY"] = "postgresql://loraplex:secret@postgres:5432/loraplex"
        config = load_server_config({}, plain)
        assert isinstance(config, ServerConfig)
        assert config.store_blobs == env["LORAPLEX_STORE_BLOBS"]["value"]
        assert config.adapter_sources == (env["LORAPLEX_ADAPTER_SOURCE"]["value"],)
        assert config.blob_cache_bytes == 8 * 2**30
