"""Run the "Use it from Python" and "Use it from the shell" examples against a real server.

Python: the ```python blocks of the section run in order in one namespace; a ```text block right
after a python block is the output it must print. Shell: in ```console blocks, `$ cmd` lines are
run with bash and the lines after them are the expected stdout+stderr; `# exit N` at the end of a
command names a non-zero exit code. Matching is doctest's, with ELLIPSIS and NORMALIZE_WHITESPACE.
The documented address 127.0.0.1:50051 is replaced by the test server's.
"""

from __future__ import annotations

import contextlib
import doctest
import io
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from grpc_harness import LoopThread, make_peft_adapter, start_full_server
from loraplex.server.app import drain_and_stop
from loraplex.server.config import load_server_config

DOCS_PATH = Path(__file__).resolve().parents[2] / "README.md"
PYTHON_HEADING, SHELL_HEADING = "Use it from Python", "Use it from the shell"
DOC_ADDRESS = "127.0.0.1:50051"
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```\s*$", re.MULTILINE | re.DOTALL)
_EXIT = re.compile(r"\s+#\s*exit\s+(\d+)\s*$")
_CHECKER = doctest.OutputChecker()
_FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


@dataclass
class Example:
    source: str
    want: str | None          # None: only the exit status is checked
    exit_code: int = 0


def section(markdown: str, heading: str) -> str:
    """The text under `## heading` (any level) up to the next heading of the same or higher level."""
    match = re.search(rf"^(#+) {re.escape(heading)}\s*$", markdown, re.MULTILINE)
    assert match, f"{DOCS_PATH} has no section {heading!r}"
    level = len(match.group(1))
    end = re.compile(rf"^#{{1,{level}}} ", re.MULTILINE).search(markdown, match.end())
    return markdown[match.end(): end.start() if end else len(markdown)]


def python_examples(text: str) -> list[Example]:
    blocks = [(m.group(1), m.group(2)) for m in _FENCE.finditer(text)]
    examples = []
    for index, (lang, body) in enumerate(blocks):
        if lang == "python":
            following = blocks[index + 1] if index + 1 < len(blocks) else None
            examples.append(Example(body, following[1] if following and following[0] == "text" else None))
    return examples


def shell_examples(text: str) -> list[Example]:
    examples: list[Example] = []
    for match in _FENCE.finditer(text):
        if match.group(1) not in ("console", "sh", "bash", "shell"):
            continue
        for line in match.group(2).splitlines():
            if line.startswith("$ "):
                command, exit_code = line[2:], 0
                found = _EXIT.search(command)
                if found:
                    command, exit_code = command[:found.start()], int(found.group(1))
                examples.append(Example(command, "", exit_code))
            elif examples:
                examples[-1].want += line + "\n"
    for example in examples:
        example.want = example.want or None
    return examples


def check(example: Example, got: str) -> None:
    if example.want is not None and not _CHECKER.check_output(example.want, got, _FLAGS):
        pytest.fail(f"example:\n{example.source}\nexpected:\n{example.want}\ngot:\n{got}")


@pytest.fixture(scope="module")
def docs_server(tiny_llama_dir, tmp_path_factory):
    loop = LoopThread()
    config = load_server_config({"model": str(tiny_llama_dir), "port": "0", "metrics_port": "0",
                                 "store": str(tmp_path_factory.mktemp("docs-store")), "kv_cache_memory": "16MiB",
                                 "max_total_tokens": "1024", "max_input_tokens": "512"}, {})
    running = loop.run(start_full_server(config))
    yield f"127.0.0.1:{running.port}"
    loop.run(drain_and_stop(running, 1.0, log=lambda _m: None))
    loop.close()


@pytest.fixture(scope="module")
def workdir(tiny_llama_dir, tmp_path_factory):
    """A directory holding ./my-adapter, a PEFT LoRA for the test model (rank 4, q_proj and v_proj)."""
    directory = tmp_path_factory.mktemp("docs-cwd")
    make_peft_adapter(tiny_llama_dir, directory / "my-adapter", seed=7)
    return directory


def test_sections_have_examples():
    markdown = DOCS_PATH.read_text()
    assert len(python_examples(section(markdown, PYTHON_HEADING))) >= 4
    assert len(shell_examples(section(markdown, SHELL_HEADING))) >= 6


def test_python_examples(docs_server, workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    namespace: dict = {"__name__": "__docs__"}
    for example in python_examples(section(DOCS_PATH.read_text(), PYTHON_HEADING)):
        output = io.StringIO()
        with contextlib.redirect_stdout(output):
            exec(compile(example.source.replace(DOC_ADDRESS, docs_server), str(DOCS_PATH), "exec"), namespace)
        check(example, output.getvalue())


def test_shell_examples(docs_server, workdir):
    environ = dict(os.environ, LORAPLEX_ADDRESS=docs_server,
                   PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    environ.pop("LORAPLEX_API_KEY", None)
    for example in shell_examples(section(DOCS_PATH.read_text(), SHELL_HEADING)):
        done = subprocess.run(["bash", "-c", example.source.replace(DOC_ADDRESS, docs_server)], cwd=workdir,
                              env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
        assert done.returncode == example.exit_code, f"$ {example.source}\nexit {done.returncode}:\n{done.stdout}"
        check(example, done.stdout)
