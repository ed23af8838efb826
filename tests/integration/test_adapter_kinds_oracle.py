"""Adapter kinds beyond plain LoRA, served unmerged in mixed batches, vs PEFT.

One engine batch holds rows on two DoRA adapters (one on every linear module, one on attention
only), an adapter with LoRA on embed_tokens and lm_head (and q_proj), an adapter with
modules_to_save embed_tokens + lm_head (its own tables, and LoRA on q/v), a plain LoRA and no
adapter, arriving staggered so prefill chunks and decodes mix. PEFT refuses `adapter_names` with
DoRA ("Cannot pass `adapter_names` when DoRA is enabled"), so the reference generates each
adapter's rows in a batch of their own (`set_adapter`) and the base rows with the adapters
disabled. Magnitudes are scaled away from their initial value ||W + s BA|| (at which DoRA equals
plain LoRA) and the saved tables are perturbed, so the test fails if either is not applied.

`none`: float32 greedy token for token, the decode steps with DoRA rows through the fused
native decode stack (asserted: the stack's calls with DoRA rows are counted). `bnb-nf4` (QDoRA): PEFT takes ||W + s BA|| on the
dequantized weight, as loraplex does; the near-tie rule of test_lora_oracle.py judges it.
The default run checks the 2-layer tiny Llama (seconds); the default model's cases are slow
(PEFT recomputes every DoRA norm on every forward) and run with `make test-adapters`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from engine_helpers import make_engine, run_staggered, tokens_of
from loraplex.server.engine.io import GenerationRequest
from loraplex.server.engine.sequence import SamplingParams
from peft_oracle import registered_store
from quant_oracle import load_reference_model

pytestmark = pytest.mark.integration

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {  # name -> LoraConfig arguments
    "dora-all": dict(r=8, lora_alpha=16, use_dora=True, target_modules=ALL),
    "dora-attn": dict(r=16, lora_alpha=8, use_dora=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "plain": dict(r=8, lora_alpha=16, target_modules=ALL),
    "vocab-lora": dict(r=8, lora_alpha=16, target_modules=["embed_tokens", "lm_head", "q_proj"]),
    "saved-tables": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                         modules_to_save=["embed_tokens", "lm_head"]),
}
ROWS = ["dora-all", "plain", None, "vocab-lora", "dora-attn", "saved-tables", "dora-all", "vocab-lora",
        None, "saved-tables"]
PROMPT_LEN, NEW_TOKENS, NEAR_TIE = 16, 10, 0.05


CASES = [("tiny_llama_dir", "none"),
         pytest.param("default_model_dir", "none", marks=pytest.mark.slow),
         pytest.param("default_model_dir", "bnb-nf4", marks=pytest.mark.slow)]


def make_adapter_dirs(model_dir: Path, root: Path) -> dict[str, Path]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    paths = {}
    for i, (name, kwargs) in enumerate(ADAPTERS.items()):
        config = LoraConfig(**kwargs, init_lora_weights=False, task_type="CAUSAL_LM")
        torch.manual_seed(200 + i)
        model = get_peft_model(base, config)
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if "lora_B" in pname:
                    param.mul_(0.2)
                if "lora_embedding_B" in pname:
                    param.mul_(0.01)
                if "lora_magnitude_vector" in pname:
                    param.mul_(torch.rand_like(param) * 0.6 + 0.7)   # m != ||W + s BA||
                if "modules_to_save" in pname:
                    param.add_(torch.randn_like(param) * float(param.std()) * 0.5)
        model.save_pretrained(root / name, save_embedding_layers=False)
        paths[name] = root / name
        base = model.unload()
    return paths


@pytest.fixture(scope="module")
def adapter_dirs(request, tmp_path_factory):
    """model fixture name -> its adapters (made on first use)."""
    made: dict[str, dict[str, Path]] = {}

    def get(model_fixture: str) -> dict[str, Path]:
        if model_fixture not in made:
            made[model_fixture] = make_adapter_dirs(request.getfixturevalue(model_fixture),
                                                    tmp_path_factory.mktemp(f"dora-{model_fixture}"))
        return made[model_fixture]
    return get


@pytest.fixture(scope="module")
def prompts(default_model_dir) -> list[list[int]]:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(default_model_dir)
    text = ("The quick brown fox jumps over the lazy dog while the sun sets behind the hills, and "
            "a small boat drifts slowly across the quiet lake towards the old wooden pier. ") * 2
    ids = tok(text)["input_ids"]
    return [ids[i: i + PROMPT_LEN] for i in range(len(ROWS))]


def peft_reference(model_dir, method, adapter_dirs, prompts):
    """Per row: greedy tokens and raw logits, each adapter's rows generated as one batch by a
    PeftModel holding only that adapter (PEFT cannot hold LoRA on embed_tokens beside another
    adapter's modules_to_save embed_tokens), the base rows by the bare model."""
    from peft import PeftModel

    tokens, logits = [None] * len(ROWS), [None] * len(ROWS)
    for adapter in set(ROWS):
        model = load_reference_model(model_dir, method, compute_dtype=torch.float32)
        if adapter is not None:
            model = PeftModel.from_pretrained(model, adapter_dirs[adapter]).eval()
        model.generation_config.eos_token_id = None
        rows = [i for i, row in enumerate(ROWS) if row == adapter]
        ids = torch.tensor([prompts[i] for i in rows])
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=NEW_TOKENS, pad_token_id=0, output_logits=True,
                                 return_dict_in_generate=True)
        step_logits = torch.stack(out.logits, dim=1)         # [rows, steps, vocab]
        for j, i in enumerate(rows):
            tokens[i] = out.sequences[j, PROMPT_LEN:].tolist()
            logits[i] = step_logits[j]
    return tokens, logits


