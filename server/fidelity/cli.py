"""`loraplex eval` and `loraplex merge`: fidelity commands (registered by loraplex/cli.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..layers.base import QUANTIZE_CHOICES


def resolve_adapter(ref: str, scorer, store_dir: str):
    """A PEFT directory path, or an adapter id ('name' / 'name@3') in the server's store."""
    from .adapter_dir import load_peft_dir

    if Path(ref).is_dir():
        return load_peft_dir(ref, scorer.base_spec)
    from ...adapters_store.config import StoreConfig
    from ...adapters_store.store import AdapterStore
    from ..model.default_model import cache_root

    root = Path(store_dir).expanduser() if store_dir else cache_root() / "store"
    if not root.is_dir():
        raise ValueError(f"{ref!r} is not a directory and there is no adapter store at {root}; pass a "
                         "PEFT adapter directory or --store DIR")
    store = AdapterStore(root, StoreConfig(), scorer.base_spec)
    try:
        return store.load(store.resolve(ref, None).key)
    finally:
        store.close()


def _eval_command(args: argparse.Namespace) -> int:
    from ..engine.prompt import load_tokenizer
    from ..model.default_model import resolve_model_path
    from .scoring import Scorer

    model_dir = resolve_model_path(args.model, log=lambda _m: None)
    text = Path(args.text).read_text()
    scorer = Scorer(model_dir, quantize=args.quantize, dtype=args.dtype, device=args.device)
    ids = load_tokenizer(model_dir)(text)["input_ids"]
    if args.adapter:
        scorer.set_adapter(resolve_adapter(args.adapter, scorer, args.store))
    result = scorer.perplexity(ids, window=args.window)
    print(f"adapter={args.adapter or '-'} quantize={args.quantize} tokens={result.num_tokens} "
          f"nll={result.nll:.6f} perplexity={result.perplexity:.4f}")
    return 0


def _merge_command(args: argparse.Namespace) -> int:
    from ..model.default_model import resolve_model_path
    from .merge import merge_adapter

    model_dir = resolve_model_path(args.model, log=lambda _m: None)
    result = merge_adapter(model_dir, args.adapter, args.out, quantize=args.quantize, naive=args.naive)
    how = "naive (merged into quantized weights)" if result.naive else "merged in float"
    print(f"{result.out_dir}: {result.merged_modules} modules {how}; quantize={result.quantize}")
    return 0


def _guarded(command):
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except (OSError, ValueError) as error:
            print(f"loraplex {args.command}: error: {error}", file=sys.stderr)
            return 1
    return run


def register(sub) -> None:
    """Add the `eval` and `merge` subcommands."""
    ev = sub.add_parser("eval", help="teacher-forced perplexity of base+adapter on a text file")
    ev.add_argument("--adapter", default="", help="PEFT adapter directory or store id (name[@version])")
    ev.add_argument("--text", required=True, help="UTF-8 text file to score")
    ev.add_argument("--model", default="default", help="model directory or 'default'")
    ev.add_argument("--quantize", default="none", choices=QUANTIZE_CHOICES)
    ev.add_argument("--dtype", default="float32", choices=("auto", "float32", "bfloat16", "float16"))
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--store", default="", help="adapter store directory (default <cache>/store)")
    ev.add_argument("--window", type=int, default=1024, help="tokens per scored window")
    ev.set_defaults(func=_guarded(_eval_command))

    merge = sub.add_parser("merge", help="export base+adapter as one merged model")
    merge.add_argument("adapter", help="PEFT adapter directory")
    merge.add_argument("--out", required=True, help="output model directory")
    merge.add_argument("--model", default="default", help="base model directory or 'default'")
    merge.add_argument("--quantize", default="none", choices=QUANTIZE_CHOICES,
                       help="backend the merged model is served with (recorded; quantized at load)")
    merge.add_argument("--naive", action="store_true",
                       help="lossy comparison path: merge into the quantized weights, save dequantized")
    merge.set_defaults(func=_guarded(_merge_command))
