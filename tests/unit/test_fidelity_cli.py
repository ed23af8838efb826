"""`loraplex eval` and `loraplex merge` end to end on the tiny model."""

from __future__ import annotations

import re

import torch

from loraplex.cli import main


def test_eval_and_merge_commands(tiny_llama_dir, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    torch.manual_seed(3)
    get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj"], init_lora_weights=False,
                                    task_type="CAUSAL_LM")).save_pretrained(tmp_path / "ad")
    text = tmp_path / "text.txt"
    text.write_text("A short text to score with and without the adapter. " * 4)
    assert main(["eval", "--model", str(tiny_llama_dir), "--text", str(text), "--adapter", str(tmp_path / "ad")]) == 0
    with_adapter = float(re.search(r"perplexity=([\d.]+)", capsys.readouterr().out).group(1))
    assert main(["merge", str(tmp_path / "ad"), "--model", str(tiny_llama_dir), "--out", str(tmp_path / "m")]) == 0
    capsys.readouterr()
    assert main(["eval", "--model", str(tmp_path / "m"), "--text", str(text)]) == 0
    merged = float(re.search(r"perplexity=([\d.]+)", capsys.readouterr().out).group(1))
    assert abs(merged - with_adapter) / with_adapter < 1e-3
    assert main(["eval", "--model", str(tiny_llama_dir), "--text", str(text), "--adapter", "missing",
                 "--store", str(tmp_path / "nostore")]) == 1
    assert "no adapter store" in capsys.readouterr().err
