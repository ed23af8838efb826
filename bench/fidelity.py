"""`make fidelity`: how well each serving choice preserves a trained adapter (one table).

Trains (or reuses, cached by the training script's hash) the demo adapter, merges it into the
float32 base as the reference, then for every backend measures the unmerged adapter, plus the
naive merge into nf4 and merge-then-quantize (nf4): perplexity on held-out demo-format text,
greedy agreement with the reference, resident bytes; and the unmerged adapter stored in
bfloat16 / float16 slots (`--adapter-dtype`) on the float32 base. Writes the table into docs/fidelity.md
between the RESULTS markers and prints it.

Then the adapter kinds (`--kinds` runs only these): the demo adapter trained as DoRA, and trained
with modules_to_save embed_tokens + lm_head, each served unmerged on the float32 and bnb-nf4
bases; greedy agreement is against PEFT itself (the PeftModel, float32, unmerged), the
perplexity is loraplex's. Written between the KINDS markers. `--kinds modules_to_save` (names
by prefix) measures only the kinds named and keeps the other kinds' rows already in the table.
"""

from __future__ import annotations

import hashlib
import importlib.util
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train_demo_adapter.py"
DOC = ROOT / "docs" / "fidelity.md"
BEGIN, END = "<!-- RESULTS BEGIN -->", "<!-- RESULTS END -->"
KINDS_BEGIN, KINDS_END = "<!-- KINDS BEGIN -->", "<!-- KINDS END -->"
KINDS = {"DoRA": dict(use_dora=True), "modules_to_save embed_tokens+lm_head": dict(modules_to_save=("embed_tokens",
                                                                                                "lm_head"))}
BACKENDS = ["none", "bnb-nf4", "bnb-fp4", "bnb-int8", "hqq-2bit", "hqq-3bit", "hqq-4bit", "hqq-8bit", "eetq"]
TRAIN_STEPS, NUM_TEXT_EXAMPLES, NUM_PROMPTS, NEW_TOKENS = 40, 24, 4, 8


