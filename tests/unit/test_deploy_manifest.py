"""deploy/rayservice.yaml (KubeRay) agrees with the code (image, ports, env names, Serve config),
validates against a RayService schema, Ray Serve's own config schema and the Kubernetes
"restricted" pod-security rules; the Dockerfile runs as a numeric non-root user and its
HEALTHCHECK follows the server's own port and TLS settings."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

import loraplex
from loraplex.server.config import FLAGS, ServerConfig
from loraplex.server.fleet.app import DEPLOYMENT_NAME, FRONT_NAME
from loraplex.server.fleet.config import FLEET_FLAGS

ROOT = Path(__file__).resolve().parents[2]
MANIFEST, SERVICE, POLICY = yaml.safe_load_all((ROOT / "deploy" / "rayservice.yaml").read_text())
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
    assert SERVE["proxy_location"] == "Disabled"            # the front end listens, not Ray's proxies
    (app,) = SERVE["applications"]
    module, _, attribute = app["import_path"].partition(":")
    entry = __import__(module, fromlist=[attribute])
    assert callable(getattr(entry, attribute))
    assert [d["name"] for d in app["deployments"]] == [DEPLOYMENT_NAME, FRONT_NAME]
    flag_names = {flag.flag.removeprefix("--") for flag in FLAGS + FLEET_FLAGS}
    assert set(app.get("args", {})) <= flag_names


def test_ports_are_the_code_defaults():
    defaults = ServerConfig()
    head = _containers()[0]
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert ports["grpc"] == defaults.port == int(_env(head)["LORAPLEX_PORT"]["value"])
    assert ports["http"] == defaults.http_port == int(_env(head)["LORAPLEX_HTTP_PORT"]["value"])
    worker_ports = {p["name"]: p["containerPort"] for c in _containers()[1:] for p in c["ports"]}
    assert worker_ports["metrics"] == defaults.metrics_port
    for container in _containers():
        assert int(_env(container)["LORAPLEX_METRICS_PORT"]["value"]) == defaults.metrics_port


def test_env_holds_only_settings_the_code_reads():
    known = {flag.env_name for flag in FLAGS + FLEET_FLAGS}
    for container in _containers():
        env = _env(container)
        assert set(env) <= known | {name for name in env if name.startswith(("AWS_", "RAY_AUTH_"))}, \
            set(env) - known
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


def test_ray_token_auth_is_on_with_the_token_from_a_secret():
    """Issue 37 item 2: Ray 2.60 pods without a token run Ray unauthenticated (job API = code)."""
    for container in _containers():
        env = _env(container)
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert "value" not in env["RAY_AUTH_TOKEN"] and not ref.get("optional", False)


def test_schemas_rayservice_service_and_serve_config():
    import jsonschema
    ServeDeploySchema = pytest.importorskip("ray.serve.schema").ServeDeploySchema

    from rayservice_schema import NETWORK_POLICY_SCHEMA, RAYSERVICE_SCHEMA, SERVICE_SCHEMA

    jsonschema.validate(MANIFEST, RAYSERVICE_SCHEMA)
    jsonschema.validate(SERVICE, SERVICE_SCHEMA)
    jsonschema.validate(POLICY, NETWORK_POLICY_SCHEMA)
    ServeDeploySchema.model_validate(SERVE)                    # Ray Serve's own schema for serveConfigV2
    broken = yaml.safe_load(yaml.safe_dump(MANIFEST))
    broken["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 4      # a typo fails
    try:
        jsonschema.validate(broken, RAYSERVICE_SCHEMA)
    except jsonschema.ValidationError:
        pass
    else:
        raise AssertionError("the schema accepted an unknown field")


def test_rayservice_validates_against_kuberays_published_crd():
    """The pinned v1.7.0 CRD (tests/fixtures/kuberay), strictly: unknown fields are errors."""
    import jsonschema

    from kuberay_crd import cel_paths, load_crd, strict, values_at, version_schema

    crd = load_crd()
    assert crd["spec"]["names"]["kind"] == MANIFEST["kind"] == "RayService"
    assert MANIFEST["apiVersion"] == f"{crd['spec']['group']}/v1"
    schema = version_schema(crd)
    validator = jsonschema.Draft7Validator(strict(schema))
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(MANIFEST)]
    assert not errors, errors
    # CEL rules are not evaluated here: the manifest must set none of the fields that carry them.
    cel = list(cel_paths(schema))
    assert cel, "the CRD has CEL rules; this check must see them"
    assert not [path for path in cel if values_at(MANIFEST, path)]
    # The validator rejects what kubectl --validate=strict rejects: a typo, wrong types deep in a pod.
    for path, value in ((("spec", "rayClusterConfig", "workerGroupSpecs", 0, "maxReplica"), 4),
                        (("spec", "rayClusterConfig", "enableInTreeAutoscaling"), "yes"),
                        (("spec", "rayClusterConfig", "headGroupSpec", "template", "spec", "containers", 0,
                          "ports", 0, "containerPort"), "eight thousand")):
        broken = yaml.safe_load(yaml.safe_dump(MANIFEST))
        node = broken
        for key in path[:-1]:
            node = node.setdefault(key, {}) if isinstance(key, str) else node[key]
        node[path[-1]] = value
        assert list(validator.iter_errors(broken)), f"the CRD schema accepted {path} = {value!r}"


def test_pods_meet_the_restricted_pod_security_standard():
    from pod_security import restricted_problems

    groups = [CLUSTER["headGroupSpec"]] + CLUSTER["workerGroupSpecs"]
    for group in groups:
        assert restricted_problems(group["template"]["spec"], group.get("groupName", "head")) == []
    assert restricted_problems({"containers": [{"name": "c"}]}, "bare")      # the checker does check
    autoscaler = CLUSTER["autoscalerOptions"]["securityContext"]
    assert restricted_problems({"containers": [{"name": "autoscaler", "securityContext": autoscaler}]}, "a") == []


def test_worker_groups_follow_serve_autoscaling_with_in_tree_autoscaling():
    """Issue 35: one replica per worker pod, so pods scale between the Serve replica bounds."""
    (app,) = SERVE["applications"]
    replica = next(d for d in app["deployments"] if d["name"] == DEPLOYMENT_NAME)
    bounds = replica["autoscaling_config"]
    assert CLUSTER["enableInTreeAutoscaling"] is True
    (workers,) = CLUSTER["workerGroupSpecs"]
    assert (workers["minReplicas"], workers["maxReplicas"]) == (bounds["min_replicas"], bounds["max_replicas"])
    assert workers["minReplicas"] <= workers["replicas"] <= workers["maxReplicas"]
    needs = replica["ray_actor_options"]
    (container,) = workers["template"]["spec"]["containers"]
    requests, limits = container["resources"]["requests"], container["resources"]["limits"]
    assert float(requests["cpu"]) >= needs["num_cpus"] and int(requests["nvidia.com/gpu"]) >= needs["num_gpus"]
    assert float(limits["cpu"]) < 2 * needs["num_cpus"]            # a second replica does not fit a pod
    head = CLUSTER["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"               # replicas never land on the head
    for container in _containers():
        requests, limits = container["resources"]["requests"], container["resources"]["limits"]
        assert set(requests) == set(limits)                        # everything requested is bounded


def test_service_exposes_the_front_ends_grpc_and_http_on_the_head():
    head = CLUSTER["headGroupSpec"]["template"]
    labels = dict(head["metadata"]["labels"], **{"ray.io/node-type": "head"})     # KubeRay adds the last
    assert SERVICE["spec"]["selector"].items() <= labels.items()
    names = {p["name"] for p in head["spec"]["containers"][0]["ports"]}
    assert {p["targetPort"] for p in SERVICE["spec"]["ports"]} == {"grpc", "http"} <= names


def test_dockerfile_runs_as_a_numeric_non_root_user_and_checks_its_own_port():
    dockerfile = (ROOT / "Dockerfile").read_text()
    (user,) = re.findall(r"^USER (\S+)", dockerfile, re.M)
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0 and (not gid or gid.isdigit())
    assert int(uid) == CLUSTER["headGroupSpec"]["template"]["spec"]["securityContext"]["runAsUser"]
    healthcheck = re.search(r"^HEALTHCHECK .*?CMD (\[.*?\])", dockerfile, re.M | re.S).group(1)
    assert "--local" in healthcheck and "50051" not in healthcheck and "--address" not in healthcheck


def test_local_health_address_follows_the_servers_settings():
    from loraplex.client.cli import local_server_address

    assert local_server_address({}) == ("127.0.0.1:50051", "")
    assert local_server_address({"LORAPLEX_HOST": "0.0.0.0", "LORAPLEX_PORT": "7000"}) == ("127.0.0.1:7000", "")
    assert local_server_address({"LORAPLEX_HOST": "::1", "LORAPLEX_PORT": "7000",
                                 "LORAPLEX_TLS_CERT": "/certs/tls.crt"}) == ("[::1]:7000", "/certs/tls.crt")


# Ray's ports on a KubeRay pod (KubeRay's defaults: GCS, dashboard + job API, client server,
# metrics export, dashboard agent); the raylet's, object manager's and workers' are chosen at start.
RAY_PORTS = {6379: "gcs", 8265: "dashboard", 10001: "client", 8080: "metrics export", 52365: "dashboard agent"}


def _admitted(rule: dict, port: int) -> bool:
    ports = rule.get("ports")
    return not ports or any(p.get("port") == port for p in ports)


def _peers(port: int) -> list[list[dict] | None]:
    """The `from` lists of the rules admitting `port` (None: from anywhere)."""
    return [rule.get("from") for rule in POLICY["spec"]["ingress"] if _admitted(rule, port)]


def test_network_policy_admits_ray_ports_only_from_the_fleet_operator_and_prometheus():
    """Issue 37 item 7 on Kubernetes: every pod of the fleet is selected; anyone reaches only the
    front end's gRPC and HTTP; Ray's ports (and the replica metrics) only from named peers."""
    selector = POLICY["spec"]["podSelector"]["matchLabels"]
    for group in [CLUSTER["headGroupSpec"]] + CLUSTER["workerGroupSpecs"]:
        assert selector.items() <= group["template"]["metadata"]["labels"].items()
    assert POLICY["spec"]["policyTypes"] == ["Ingress"]
    head_ports = {p["name"]: p["containerPort"] for p in _containers()[0]["ports"]}
    for public in (head_ports["grpc"], head_ports["http"]):
        assert None in _peers(public), public                                # clients: from anywhere
    everyone = [rule for rule in POLICY["spec"]["ingress"] if rule.get("from") is None]
    assert {p["port"] for rule in everyone for p in rule["ports"]} == {head_ports["grpc"], head_ports["http"]}
    fleet_only = {"podSelector": {"matchLabels": selector}}
    for port in list(RAY_PORTS) + [ServerConfig().metrics_port, 40000]:    # 40000: a port Ray picks at start
        peers = _peers(port)
        assert peers and None not in peers, port
        assert [fleet_only] in peers, port                                  # Ray between the fleet's pods
        for allowed in peers:
            for peer in allowed:
                assert "ipBlock" not in peer and (peer == fleet_only or "namespaceSelector" in peer), (port, peer)
    assert all(_peers(port) == [[fleet_only]] for port in (6379, 10001, 40000))   # GCS, client: fleet only
