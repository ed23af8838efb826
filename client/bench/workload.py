"""The requests of one run: prompt text, output length and adapter per request, all seeded.

Prompt lengths are in tokens of a typical BPE tokenizer: synthetic prompts are built from common
English words that each encode as one token (" the", " sea", ...), so N words ~= N tokens; the
server's own count is reported back per request (usage.prompt_tokens) and used in the stats.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from .config import BenchConfig, LengthSpec

_WORDS = ("the sea was calm and the old man walked along the shore with his dog while a bird flew over "
          "the hill near the town where people lived in small houses by the water and the sun set "
          "behind the trees as children played in the park and a boat came back from the island").split()


@dataclass(frozen=True)
class BenchRequest:
    """One request of the workload. In a multi-turn workload `prompt` is only this turn's new
    text: the runner sends the conversation so far (earlier prompts and answers) before it."""

    index: int
    prompt: str
    max_new_tokens: int
    adapter_id: str | None
    conversation: int | None = None        # multi-turn: which conversation (turns in index order)


def sample_length(spec: LengthSpec, rng: random.Random) -> int:
    return spec.low if spec.kind == "fixed" else rng.randint(spec.low, spec.high)


def synthetic_prompt(num_tokens: int, rng: random.Random) -> str:
    """About `num_tokens` tokens: a random rotation of a fixed sentence, repeated."""
    start = rng.randrange(len(_WORDS))
    return " ".join(_WORDS[(start + i) % len(_WORDS)] for i in range(num_tokens))


def load_prompts(path: Path) -> list[str]:
    """A JSON list of strings, or one prompt per non-empty line."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ValueError(f"--prompt-file: cannot read {path}: {error.strerror}") from None
    if text.lstrip().startswith("["):
        prompts = json.loads(text)
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"--prompt-file: {path} is a JSON list but not all items are strings")
    else:
        prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompt-file: {path} has no prompts")
    return prompts


def zipf_weights(count: int, s: float) -> list[float]:
    """P(rank k) proportional to 1 / k^s, k = 1..count (normalized)."""
    raw = [1.0 / (k ** s) for k in range(1, count + 1)]
    total = sum(raw)
    return [w / total for w in raw]


def adapter_sequence(adapters: tuple[str, ...], popularity: str, zipf_s: float, count: int,
                     rng: random.Random) -> list[str | None]:
    """`count` adapter picks; None everywhere when no adapters are given."""
    if not adapters:
        return [None] * count
    if popularity == "uniform":
        return [rng.choice(adapters) for _ in range(count)]
    return rng.choices(adapters, weights=zipf_weights(len(adapters), zipf_s), k=count)


def build_requests(config: BenchConfig, count: int | None = None, seed_offset: int = 0) -> list[BenchRequest]:
    """The run's requests (the measured ones, or `count` warm-up ones with another seed)."""
    rng = random.Random(config.seed * 1_000_003 + seed_offset)
    count = config.num_prompts if count is None else count
    if config.workload != "random":
        return _chat_requests(config, count, rng)
    file_prompts = load_prompts(config.prompt_file) if config.prompt_file else None
    picks = adapter_sequence(config.adapters, config.popularity, config.zipf_s, count, rng)
    requests = []
    for i in range(count):
        prompt = (file_prompts[i % len(file_prompts)] if file_prompts
                  else synthetic_prompt(sample_length(config.input_len, rng), rng))
        requests.append(BenchRequest(i, prompt, sample_length(config.output_len, rng), picks[i]))
    return requests


def random_words(num_tokens: int, rng: random.Random) -> str:
    """About `num_tokens` tokens of words drawn independently (text no other request shares)."""
    return " ".join(rng.choice(_WORDS) for _ in range(num_tokens))


def system_prompt(adapter_id: str | None, num_tokens: int) -> str:
    """The fixed system prompt of one adapter: the same text in every run and with every --seed
    (the seed varies only the questions), as a tenant's prompt stays the same across requests."""
    rng = random.Random(f"system:{adapter_id or ''}")
    return "System: " + random_words(num_tokens, rng) + "\n"


def _chat_requests(config: BenchConfig, count: int, rng: random.Random) -> list[BenchRequest]:
    """shared-prefix: request i uses adapter i % N and sends that adapter's system prompt plus a
    fresh question. multi-turn: conversation c (adapter c % N) has `turns` requests in a row; its
    first carries the system prompt, each later one only its new user message."""
    adapters = config.adapters or (None,)
    requests = []
    for i in range(count):
        conversation = i // config.turns if config.workload == "multi-turn" else None
        adapter = adapters[(i if conversation is None else conversation) % len(adapters)]
        question = "User: " + random_words(sample_length(config.input_len, rng), rng) + "\nAssistant:"
        first_turn = conversation is None or i % config.turns == 0
        prompt = (system_prompt(adapter, config.prefix_len) if first_turn else "") + question
        requests.append(BenchRequest(i, prompt, sample_length(config.output_len, rng), adapter, conversation))
    return requests
