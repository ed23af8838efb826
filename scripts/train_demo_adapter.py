"""Fine-tune a small demo LoRA on the default model, on CPU, in a few minutes (PEFT format).

The training itself lives in the package (loraplex.server.demo.train; `loraplex demo` uses it).

    python scripts/train_demo_adapter.py --out ./demo-adapter [--steps 60] [--model DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from loraplex.server.demo.train import PREFIX, TrainConfig, encode, make_example, train  # noqa: F401  (re-exported)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--model", default="default", help="model directory or 'default'")
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from loraplex.server.model.default_model import resolve_model_path

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    train(resolve_model_path(args.model), args.out, TrainConfig(steps=args.steps, seed=args.seed))
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
