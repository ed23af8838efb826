"""A PEFT adapter with a resized vocabulary (tokens added in training), for the tiny Llama.

The adapter's tokenizer is the base's plus ADDED tokens; the base model is resized with
`resize_token_embeddings(len(tokenizer), pad_to_multiple_of=8)` (so V' > the tokenizer's size:
padded rows), and the adapter saves embed_tokens and lm_head whole (modules_to_save) beside a
LoRA on q_proj / v_proj. The added rows are set so that the added tokens matter: the first
added token's lm_head row is aimed at the hidden state of PROMPT's last position (it is the
greedy choice there), and its embedding row is random at the scale of the table.
"""

from __future__ import annotations

from pathlib import Path

import torch

ADDED = ["<|wave|>", "<|planet|>"]
PROMPT = "The sea says <|wave|> and the"
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens", "lm_head"])


def resized_reference_model(model_dir: Path, tokenizer):
    """The base resized to the adapter's vocabulary (what PEFT loads the adapter onto)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=8, mean_resizing=False)
    return model


def make_resized_adapter(model_dir: Path, out_dir: Path, seed: int = 7) -> Path:
    """Save the adapter (weights + its tokenizer files) under out_dir; returns out_dir."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.add_tokens(ADDED)
    torch.manual_seed(seed)
    model = resized_reference_model(model_dir, tokenizer)
    peft = get_peft_model(model, LoraConfig(init_lora_weights=False, task_type="CAUSAL_LM", **LORA))
    first_added = len(tokenizer) - len(ADDED)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.mul_(0.2)
        embed = _table(peft, "embed_tokens")
        head = _table(peft, "lm_head")
        embed[first_added:] = torch.randn_like(embed[first_added:]) * float(embed[:first_added].std())
        head[first_added:] = torch.randn_like(head[first_added:]) * float(head[:first_added].std())
        ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
        hidden = peft.get_base_model().model(input_ids=ids).last_hidden_state[0, -1]    # [H] final-normed
        top = float((head[:first_added] @ hidden).max())
        head[first_added] = hidden * ((abs(top) + 4.0) / float(hidden @ hidden))      # its logit: top + 4
    peft.save_pretrained(out_dir, save_embedding_layers=False)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _table(peft, module: str) -> torch.Tensor:
    """The adapter's own (modules_to_save) copy of `module`'s weight."""
    for name, param in peft.named_parameters():
        if module in name and "modules_to_save" in name:
            return param
    raise AssertionError(f"no modules_to_save table for {module}")
