"""Helpers for the fleet tests: a `loraplex fleet` subprocess and the environment Ray needs here."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from grpc_harness import wait_for_line

READY = re.compile(r"^loraplex: fleet serving .* on \S*?:(\d+) \(Ray (\S+)\)")
# Ray 2.60 turns token auth on by default; tests run a private local cluster without it. Ray
# starts workers at niceness 15, which starves replicas on a busy 2-core machine.
RAY_TEST_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_worker_niceness": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def fleet_env(**extra: str) -> dict[str, str]:
    return dict(os.environ, **RAY_TEST_ENV, LORAPLEX_KV_CACHE_MEMORY="16MiB", **extra)


class FleetProcess:
    """`loraplex fleet ...` in a subprocess; `port` once the ready line appeared."""

    def __init__(self, args: list[str], env: dict[str, str], ready_timeout_s: float = 420):
        command = [sys.executable, "-m", "loraplex.cli", "fleet", *args]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env=env, start_new_session=True)
        self.lines: list[str] = []
        self.port, self.ray_address = self._wait_ready(ready_timeout_s)

    def _wait_ready(self, timeout_s: float) -> tuple[int, str]:
        match = wait_for_line(self.process, READY, self.lines, timeout_s)
        if match:
            return int(match.group(1)), match.group(2)
        self.kill()
        pytest.fail("no fleet ready line:\n" + "\n".join(self.lines[-60:]))

    def kill(self) -> None:
        """Last resort (the test failed): the whole process group, Ray's local cluster included."""
        if self.process.poll() is None:
            import signal

            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)


def listening_addresses(port: int) -> set[str]:
    """The local addresses (hex, as /proc/net/tcp{,6} write them) with a TCP socket listening on `port`."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                address, hex_port = fields[1].split(":")
                if fields[3] == "0A" and int(hex_port, 16) == port:        # 0A: LISTEN
                    found.add(address)
    return found


LOOPBACK = frozenset({"0100007F", "0000000000000000FFFF00000100007F"})     # 127.0.0.1, ::ffff:127.0.0.1
