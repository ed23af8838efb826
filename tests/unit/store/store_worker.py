"""A second process working on a store, for the crash and concurrency tests.

usage: python store_worker.py ROOT MODE [ARGS]
  upload-loop                 upload forever in tiny slow chunks (killed by the test)
  register-loop ADAPTERS_DIR  register the adapters under ADAPTERS_DIR forever (killed by the test)
  upload-n COUNT NAME...      upload COUNT adapters round-robin over NAMEs, then exit
Prints "ready" once the store is open, then one JSON line per committed adapter.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from loraplex.adapters_store.paths import CONFIG_NAME, WEIGHTS_NAME
from loraplex.adapters_store.upload import UploadMeta
from store_adapters import adapter_bytes, make_store, sha256, upload


def _report(record) -> None:
    print(json.dumps({"key": record.key, "sha256": record.sha256}), flush=True)


def _slow_upload(store, name: str, seed: int):
    config_bytes, weights_bytes = adapter_bytes(rank=8, seed=seed)
    session = store.begin_upload(UploadMeta(name, len(config_bytes), sha256(config_bytes), len(weights_bytes),
                                            sha256(weights_bytes)))
    session.write(CONFIG_NAME, config_bytes)
    for start in range(0, len(weights_bytes), 512):
        session.write(WEIGHTS_NAME, weights_bytes[start:start + 512])
        time.sleep(0.001)
    return session.commit()


def main(root: Path, mode: str, args: list[str]) -> None:
    store = make_store(root, max_lora_rank=64, allowed_register_roots=(str(root.parent / "adapters"),))
    print("ready", flush=True)
    if mode == "upload-loop":
        seed = int(time.time() * 1000) % 100_000
        while True:
            seed += 1
            _report(_slow_upload(store, f"crash-up-{seed % 3}", seed))
    elif mode == "register-loop":
        directories = sorted(Path(args[0]).iterdir())
        count = 0
        while True:
            count += 1
            directory = directories[count % len(directories)]
            _report(store.register_path(f"crash-reg-{directory.name}", directory))
    elif mode == "upload-n":
        count, names = int(args[0]), args[1:]
        for i in range(count):
            _report(upload(store, names[i % len(names)], *adapter_bytes(seed=10_000 + i), chunk_bytes=2048))
        store.close()
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3:])
