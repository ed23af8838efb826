"""`loraplex demo`: a newcomer's first adapter, end to end.

1. Trains the small demo adapter (demo/train.py: replies start with "ANSWER:") for the default
   model, once, into `$LORAPLEX_CACHE/demo/answer-format` (a few minutes on a CPU).
2. Uses the server at `--address` when one answers there, else starts `loraplex serve` on free
   ports with a throwaway store (and stops it at the end).
3. Uploads the adapter and prints each question with the reply without and with it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

Log = Callable[[str], None]

ADAPTER_ID = "demo-answer-format"
QUESTIONS = ("What is 7 plus 5?", "What is 9 times 3?")
_READY_RE = re.compile(r"^loraplex: serving .* on (\S+):(\d+)")


@dataclass(frozen=True)
class DemoOptions:
    address: str = "127.0.0.1:50051"
    api_key: str | None = None
    start_server: bool = True              # start one when nothing answers at `address`
    adapter_dir: Path | None = None        # default: $LORAPLEX_CACHE/demo/answer-format
    steps: int = 30                        # training steps (batch 8) when the adapter is missing
    questions: tuple[str, ...] = QUESTIONS
    max_new_tokens: int = 24
    server_timeout_s: float = 900.0        # a started server's load and warm-up


@dataclass(frozen=True)
class Exchange:
    question: str
    without_adapter: str
    with_adapter: str


@dataclass
class DemoResult:
    address: str
    adapter_dir: Path
    exchanges: list[Exchange] = field(default_factory=list)


def run_demo(options: DemoOptions, log: Log = print) -> DemoResult:
    """Train (once), serve (or reuse a server), upload, and ask; returns what was asked and answered."""
    from ..model.default_model import cache_root, resolve_model_path

    adapter_dir = options.adapter_dir or cache_root() / "demo" / "answer-format"
    ensure_adapter(adapter_dir, lambda: resolve_model_path("default", log=log), options.steps, log)
    with server_at(options, log) as address:
        return ask(address, adapter_dir, options, log)


def ensure_adapter(adapter_dir: Path, model_dir: Callable[[], Path], steps: int, log: Log) -> Path:
    """Train the demo adapter into adapter_dir unless a complete one is there."""
    from .train import TrainConfig, train

    if (adapter_dir / "adapter_config.json").is_file() and (adapter_dir / "adapter_model.safetensors").is_file():
        log(f"[demo] using the demo adapter in {adapter_dir}")
        return adapter_dir
    log(f"[demo] training the demo adapter ({steps} steps on the default model; a few minutes on a CPU)")
    adapter_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".train-", dir=adapter_dir.parent))
    try:
        train(model_dir(), tmp, TrainConfig(steps=steps), log=lambda line: log(f"[demo]   {line}"))
        shutil.rmtree(adapter_dir, ignore_errors=True)
        tmp.rename(adapter_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"[demo] adapter saved in {adapter_dir}")
    return adapter_dir


class server_at:
    """Context manager: the address of a serving server (an existing one, or one started here)."""

    def __init__(self, options: DemoOptions, log: Log):
        self.options, self.log = options, log
        self.process: subprocess.Popen | None = None
        self.store: str | None = None

    def __enter__(self) -> str:
        if _serving(self.options.address, self.options.api_key):
            self.log(f"[demo] using the server at {self.options.address}")
            return self.options.address
        if not self.options.start_server:
            raise RuntimeError(f"no loraplex server answers at {self.options.address} (start one with "
                               "`loraplex serve`, or drop --no-start)")
        self.store = tempfile.mkdtemp(prefix="loraplex-demo-store-")
        self.log("[demo] no server at " + self.options.address + "; starting `loraplex serve` on free ports")
        command = [sys.executable, "-c", "import sys; from loraplex.cli import main; sys.exit(main())", "serve",
                   "--model", "default", "--port", "0", "--metrics-port", "0", "--http-port", "0",
                   "--store", self.store, "--max-num-seqs", "4", "--max-total-tokens", "1024",
                   "--max-input-tokens", "512"]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        return _wait_ready(self.process, self.options.server_timeout_s, self.log)

    def __exit__(self, *_exc) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.log("[demo] stopped the server it started")
        if self.store:
            shutil.rmtree(self.store, ignore_errors=True)


def _serving(address: str, api_key: str | None, wait_s: float = 600.0) -> bool:
    """True when a server answers at address (waiting while it loads its model); False if none."""
    from ...client import Client
    from ...client.errors import LoraplexError
    from ...client.types import HealthStatus

    deadline = time.monotonic() + wait_s
    with Client(address, api_key, timeout=3) as client:
        while True:
            try:
                status = client.health()
            except LoraplexError:
                return False
            if status == HealthStatus.SERVING or time.monotonic() > deadline:
                return status == HealthStatus.SERVING
            time.sleep(1.0)


def _wait_ready(process: subprocess.Popen, timeout_s: float, log: Log) -> str:
    """Read the server's output until its ready line; return host:port. Keeps draining after."""
    found: list[str] = []
    ready = threading.Event()

    def pump(lines: Iterator[str]) -> None:
        for line in lines:
            match = _READY_RE.match(line)
            if match and not found:
                found.append(f"{match.group(1)}:{match.group(2)}")
                ready.set()
            if not ready.is_set():
                log(f"[server] {line.rstrip()}")
        ready.set()                          # exited

    threading.Thread(target=pump, args=(iter(process.stdout.readline, ""),), daemon=True).start()
    if not ready.wait(timeout_s) or not found:
        process.kill()
        raise RuntimeError("the demo server did not become ready" + (
            f" (exit code {process.wait()})" if process.poll() is not None else f" in {timeout_s:.0f}s"))
    log(f"[demo] server ready at {found[0]}")
    return found[0]


def ask(address: str, adapter_dir: Path, options: DemoOptions, log: Log) -> DemoResult:
    """Upload the adapter (kept when already there) and ask each question without and with it."""
    from ...client import Client
    from ...client.errors import AdapterNotFoundError

    result = DemoResult(address, adapter_dir)
    with Client(address, options.api_key, timeout=300) as client:
        try:
            info = client.get_adapter(ADAPTER_ID)
            log(f"[demo] adapter '{ADAPTER_ID}' is already on the server (version {info.version}); using it")
        except AdapterNotFoundError:
            client.upload_adapter(adapter_dir, ADAPTER_ID)
            log(f"[demo] uploaded {adapter_dir} as adapter '{ADAPTER_ID}'")
        for question in options.questions:
            messages = [("user", question)]
            plain = client.chat(messages, max_new_tokens=options.max_new_tokens, temperature=0.0).text
            tuned = client.chat(messages, ADAPTER_ID, max_new_tokens=options.max_new_tokens,
                                temperature=0.0).text
            result.exchanges.append(Exchange(question, plain.strip(), tuned.strip()))
    for exchange in result.exchanges:
        log(f"\nuser: {exchange.question}\n  without an adapter: {exchange.without_adapter}\n"
            f"  with '{ADAPTER_ID}':    {exchange.with_adapter}")
    log(f"\nThe same from the command line:\n  loraplex generate --address {address} --chat "
        f"--adapter {ADAPTER_ID} {options.questions[0]!r}")
    return result