def _train_script():
    spec = importlib.util.spec_from_file_location("train_demo_adapter", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def demo_adapter(model_dir: Path, cache: Path, **kind) -> Path:
    """The demo adapter (of a kind: TrainConfig fields), trained once per version of the script."""
    digest = hashlib.sha256(SCRIPT.read_bytes() + str(TRAIN_STEPS).encode() + repr(sorted(kind.items())).encode()
                            ).hexdigest()[:12]
    out = cache / f"demo-adapter-{digest}"
    if not (out / "adapter_model.safetensors").is_file():
        script = _train_script()
        script.train(model_dir, out, script.TrainConfig(steps=TRAIN_STEPS, **kind), log=print)
    return out


def peft_greedy(model_dir: Path, adapter_dir: Path, prompts: list[list[int]]) -> list[list[int]]:
    """PEFT's own greedy tokens (float32, unmerged): the reference of the adapter-kind rows."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                      adapter_dir).eval()
    model.generation_config.eos_token_id = None
    out = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            tokens = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=NEW_TOKENS, pad_token_id=0)
            out.append(tokens[0, len(prompt):].tolist())
    return out


def kinds_asked(argv: list[str]) -> list[str]:
    """The KINDS to measure: every one, or those named after --kinds (by prefix)."""
    words = argv[argv.index("--kinds") + 1:] if "--kinds" in argv else []
    chosen = [kind for kind in KINDS if not words or any(kind.startswith(word) for word in words)]
    if not chosen:
        raise SystemExit(f"--kinds {' '.join(words)}: name some of {', '.join(KINDS)}")
    return chosen


def kinds_table(rows: list, measured: list[str]) -> str:
    """The KINDS table: this run's rows for the kinds measured, the doc's current rows for the rest."""
    from loraplex.server.fidelity.compare import markdown_table

    current = DOC.read_text().split(KINDS_BEGIN, 1)[-1].split(KINDS_END, 1)[0] if DOC.is_file() else ""
    old = [line for line in current.splitlines() if line.startswith("| ")][1:]        # header dropped
    lines = markdown_table([]).splitlines()
    new = markdown_table(rows).splitlines()[2:]
    for kind in KINDS:
        source = new if kind in measured else old
        lines += [line for line in source if line.startswith(f"| {kind}")]
    return "\n".join(lines)


def kind_rows(model_dir: Path, text_ids: list[int], prompts: list[list[int]], started: float,
              kinds: list[str]) -> list:
    from loraplex.server.fidelity.adapter_dir import load_peft_dir
    from loraplex.server.fidelity.compare import measure
    from loraplex.server.fidelity.scoring import Scorer
    from loraplex.server.model.default_model import cache_root

    rows = []
    for name, kind in ((name, KINDS[name]) for name in kinds):
        adapter_dir = demo_adapter(model_dir, cache_root() / "fidelity", **kind)
        reference = peft_greedy(model_dir, adapter_dir, prompts)
        for method in ("none", "bnb-nf4"):
            scorer = Scorer(model_dir, quantize=method)
            adapter = load_peft_dir(adapter_dir, scorer.base_spec)
            rows.append(measure(f"{name}, unmerged, {method} (vs PEFT float32)", scorer, adapter, text_ids,
                                prompts, NEW_TOKENS, reference)[0])
            print(f"[fidelity] {rows[-1]} ({time.monotonic() - started:.0f}s)", flush=True)
    return rows


def eval_data(model_dir: Path) -> tuple[list[int], list[list[int]]]:
    """Held-out demo-format chat text (seed 1234) and greedy prompts."""
    from loraplex.server.engine.prompt import load_tokenizer

    script = _train_script()
    tokenizer = load_tokenizer(model_dir)
    rng = random.Random(1234)
    text_ids: list[int] = []
    for _ in range(NUM_TEXT_EXAMPLES):
        text_ids += script.encode(tokenizer, *script.make_example(rng))[0]
    prompts = []
    for _ in range(NUM_PROMPTS):
        ids, labels = script.encode(tokenizer, *script.make_example(rng))
        prompts.append(ids[: labels.index(next(l for l in labels if l != -100))])
    return text_ids, prompts


def main() -> int:
    from loraplex.server.fidelity.adapter_dir import load_peft_dir
    from loraplex.server.fidelity.compare import markdown_table, measure
    from loraplex.server.fidelity.merge import merge_adapter
    from loraplex.server.fidelity.scoring import Scorer
    from loraplex.server.model.default_model import cache_root, ensure_default_model

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    started = time.monotonic()
    model_dir = ensure_default_model(log=print)
    text_ids, prompts = eval_data(model_dir)
    measured = kinds_asked(sys.argv[1:])
    table = kinds_table(kind_rows(model_dir, text_ids, prompts, started, measured), measured)
    kept = "" if len(measured) == len(KINDS) else f" (rows measured: {', '.join(measured)}; the others kept)"
    _write_doc(table + "\n" + _footer(text_ids, started).rstrip("\n") + kept + "\n", KINDS_BEGIN, KINDS_END)
    print(table)
    if "--kinds" in sys.argv[1:]:
        return 0
    adapter_dir = demo_adapter(model_dir, cache_root() / "fidelity")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        merged = merge_adapter(model_dir, adapter_dir, Path(tmp) / "merged").out_dir
        naive = merge_adapter(model_dir, adapter_dir, Path(tmp) / "naive", quantize="bnb-nf4", naive=True).out_dir
        ref_row, reference = measure("float32 merged (reference)", Scorer(merged), None, text_ids, prompts,
                                     NEW_TOKENS, None)
        rows.append(ref_row)
        for method in BACKENDS:
            scorer = Scorer(model_dir, quantize=method)
            adapter = load_peft_dir(adapter_dir, scorer.base_spec)
            rows.append(measure(f"unmerged, {method}", scorer, adapter, text_ids, prompts, NEW_TOKENS, reference)[0])
            print(f"[fidelity] {rows[-1]} ({time.monotonic() - started:.0f}s)", flush=True)
        for adapter_dtype in ("bfloat16", "float16"):     # --adapter-dtype: half-precision slots
            scorer = Scorer(model_dir, adapter_dtype=adapter_dtype)
            # factors in the slots' dtype, so the row's resident bytes count them as served
            adapter = load_peft_dir(adapter_dir, scorer.base_spec, dtype=getattr(torch, adapter_dtype))
            rows.append(measure(f"unmerged, none, {adapter_dtype} adapter", scorer, adapter, text_ids,
                                prompts, NEW_TOKENS, reference)[0])
        rows.append(measure("naive merge into bnb-nf4", Scorer(naive), None, text_ids, prompts, NEW_TOKENS,
                            reference)[0])
        nf4_naive_bytes = Scorer(model_dir, quantize="bnb-nf4").resident_bytes()
        rows[-1] = type(rows[-1])(rows[-1].name, rows[-1].perplexity, rows[-1].agreement, nf4_naive_bytes)
        rows.append(measure("merge in float, then bnb-nf4", Scorer(merged, quantize="bnb-nf4"), None, text_ids,
                            prompts, NEW_TOKENS, reference)[0])
    base_row = measure("base model, no adapter", Scorer(model_dir), None, text_ids, prompts, NEW_TOKENS, reference)[0]
    rows.append(base_row)
    table = markdown_table(rows)
    footer = _footer(text_ids, started)
    print(table + footer)
    _write_doc(table + "\n" + footer, BEGIN, END)
    return 0


def _footer(text_ids: list[int], started: float) -> str:
    return (f"\nOne run of `make fidelity`: {len(text_ids)} tokens of held-out demo-format text, "
            f"{NUM_PROMPTS} prompts x {NEW_TOKENS} greedy tokens, float32 compute on CPU, "
            f"{time.monotonic() - started:.0f}s.\n")


def _write_doc(block: str, begin: str, end: str) -> None:
    text = DOC.read_text() if DOC.is_file() else f"# Fidelity\n\n{begin}\n{end}\n"
    if begin not in text or end not in text:
        text += f"\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    DOC.write_text(head + begin + "\n" + block + end + rest.split(end, 1)[1])


if __name__ == "__main__":
    sys.exit(main())
