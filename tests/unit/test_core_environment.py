"""The engine core's OpenMP spin setting (server/engine/proc/process.py core_environment):
set for the spawned core only, and never over an operator's own choice."""

from __future__ import annotations

import os

import pytest

from loraplex.server.engine.proc.process import CORE_SPIN_COUNT, core_environment


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY"):
        monkeypatch.delenv(name, raising=False)


def test_spin_count_is_set_while_the_core_starts_and_removed_after(clean_env):
    with core_environment():
        assert os.environ["GOMP_SPINCOUNT"] == CORE_SPIN_COUNT
    assert "GOMP_SPINCOUNT" not in os.environ


@pytest.mark.parametrize("name, value", [("GOMP_SPINCOUNT", "300000"), ("OMP_WAIT_POLICY", "PASSIVE")])
def test_an_operators_choice_is_kept(clean_env, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with core_environment():
        assert os.environ[name] == value
        assert name == "GOMP_SPINCOUNT" or "GOMP_SPINCOUNT" not in os.environ
    assert os.environ[name] == value
