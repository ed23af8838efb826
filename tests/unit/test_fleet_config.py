"""`loraplex fleet` settings, the Ray Serve deployment options they map to, and the proxy hook."""

from __future__ import annotations

import os
import re

import grpc
import pytest

from loraplex.server.config import ConfigError
from loraplex.server.fleet.app import deployment_options
from loraplex.server.fleet.config import FleetOptions, load_fleet_config


def test_flags_env_and_defaults():
    config, options = load_fleet_config({"replicas": "3", "max_loras": "4", "replica_cpus": "0.5"},
                                        {"LORAPLEX_REPLICA_GPUS": "0.25", "LORAPLEX_PORT": "6000"})
    assert (options.replicas, options.replica_cpus, options.replica_gpus) == (3, 0.5, 0.25)
    assert config.port == 6000 and config.max_loras == 4
    assert options.adapters_per_replica(config) == 4            # default: the engine's device slots
    assert options.ongoing_requests(config) == config.max_num_seqs


@pytest.mark.parametrize("values, environ, fragment", [
    ({"min_replicas": "1"}, {}, "both --min-replicas and --max-replicas"),
    ({"min_replicas": "3", "max_replicas": "2"}, {}, "--min-replicas <= --max-replicas"),
    ({"replicas": "0"}, {}, "--replicas must be >= 1"),
    ({"replica_cpus": "-1"}, {}, "--replica-cpus"),
    ({"replicas": "two"}, {}, "--replicas"),
    ({}, {"LORAPLEX_MAX_ONGOING_REQUESTS": "0"}, "--max-ongoing-requests must be >= 1"),
    ({"tls_cert": "c.pem", "tls_key": "k.pem"}, {}, "no TLS"),
    ({"max_loras": "0"}, {}, "max-loras"),                      # serve's own checks still apply
])
def test_bad_settings_are_reported(values, environ, fragment):
    with pytest.raises(ConfigError) as error:
        load_fleet_config(values, environ)
    assert any(fragment in problem for problem in error.value.problems), error.value.problems


