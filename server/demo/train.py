"""Fine-tune a small demo LoRA on the default model, on CPU, in a few minutes (PEFT format).

Behaviour taught (checkable): every assistant reply starts with "ANSWER:" followed by the
result of a small arithmetic question, e.g. user "What is 7 plus 5?" -> "ANSWER: 12". The
dataset is generated (no downloads); only assistant tokens are trained on.

Used by `loraplex demo` (demo/walkthrough.py) and scripts/train_demo_adapter.py.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

PREFIX = "ANSWER:"
OPS = (("plus", lambda a, b: a + b), ("minus", lambda a, b: a - b), ("times", lambda a, b: a * b))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 60
    batch_size: int = 8
    rank: int = 8
    alpha: int = 16
    lr: float = 2e-3
    seed: int = 0
    use_dora: bool = False                      # DoRA (magnitude vectors) instead of plain LoRA
    modules_to_save: tuple[str, ...] = ()       # e.g. ("embed_tokens", "lm_head"): trained whole


def make_example(rng: random.Random) -> tuple[str, str]:
    """(question, answer) such as ("What is 7 plus 5?", "ANSWER: 12")."""
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    word, fn = rng.choice(OPS)
    return f"What is {a} {word} {b}?", f"{PREFIX} {fn(a, b)}"


def encode(tokenizer, question: str, answer: str) -> tuple[list[int], list[int]]:
    """Chat-rendered ids and labels (-100 on the prompt, the answer + EOS trained)."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                           add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids


def collate(pairs: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in pairs)
    ids = torch.full((len(pairs), width), pad_id)
    labels = torch.full((len(pairs), width), -100)
    mask = torch.zeros((len(pairs), width), dtype=torch.int64)
    for row, (seq, lab) in enumerate(pairs):
        ids[row, : len(seq)], labels[row, : len(lab)], mask[row, : len(seq)] = (
            torch.tensor(seq), torch.tensor(lab), 1)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def train(model_dir: Path, out_dir: Path, config: TrainConfig, log: Callable[[str], None] = print) -> Path:
    """Train the demo adapter and save it with save_pretrained into out_dir."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=0.0,
                                            target_modules=TARGETS, task_type="CAUSAL_LM",
                                            use_dora=config.use_dora,
                                            modules_to_save=list(config.modules_to_save) or None))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr)
    model.train()
    started = time.monotonic()
    for step in range(config.steps):
        batch = collate([encode(tokenizer, *make_example(rng)) for _ in range(config.batch_size)], pad_id)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == config.steps - 1:
            log(f"step {step + 1}/{config.steps} loss {loss.item():.4f} ({time.monotonic() - started:.0f}s)")
    model.save_pretrained(out_dir)
    return out_dir
