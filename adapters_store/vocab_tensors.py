"""The vocabulary side of an adapter: LoRA on embed_tokens / lm_head and modules_to_save tables.

PEFT writes (for a Llama-family model):
    base_model.model.model.embed_tokens.lora_embedding_A   [r, vocab]      (target_modules)
    base_model.model.model.embed_tokens.lora_embedding_B   [hidden, r]
    base_model.model.lm_head.lora_A.weight                 [r, hidden]
    base_model.model.lm_head.lora_B.weight                 [vocab, r]
    base_model.model.model.embed_tokens.weight             [vocab, hidden] (modules_to_save)
    base_model.model.lm_head.weight                        [vocab, hidden]
    base_model.model.{model.embed_tokens|lm_head}.base_layer.weight  a copy of the base's table
        (save_embedding_layers; ignored: the served base's table is used)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .errors import AdapterValidationError
from .types import BaseSpec, VocabWeights

VOCAB_MODULES = ("embed_tokens", "lm_head")
_EMBED_RE = re.compile(r"(?:base_model\.model\.)?model\.embed_tokens\.(lora_embedding_A|lora_embedding_B|"
                       r"base_layer\.weight|weight)(?:\.default)?", re.ASCII)
_HEAD_RE = re.compile(r"(?:base_model\.model\.)?lm_head\.(lora_A(?:\.default)?\.weight|lora_B(?:\.default)?"
                      r"\.weight|base_layer\.weight|weight)", re.ASCII)
_KINDS = {"lora_embedding_A": "A", "lora_embedding_B": "B", "base_layer.weight": "base_copy", "weight": "table"}


@dataclass(frozen=True)
class VocabTensorName:
    module: str        # "embed_tokens" | "lm_head"
    kind: str          # "A" | "B" (LoRA), "table" (modules_to_save), "base_copy" (ignored)


def parse_vocab_tensor_name(name: str) -> VocabTensorName | None:
    """The vocabulary tensor `name` names, or None when it is not one (a decoder tensor)."""
    match = _EMBED_RE.fullmatch(name)
    if match is not None:
        return VocabTensorName("embed_tokens", _KINDS[match.group(1)])
    match = _HEAD_RE.fullmatch(name)
    if match is not None:
        kind = match.group(1)
        return VocabTensorName("lm_head", "A" if kind.startswith("lora_A") else "B" if kind.startswith("lora_B")
                               else _KINDS[kind])
    return None


def expected_shape(name: VocabTensorName, rank: int, base: BaseSpec) -> tuple[int, ...]:
    vocab, hidden = base.vocab_size, base.hidden_size
    if name.kind in ("table", "base_copy"):
        return (vocab, hidden)
    if name.module == "embed_tokens":
        return (rank, vocab) if name.kind == "A" else (hidden, rank)
    return (rank, hidden) if name.kind == "A" else (vocab, rank)


def check_vocab_entry(tensor: str, name: VocabTensorName, shape: tuple[int, ...], rank: int, base: BaseSpec,
                      lora_modules: frozenset[str], saved_modules: frozenset[str]) -> int:
    """One vocabulary tensor against the config and the served base's vocabulary; returns the
    vocabulary size it covers (V, or V' > V for a resized modules_to_save table or its base copy)."""
    if base.vocab_size <= 0:
        raise AdapterValidationError("vocab_size", f"tensor {tensor!r} adapts {name.module}, but this server does "
                                     f"not know its base's vocabulary size; it cannot check the tensor")
    if name.kind in ("A", "B") and name.module not in lora_modules:
        raise AdapterValidationError("target_mismatch", f"tensor {tensor!r} is LoRA on {name.module}, which "
                                     f"adapter_config.json target_modules does not list")
    if name.kind == "table" and name.module not in saved_modules:
        raise AdapterValidationError("target_mismatch", f"tensor {tensor!r} is a whole {name.module} table, "
                                     f"which adapter_config.json modules_to_save does not list")
    expected = expected_shape(name, rank, base)
    rows = vocab_rows(name, shape, expected)
    if rows is not None and rows != base.vocab_size:
        if rows < base.vocab_size or name.kind not in ("table", "base_copy"):
            raise AdapterValidationError("vocab_size", resized_vocab_message(tensor, name, rows, base.vocab_size))
        return rows
    if shape != expected:
        raise AdapterValidationError("shape", f"tensor {tensor!r} has shape {list(shape)}, expected "
                                     f"{list(expected)} for {name.module} (vocab {base.vocab_size}, hidden "
                                     f"{base.hidden_size}, r={rank})")
    return base.vocab_size


def vocab_rows(name: VocabTensorName, shape: tuple[int, ...], expected: tuple[int, ...]) -> int | None:
    """The vocabulary size a tensor's shape implies when its other dimension is as expected
    (table [vocab, hidden], embedding A [r, vocab], lm_head B [vocab, r]), else None."""
    if len(shape) != 2:
        return None
    axis = 1 if (name.module, name.kind) == ("embed_tokens", "A") else \
        0 if name.kind in ("table", "base_copy") or (name.module, name.kind) == ("lm_head", "B") else None
    if axis is None or shape[1 - axis] != expected[1 - axis]:
        return None
    return shape[axis]


def resized_vocab_message(tensor: str, name: VocabTensorName, rows: int, base_vocab: int) -> str:
    """Why a tensor's vocabulary size is refused: what is unsupported, and why."""
    what = {"table": "modules_to_save table", "base_copy": "saved copy of the base table",
            "A": "LoRA A", "B": "LoRA B"}[name.kind]
    head = (f"tensor {tensor!r} ({name.module} {what}) covers a vocabulary of {rows} tokens but the served "
            f"base's has {base_vocab} ({rows - base_vocab:+d})")
    if rows < base_vocab:
        return (f"{head}: a shrunk vocabulary is not supported (the base's ids {rows}..{base_vocab - 1} would "
                f"have no row in the adapter's tables). Train without removing tokens")
    return (f"{head}: a resized vocabulary is served only from whole tables, embed_tokens and lm_head both in "
            f"modules_to_save (with V' rows, beside the adapter's own tokenizer files); LoRA on a resized "
            f"embed_tokens / lm_head has no row of the added tokens in the served base. Save the resized "
            f"layers with modules_to_save=[\"embed_tokens\", \"lm_head\"]")


def adapter_vocab_size(rows: dict[str, tuple[VocabTensorName, int]], saved_modules: frozenset[str],
                       base_vocab: int) -> int:
    """The adapter's vocabulary V' (base_vocab when not resized) from each vocabulary tensor's
    (parsed name, rows). A resized one needs both tables, each with V' rows."""
    resized = {tensor: (name, n) for tensor, (name, n) in rows.items() if n != base_vocab}
    if not resized:
        return base_vocab
    sizes = {n for _, n in resized.values()}
    tensor, (name, size) = sorted(resized.items())[0]
    if len(sizes) > 1:
        raise AdapterValidationError("vocab_size", f"the adapter's vocabulary tensors disagree on its size "
                                     f"({sorted(sizes)} rows); tensor {tensor!r} has {size}")
    missing = [m for m in VOCAB_MODULES if m not in saved_modules]
    if missing:
        raise AdapterValidationError("vocab_size", f"tensor {tensor!r} resizes the vocabulary to {size} tokens "
                                     f"(the served base has {base_vocab}) but {missing[0]} is not in "
                                     f"modules_to_save: the added ids need the adapter's own {missing[0]} "
                                     f"rows. Save both with modules_to_save=[\"embed_tokens\", \"lm_head\"]")
    for tensor, (name, n) in sorted(rows.items()):
        if name.kind == "table" and n != size:
            raise AdapterValidationError("vocab_size", f"tensor {tensor!r} has {n} rows but the adapter's "
                                         f"vocabulary is {size} (its other table)")
    return size


def check_vocab_complete(names: dict[str, VocabTensorName], lora_modules: frozenset[str],
                         saved_modules: frozenset[str]) -> None:
    """Each LoRA-targeted vocabulary module has A and B; each saved module has its table."""
    have = {(n.module, n.kind) for n in names.values()}
    for module in sorted(lora_modules):
        for kind in ("A", "B"):
            if (module, kind) not in have:
                raise AdapterValidationError("missing_pair", f"{module} is in target_modules but the weights "
                                             f"have no LoRA {kind} for it")
    for module in sorted(saved_modules):
        if (module, "table") not in have:
            raise AdapterValidationError("missing_pair", f"{module} is in modules_to_save but the weights "
                                         f"have no {module} table")


def split_vocab(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[VocabTensorName, torch.Tensor]]:
    """(decoder tensors by name, vocabulary tensors by parsed name); base copies dropped."""
    decoder, vocab = {}, {}
    for name, tensor in tensors.items():
        parsed = parse_vocab_tensor_name(name)
        if parsed is None:
            decoder[name] = tensor
        elif parsed.kind != "base_copy":
            vocab[parsed] = tensor
    return decoder, vocab


def vocab_weights(vocab: dict[VocabTensorName, torch.Tensor], lora_dtype: torch.dtype,
                  table_dtype: torch.dtype = torch.float32) -> VocabWeights | None:
    """VocabWeights from parsed vocabulary tensors (LoRA in lora_dtype, tables in table_dtype)."""
    if not vocab:
        return None
    get = {(n.module, n.kind): t for n, t in vocab.items()}

    def pair(module: str):
        if (module, "A") not in get:
            return None
        return (get[(module, "A")].to(lora_dtype).contiguous(), get[(module, "B")].to(lora_dtype).contiguous())

    def table(module: str):
        t = get.get((module, "table"))
        return None if t is None else t.to(table_dtype).contiguous()

    return VocabWeights(embed_lora=pair("embed_tokens"), lm_head_lora=pair("lm_head"),
                        embed_table=table("embed_tokens"), lm_head_table=table("lm_head"))
