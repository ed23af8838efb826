"""The EngineClient seam: every implementation has every member, with the same signature."""

import inspect

import pytest

from loraplex.server.engine.async_engine import AsyncEngine
from loraplex.server.engine.proc.client import ProcessEngine
from loraplex.server.engine.client import EngineClient


def protocol_members() -> list[str]:
    return [name for name in vars(EngineClient) if not name.startswith("_")] + ["info"]


IMPLEMENTATIONS = [AsyncEngine, ProcessEngine]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS, ids=lambda cls: cls.__name__)
def test_every_implementation_has_every_member(implementation):
    for name in protocol_members():
        if name == "info":
            assert "self.info" in inspect.getsource(implementation.__init__)
            continue
        assert hasattr(implementation, name), f"{implementation.__name__} lacks EngineClient.{name}"
        wanted = inspect.signature(getattr(EngineClient, name))
        got = inspect.signature(getattr(implementation, name))
        assert list(wanted.parameters) == list(got.parameters), name
        assert inspect.iscoroutinefunction(getattr(EngineClient, name)) == \
            inspect.iscoroutinefunction(getattr(implementation, name)), name
        assert inspect.isasyncgenfunction(getattr(AsyncEngine, name)) == \
            inspect.isasyncgenfunction(getattr(implementation, name)), name      # generate: both


def test_front_ends_use_only_the_seam():
    """No front end reaches through the client into the engine object or its thread."""
    import pathlib
    root = pathlib.Path(__file__).resolve().parents[2] / "server"
    for folder in ("http", "service", "fleet"):
        for path in (root / folder).glob("*.py"):
            text = path.read_text()
            assert "engine.engine." not in text, path
            assert "run_on_engine" not in text, path
