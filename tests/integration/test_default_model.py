"""The converted default model loads with transformers and answers sensibly."""

from __future__ import annotations

import json

import pytest
import torch

from loraplex.server.model import default_model

pytestmark = pytest.mark.integration


def test_converted_model_answers_capital_of_france(default_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_second_fetch_is_instant_and_reuses_cache(default_model_dir):
    import time
    started = time.monotonic()
    again = default_model.ensure_default_model(log=lambda _m: None)
    assert again == default_model_dir
    assert time.monotonic() - started < 1.0


def test_corrupt_cache_is_detected(tmp_path, default_model_dir):
    import shutil
    copy = tmp_path / "models" / default_model.MODEL_DIR_NAME
    shutil.copytree(default_model_dir, copy)
    assert default_model.is_complete(copy)
    with open(copy / "model.safetensors", "r+b") as f:   # truncate: a partial write
        f.truncate(1000)
    assert not default_model.is_complete(copy)
    manifest = json.loads((copy / default_model.MANIFEST).read_text())
    (copy / default_model.MANIFEST).unlink()
    assert not default_model.is_complete(copy)
    assert manifest["files"]["model.safetensors"] > 100_000_000
