"""Incremental detokenizer against the real SmolLM2 tokenizer's full decode."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from loraplex.server.engine.detokenizer import IncrementalDetokenizer, decode_function

TEXTS = [
    "Hello, world! How are you today?",
    " leading space and trailing space ",
    "emoji: 🦀🚀 family 👨‍👩‍👧‍👦 flag 🇫🇷 done",
    "中文测试：你好，世界。日本語のテキスト、한국어 텍스트",
    "Crème brûlée, naïve façade, Ångström, e\u0301 combining, Ελληνικά, русский",
    "def f(x):\n    if x:\n\t\treturn  x  *  2\n\n\n    return None  # trailing   \n",
    "mixed🙂text中with😀no spaces",
    "numbers 3.14159 and symbols <>&%$#@!{}[]|\\",
    "🦀",
    "\n\n\n",
]


class RecordingTokenizer:
    """The real tokenizer, recording how many ids each decode call sees."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.decode_lengths: list[int] = []

    def decode(self, ids, **kwargs):
        self.decode_lengths.append(len(ids))
        return self.tokenizer.decode(ids, **kwargs)


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.fixture(scope="module")
def chat_prompt(tokenizer) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": "Say something."}],
                                         add_generation_prompt=True, tokenize=True)["input_ids"]


def stream(tokenizer, prompt: list[int], output: list[int], step: int = 1, **kwargs) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, prompt, **kwargs)
    return [detok.add(output[i:i + step]) for i in range(0, len(output), step)]


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_full_decode_without_partial_characters(tokenizer, chat_prompt, text):
    output = tokenizer(text, add_special_tokens=False)["input_ids"]
    expected = tokenizer.decode(output, skip_special_tokens=True)
    assert expected == text                                 # the round trip itself is exact
    deltas = stream(tokenizer, chat_prompt, output)
    assert "".join(deltas) == expected
    for delta in deltas:
        assert "\ufffd" not in delta
    emitted = ""
    for delta in deltas:
        emitted += delta
        assert expected.startswith(emitted)


def test_backend_fast_path_gives_the_same_deltas(tokenizer, chat_prompt):
    """The real tokenizer decodes through its Rust backend; a wrapper with only .decode (the
    transformers path) must see exactly the same deltas, special tokens kept or skipped."""
    assert decode_function(tokenizer, True).__code__ is not decode_function(RecordingTokenizer(tokenizer), True).__code__
    for text in TEXTS:
        output = tokenizer(text, add_special_tokens=False)["input_ids"]
        output = output[:3] + [tokenizer.eos_token_id] + output[3:]
        for skip in (True, False):
            assert (stream(tokenizer, chat_prompt, output, skip_special_tokens=skip)
                    == stream(RecordingTokenizer(tokenizer), chat_prompt, output, skip_special_tokens=skip))


def test_multibyte_character_is_held_until_complete(tokenizer):
    output = tokenizer("a🦀", add_special_tokens=False)["input_ids"]
    assert len(output) >= 3                                 # the crab spans several byte tokens
    deltas = stream(tokenizer, [], output)
    assert deltas[0] == "a"
    assert deltas[1:-1] == [""] * (len(output) - 2)
    assert deltas[-1] == "🦀"


@pytest.mark.parametrize("step", [2, 3, 7])
def test_several_tokens_per_add(tokenizer, chat_prompt, step):
    text = "".join(TEXTS)
    output = tokenizer(text, add_special_tokens=False)["input_ids"]
    deltas = stream(tokenizer, chat_prompt, output, step=step)
    assert "".join(deltas) == text
    assert all("\ufffd" not in delta for delta in deltas)


def test_complete_part_of_a_multi_token_add_is_emitted_at_once(tokenizer):
    output = tokenizer("ab🦀", add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, [])
    assert detok.add(output[:-1]) == "ab"
    assert detok.add(output[-1:]) == "🦀"


def test_prompt_context_does_not_leak_and_spacing_follows_output(tokenizer):
    prompt = tokenizer("The answer is", add_special_tokens=False)["input_ids"]
    output = tokenizer(" forty two", add_special_tokens=False)["input_ids"]
    assert "".join(stream(tokenizer, prompt, output)) == " forty two"


def test_prompt_ending_mid_character(tokenizer):
    crab = tokenizer("x🦀", add_special_tokens=False)["input_ids"]
    prompt, output = crab[:2], crab[2:] + tokenizer(" ok", add_special_tokens=False)["input_ids"]
    assert "".join(stream(tokenizer, prompt, output)) == tokenizer.decode(output, skip_special_tokens=True)


def test_special_tokens_skipped_or_kept(tokenizer, chat_prompt):
    output = tokenizer("Hi there", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert "".join(stream(tokenizer, chat_prompt, output)) == "Hi there"
    kept = "".join(stream(tokenizer, chat_prompt, output, skip_special_tokens=False))
    assert kept == tokenizer.decode(output, skip_special_tokens=False) == "Hi there<|im_end|>"


def test_work_per_token_is_bounded(tokenizer, chat_prompt):
    recording = RecordingTokenizer(tokenizer)
    text = " ".join(TEXTS) * 5
    output = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(output) > 500
    deltas = stream(recording, chat_prompt, output)
    assert "".join(deltas) == text
    assert max(recording.decode_lengths) <= 12


def test_flush_releases_incomplete_tail(tokenizer):
    output = tokenizer("ok🦀", add_special_tokens=False)["input_ids"][:-1]
    detok = IncrementalDetokenizer(tokenizer, [])
    text = "".join(detok.add([t]) for t in output)
    text += detok.flush()
    assert text == tokenizer.decode(output, skip_special_tokens=True)
    assert text.endswith("\ufffd")


def test_malformed_output_does_not_grow_the_window_forever(tokenizer):
    lead_byte = tokenizer("🦀", add_special_tokens=False)["input_ids"][0]   # an incomplete start
    recording = RecordingTokenizer(tokenizer)
    detok = IncrementalDetokenizer(recording, [])
    for _ in range(100):
        detok.add([lead_byte])
    assert max(recording.decode_lengths) <= 40