def test_deployment_options_fixed_and_autoscaling():
    config, options = load_fleet_config({"replicas": "2", "replica_cpus": "0.5", "grace_period_s": "12"}, {})
    fixed = deployment_options(config, options)
    assert fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": 0.0}
    assert fixed["graceful_shutdown_timeout_s"] == 12
    assert fixed["max_ongoing_requests"] == config.max_num_seqs + config.max_queued_requests   # the engine sheds
    scaled = deployment_options(config, FleetOptions(min_replicas=1, max_replicas=5, target_ongoing_requests=4))
    assert scaled["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 5, "target_ongoing_requests": 4}
    assert "num_replicas" not in scaled


def test_replica_death_is_unavailable_and_other_ray_errors_say_nothing_of_ray(caplog):
    pytest.importorskip("ray.serve")
    from ray.exceptions import ActorDiedError

    from loraplex.server.fleet.front_grpc import REPLICA_DIED_MESSAGE, _remote_error

    died = _remote_error(ActorDiedError())
    assert died.code is grpc.StatusCode.UNAVAILABLE and died.message == REPLICA_DIED_MESSAGE
    other = _remote_error(RuntimeError("actor 0f3a at 10.0.0.7 pid 4242 /venv/lib/ray/serve/_private/replica.py"))
    assert other.code is grpc.StatusCode.INTERNAL
    assert "10.0.0.7" not in other.message and "incident" in other.message       # details only in the log


def test_replica_class_builds_with_the_loader_capacity():
    pytest.importorskip("ray.serve")
    from loraplex.server.fleet.methods import METHODS
    from loraplex.server.fleet.replica import ReplicaBase, replica_class

    cls = replica_class(5)
    assert issubclass(cls, ReplicaBase)
    for method in ("unary", "stream", "http", "warm_adapter", "check_health"):
        assert callable(getattr(cls, method))           # what the front end and Ray call
    from loraplex.v1 import adapters_pb2, generation_pb2, server_pb2
    every = {f"/{service.full_name}/{m.name}" for module in (adapters_pb2, generation_pb2, server_pb2)
             for service in module.DESCRIPTOR.services_by_name.values() for m in service.methods}
    assert set(METHODS) == every                        # every loraplex.v1 RPC is forwarded


def test_routing_ids_are_bounded_digests_of_valid_references_only():
    from loraplex.server.fleet.wire import routing_id

    first, other_tenant = routing_id("tone@2", "team"), routing_id("tone@2", "other")
    assert first and first != other_tenant and len(first) == 25 and "tone" not in first
    assert routing_id("tone@2", "team") == first
    for bad in ("", "x" * 7000, "../etc", "tone@0", "a b"):
        assert routing_id(bad, "team") == ""


def test_ray_token_file_is_made_owner_only(tmp_path, monkeypatch):
    from loraplex.server.fleet.ray_setup import secure_token_file, token_path

    token = tmp_path / "auth_token"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    assert token_path() == token and not secure_token_file()          # none yet: nothing to do
    token.write_text("secret")
    token.chmod(0o644)                                                 # as Ray 2.60 writes it
    assert secure_token_file() and token.stat().st_mode & 0o777 == 0o600
    assert not secure_token_file()


def test_ray_token_is_created_owner_only_before_ray_starts(tmp_path, monkeypatch):
    """Issue 37 item 9: the token a new local cluster uses is 0600 from its first byte."""
    from loraplex.server.fleet.ray_setup import provision_token

    token = tmp_path / "ray" / "auth_token"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert not provision_token() and not token.exists()               # auth off (tests): no token
    monkeypatch.delenv("RAY_AUTH_MODE")                                # Ray 2.60's default: token auth
    old_umask = os.umask(0)                                            # even a permissive umask
    try:
        assert provision_token()
    finally:
        os.umask(old_umask)
    assert token.stat().st_mode & 0o777 == 0o600 and re.fullmatch(r"[0-9a-f]{64}", token.read_text())
    first = token.read_text()
    assert not provision_token() and token.read_text() == first        # an existing token is kept
    token.unlink()
    monkeypatch.setenv("RAY_AUTH_TOKEN", "given")
    assert not provision_token() and not token.exists()                # a token given in the env is used


def test_admission_bounds_the_queue_and_refuses_without_replicas():
    from loraplex.server.fleet.admission import Admission, FleetView
    from loraplex.server.service.errors import ServiceError

    view = FleetView()
    admission = Admission(view, per_replica=2)
    with pytest.raises(ServiceError) as none_running:
        admission.enter()
    assert none_running.value.code is grpc.StatusCode.UNAVAILABLE and none_running.value.retry_after_s
    view.running = 2
    for _ in range(4):
        admission.enter()
    with pytest.raises(ServiceError) as full:
        admission.enter()
    assert full.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED and full.value.retry_after_s == 1.0
    admission.leave()
    admission.enter()                                                  # room again after one left
    view.draining = True
    with pytest.raises(ServiceError) as draining:
        admission.enter()
    assert draining.value.code is grpc.StatusCode.UNAVAILABLE


def test_a_forwarded_call_expires_when_the_callers_deadline_does():
    """Issue 37 item 9: the replica's deadline is the caller's (wall clock), not 'what was left
    when forwarded' counted from the replica's receipt, which outlived the caller's by the transfer."""
    import time

    from loraplex.server.fleet.context import ForwardContext
    from loraplex.server.fleet.wire import ForwardedCall

    def context(deadline):
        return ForwardContext(ForwardedCall("/loraplex.v1.GenerationService/Generate", (), "peer", b"", deadline))

    assert context(time.time() - 0.001).time_remaining() <= 0
    assert 29 < context(time.time() + 30).time_remaining() <= 30
    assert context(None).time_remaining() is None
