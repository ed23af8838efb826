"""A tiny Llama whose greedy output is a script: each token's successor is fixed, so a test can
make a served model write exact token sequences (special tokens included) end to end.

How: every layer's output projections (o_proj, down_proj) are zero, so the residual stream at
a position is its token's embedding; embeddings are one-hot (hidden_size >= vocabulary), the
final RMSNorm keeps the one-hot's direction, and lm_head maps token i's direction to its
successor's logit (sqrt(hidden_size) against 0 for every other token). Greedy decoding after a
prompt that ends with token t therefore writes successor(t), successor(successor(t)), ...

The tokenizer is a word-level `tokenizers` model with a Fuse decoder (ids decode to their
strings, concatenated), Mistral-style special tokens ([INST], [/INST], [TOOL_CALLS], [ARGS])
and a chat template that names [TOOL_CALLS] (so `--tool-call-parser auto` picks mistral).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SPECIAL = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[ARGS]",
           "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]"]
WORDS = ["get_weather", '{"city": ', '"Paris"}', "Hello", "!"]
# After the generation prompt ([/INST]) the model calls get_weather the Mistral v11 way, then EOS.
SCRIPT = {"[/INST]": "[TOOL_CALLS]", "[TOOL_CALLS]": "get_weather", "get_weather": "[ARGS]",
          "[ARGS]": '{"city": ', '{"city": ': '"Paris"}', '"Paris"}': "</s>",
          "Hello": "!", "!": "</s>"}
TOOL_TEXT = '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}'

CHAT_TEMPLATE = (
    "{{ bos_token }}{% if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}"
    "{% for m in messages %}{% if m.role == 'user' %}[INST]{{ m.content }}[/INST]"
    "{% elif m.role == 'assistant' %}{% if m.tool_calls %}{% for c in m.tool_calls %}[TOOL_CALLS]"
    "{{ c.function.name }}[ARGS]{{ c.function.arguments }}{% endfor %}{% else %}{{ m.content }}{% endif %}</s>"
    "{% elif m.role == 'tool' %}{{ m.content }}{% endif %}{% endfor %}")


def vocabulary() -> list[str]:
    return SPECIAL + WORDS


def build_scripted_llama(out_dir: Path, hidden_size: int = 32) -> Path:
    """Save the scripted model (float32 safetensors), its tokenizer and chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = vocabulary()
    ids = {token: index for index, token in enumerate(vocab)}
    assert hidden_size >= len(vocab)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.WordLevel(ids, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL])
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "chat_template": CHAT_TEMPLATE, "model_max_length": 512}))

    config = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden_size, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False,
                         bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["</s>"])
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed = torch.zeros(len(vocab), hidden_size)                # [V, H] one-hot rows
        embed[torch.arange(len(vocab)), torch.arange(len(vocab))] = 1.0
        model.model.embed_tokens.weight.copy_(embed)
        model.model.norm.weight.fill_(1.0)
        head = torch.zeros(len(vocab), hidden_size)                 # [V, H]: token i -> its successor
        for index, token in enumerate(vocab):
            head[ids[SCRIPT.get(token, "<unk>")], index] = 1.0
        model.lm_head.weight.copy_(head)
    model.save_pretrained(out_dir)
    return out_dir
