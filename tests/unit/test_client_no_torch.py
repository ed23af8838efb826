"""The SDK and the client CLI commands never import torch (`pip install loraplex` has none)."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import sys
{body}
heavy = sorted(m for m in ("torch", "transformers", "numpy", "bitsandbytes") if m in sys.modules)
print("HEAVY", ",".join(heavy))
"""


def _heavy_modules(body: str) -> list[str]:
    result = subprocess.run([sys.executable, "-c", PROBE.format(body=body)], capture_output=True,
                            text=True, timeout=300)
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("HEAVY"))
    return [m for m in line.removeprefix("HEAVY").strip().split(",") if m]


def test_import_client_does_not_import_torch():
    assert _heavy_modules("import loraplex.client\nfrom loraplex.client import Client, AsyncClient") == []


@pytest.mark.parametrize("argv", [
    ["health", "--address", "127.0.0.1:1", "--timeout", "1"],
    ["generate", "hi", "--address", "127.0.0.1:1", "--timeout", "1"],
    ["adapters", "list", "--address", "127.0.0.1:1", "--timeout", "1"],
])
def test_client_commands_do_not_import_torch(argv):
    body = f"from loraplex.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass"
    assert _heavy_modules(body) == []


def test_server_groups_are_registered_for_help():
    from loraplex.cli import build_parser

    help_text = build_parser(["--help"]).format_help()
    for word in ("serve", "health", "generate", "adapters", "model"):
        assert word in help_text


def test_serve_without_server_extra_names_the_install_command(monkeypatch, capsys):
    import importlib.util

    from loraplex import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    assert cli.main(["serve", "--model", "default"]) == 2
    assert 'pip install "loraplex[server]"' in capsys.readouterr().err