def count_dora_stack_steps(engine) -> list[int]:
    """Wraps the engine's fused decode stack (if built) to count its calls whose step has DoRA
    rows (the kernel's dora_rows argument, second to last); returns the live counter."""
    counter = [0]
    stack = engine.runner.model.decode_stack
    if stack is not None:
        kernel = stack.kernel
        stack.kernel = lambda *args: (counter.__setitem__(0, counter[0] + (args[-2] is not None))
                                      or kernel(*args))
    return counter


def loraplex_outputs(model_dir, method, adapter_dirs, prompts, tmp_path):
    store = registered_store(model_dir, method, adapter_dirs, tmp_path / f"store-{method}")
    engine = make_engine(model_dir, store=store, quantize=method, max_loras=8, max_num_seqs=16,
                         max_batch_tokens=256)
    dora_stack_steps = count_dora_stack_steps(engine)
    sampling = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    requests = [(i, GenerationRequest(request_id=f"row{i}", prompt_token_ids=tuple(p), adapter_id=row,
                                      sampling=sampling)) for i, (row, p) in enumerate(zip(ROWS, prompts))]
    outputs = run_staggered(engine, requests)
    loaded = {key: store.load(key) for key in (f"{name}@1" for name in adapter_dirs)}
    store.close()
    if method == "none" and (shutil.which("c++") or shutil.which("g++")):
        # float32 with the native kernels built: decode steps with DoRA rows take the one-call stack
        assert engine.runner.model.decode_stack is not None and dora_stack_steps[0] > 0, dora_stack_steps
    return [tokens_of(outputs[f"row{i}"]) for i in range(len(ROWS))], loaded


@pytest.mark.parametrize("model_fixture, method", CASES)
def test_dora_mixed_batch_matches_peft(model_fixture, method, request, adapter_dirs, prompts, tmp_path):
    from loraplex.server.model.config import ModelConfig

    model_dir, dirs = request.getfixturevalue(model_fixture), adapter_dirs(model_fixture)
    ours, loaded = loraplex_outputs(model_dir, method, dirs, prompts, tmp_path)
    num_layers = ModelConfig.from_dir(model_dir).num_layers
    assert len(loaded["dora-all@1"].dora_scales) == num_layers * len(ALL)
    assert not loaded["plain@1"].dora_scales and loaded["plain@1"].vocab is None
    assert loaded["vocab-lora@1"].vocab.embed_lora is not None and loaded["vocab-lora@1"].vocab.lm_head_lora is not None
    assert loaded["saved-tables@1"].vocab.embed_table is not None
    want, logits = peft_reference(model_dir, method, dirs, prompts)
    for i, row in enumerate(ROWS):
        if method == "none":
            assert ours[i] == want[i], f"{row or 'base'}: float32 greedy must agree token for token"
            continue
        diverged = next((p for p, (a, b) in enumerate(zip(ours[i], want[i])) if a != b), None)
        if diverged is None:
            continue
        margin = float(logits[i][diverged, want[i][diverged]] - logits[i][diverged, ours[i][diverged]])
        assert margin < NEAR_TIE, (f"{row or 'base'} ({method}) diverged at token {diverged} where the "
                                   f"reference prefers its token by {margin:.4f} logits")


def test_dora_magnitudes_matter(tiny_llama_dir, adapter_dirs, prompts):
    """Guards the oracle: the DoRA adapter's outputs differ from the same A/B served as plain LoRA."""
    from peft import PeftModel

    model = load_reference_model(tiny_llama_dir, "none", compute_dtype=torch.float32)
    peft = PeftModel.from_pretrained(model, adapter_dirs("tiny_llama_dir")["dora-all"], adapter_name="d")
    ids = torch.tensor([prompts[0]])
    with torch.inference_mode():
        dora_logits = peft(input_ids=ids).logits[0, -1]
        for module in peft.modules():
            if hasattr(module, "lora_magnitude_vector") and "d" in getattr(module, "lora_magnitude_vector", {}):
                module.use_dora["d"] = False
                module.lora_variant.pop("d", None)
        plain_logits = peft(input_ids=ids).logits[0, -1]
    assert float((dora_logits - plain_logits).abs().max()) > 0.1
