"""Helpers of scripts/gpu_check.sh: `prepare` (model + 16 PEFT adapters) and `report`.

    python scripts/gpu_check.py prepare OUT        -> OUT/model (path file), OUT/adapters/bench-00NN
    python scripts/gpu_check.py report OUT         -> OUT/gpu_check.json (the one results file)
"""

from __future__ import annotations

import json
import os
import platform
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NUM_ADAPTERS, RANK = 16, 16


def prepare(out: Path) -> None:
    """The Llama-shaped model (MODEL_DIR, else the default SmolLM2-135M) and 16 adapters."""
    sys.path.insert(0, str(ROOT / "bench"))
    from lora_bench import make_peft_adapters

    from loraplex.server.model.default_model import ensure_default_model

    model = Path(os.environ["MODEL_DIR"]) if os.environ.get("MODEL_DIR") else ensure_default_model()
    (out / "model_dir").write_text(str(model))
    adapters = out / "adapters"
    adapters.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(make_peft_adapters(model, adapters, NUM_ADAPTERS, rank=RANK)):
        path.rename(adapters / f"bench-{i:04d}")
    print(f"model {model}; {NUM_ADAPTERS} rank-{RANK} adapters in {adapters}")


def _junit(path: Path) -> dict:
    if not path.exists():
        return {"ran": False}
    suites = ET.parse(path).getroot()
    suite = suites if suites.tag == "testsuite" else suites.find("testsuite")
    failed = [case.get("name") for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return {"ran": True, **{k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")},
            "failed": failed}


def _json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def _tail(path: Path, lines: int = 40) -> list[str]:
    return path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else []


def report(out: Path) -> None:
    parts = out / "parts"
    result = {
        "host": platform.node(), "python": platform.python_version(),
        "env": _json(parts / "env.json"),
        "steps": {p.stem.removeprefix("step-"): p.read_text().strip() for p in sorted(parts.glob("step-*"))},
        "tests_gpu": _junit(parts / "tests-gpu.xml"),
        "serve": {"model": (out / "model_dir").read_text().strip() if (out / "model_dir").exists() else None,
                  "quantize": "bnb-nf4", "adapters": NUM_ADAPTERS, "log_tail": _tail(parts / "serve.log")},
        "bench_16_adapters": _json(parts / "bench-adapters.json"),
        "bench_no_adapters": _json(parts / "bench-base.json"),
    }
    target = out / "gpu_check.json"
    target.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {target}")


if __name__ == "__main__":
    command, out_dir = sys.argv[1], Path(sys.argv[2])
    {"prepare": prepare, "report": report}[command](out_dir)
