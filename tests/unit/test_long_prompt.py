"""Refusing an over-long prompt on a tokenized prefix (long_prompt.py, issue 36): the prefix's
count never exceeds the whole text's (so a prompt that fits is never refused), checked at every
allowed cut of adversarial texts for the default model's byte-level BPE tokenizer, a
SentencePiece-style Llama tokenizer and a byte-level BPE with Llama 3's split pattern; PromptIds refuses long prompts and chats naming the field."""

from __future__ import annotations

import functools
import random

import pytest

from loraplex.server.engine.chat_options import ChatOptions
from loraplex.server.engine.chat_template import ChatRenderer, TemplateLimits
from loraplex.server.engine.io import GenerationRequest, RequestRejected
from loraplex.server.engine.long_prompt import _CUT, PREFIX_MARGIN, safe_cut, tokens_at_least
from loraplex.server.engine.prompt_ids import PromptIds

FRAGMENTS = (
    "word", "Hello", "x", "lighthouse", "a" * 300, "Donaudampfschifffahrtsgesellschaft" * 4,
    " ", "  ", " " * 37, "\n", "\n\n", "\r\n", "\t", " \n ", "\n" * 20, " \t \n",
    "123", "4567890123", "3.14159", "1,000,000", "x2", "2x", "0" * 50,
    "don't", "it's", "WE'LL", "'s", "end.", "end.\n\n", "?!", "...", "--", "(a)", "[1]", "http://x.io/a_b?c=d",
    "日本語", "中文文本", "한국어", "テキスト", "日本語のテキスト" * 10,
    "🙂", "👍🏽", "👨‍👩‍👧", "🙂🙂🙂", "e\u0301", "cafe\u0301", "\u00a0", "\u200b", "\ufeff", "\U0001d400\U0001d401",
    "ǅ", "ß", "İstanbul", "ﬁ", "Ⅻ", "½", "٣٤", "\x00", "\x7f",
    "<|im_start|>", "<|im_end|>", "<s>", "</s>", "▁", "▁▁word", "_", "__init__",
)


def adversarial_texts(count: int = 24, pieces: int = 80) -> list[str]:
    rng = random.Random(36)
    texts = []
    for _ in range(count):
        parts = [rng.choice(FRAGMENTS) for _ in range(pieces)]
        texts.append("".join(part + (" " if rng.random() < 0.5 else "") for part in parts))
    texts.append("lighthouse keeper " * 200)
    texts.append("x" + " " * 2000 + "y" + "\n" * 500 + "z")
    return texts


@functools.cache
def sentencepiece_llama():
    """A Llama-2-style tokenizer.json (what transformers writes for a SentencePiece BPE model):
    the normalizer prepends '▁' and turns spaces into '▁', no pre-tokenizer, BPE with byte
    fallback, BOS added; trained here on adversarial text (no SentencePiece model is offline)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{byte:02X}>" for byte in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=1200, special_tokens=specials, limit_alphabet=60, show_progress=False)
    tokenizer.train_from_iterator(adversarial_texts(40) + ["The lighthouse keeper finds a map. " * 50], trainer)
    tokenizer.pre_tokenizer = None               # as in Llama 2's tokenizer.json: BPE over the whole text
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")


@functools.cache
def llama3_style():
    """A byte-level BPE with Llama 3's (and Qwen2's) split pattern: digits in threes, a
    punctuation run takes the newlines after it; trained here on adversarial text."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1500, special_tokens=["<|begin_of_text|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(adversarial_texts(40) + ["The lighthouse keeper finds a map.\n\n" * 50], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|begin_of_text|>")


@pytest.fixture(scope="module")
def smollm(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.fixture(scope="module", params=["default model (byte-level BPE)", "SentencePiece-style Llama",
                                        "Llama 3 split pattern"])
def tokenizer(request, smollm):
    if request.param.startswith("default"):
        return smollm
    return sentencepiece_llama() if request.param.startswith("SentencePiece") else llama3_style()


def _ids(tokenizer, text: str, special: bool = False) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def test_the_llama_style_tokenizer_falls_back_to_bytes():
    tokenizer = sentencepiece_llama()
    pieces = tokenizer.convert_ids_to_tokens(_ids(tokenizer, "Ⅻ 🙂 word", special=True))
    assert pieces[0] == "<s>" and "<0xE2>" in pieces and "▁" in "".join(pieces)


def test_a_prefix_cut_at_every_allowed_cut_tokenizes_to_a_prefix_of_the_text(tokenizer):
    """The claim long_prompt.py rests on (margin 0): at every cut `_CUT` allows, the prefix's ids
    are the first ids of the whole text's, so a prefix never has more tokens than the text."""
    checked = 0
    for text in adversarial_texts(48):
        whole = _ids(tokenizer, text)
        for match in _CUT.finditer(text):
            prefix = _ids(tokenizer, text[:match.start()])
            assert prefix == whole[:len(prefix)], (text[:match.start()][-40:], text[match.start():][:40])
            checked += 1
        whole_special = len(_ids(tokenizer, text, special=True))
        for match in list(_CUT.finditer(text))[::17]:
            assert len(_ids(tokenizer, text[:match.start()], special=True)) <= whole_special
    assert checked > 1200


def test_safe_cut_finds_the_last_space_after_a_letter_or_digit():
    text = "ab cd!  ef 12 " + "x" * 40
    assert safe_cut(text, 20) == 13 and text[:13] == "ab cd!  ef 12"
    assert safe_cut(text, 12) == 10                       # "ab cd!  ef": the spaces after "!" are not cuts
    assert safe_cut(text, 3) == 2
    assert safe_cut(text, 30) is None                     # only in the prefix's second half
    assert safe_cut("x" * 1000, 500) is None               # one long word: no cut
    far = "a " + "y" * 5000 + " " + "z" * 100_000
    assert safe_cut(far, 9000) == 5002                     # the window widens back to half the prefix


@pytest.mark.parametrize("margin", [0, PREFIX_MARGIN])
def test_a_text_that_fits_is_never_refused(tokenizer, margin):
    """Every limit around the whole text's count, prefixes from a small size up: a bound is only
    ever returned when it is above the limit and at most the text's count."""
    for text in adversarial_texts(8, pieces=400):
        total = len(_ids(tokenizer, text, special=True))
        count = lambda part: len(_ids(tokenizer, part, special=True))  # noqa: E731
        for limit in sorted({1, 5, total // 8, total // 3, total - 40, total - 3, total - 1, total, total + 1}):
            if limit < 1:
                continue
            for chars_per_token in (1, 2, 3):
                at_least = tokens_at_least(count, text, limit, margin, chars_per_token)
                assert at_least is None or limit < at_least <= total, (limit, total, at_least)
                if limit >= total:
                    assert at_least is None


def test_a_long_text_is_refused_on_a_small_prefix(smollm):
    text = "A lighthouse keeper finds a message in a bottle; a storm, an old map. " * 4000   # ~280 kB
    seen: list[int] = []

    def count(part: str) -> int:
        seen.append(len(part))
        return len(_ids(smollm, part, special=True))

    at_least = tokens_at_least(count, text, 1000)
    assert at_least is not None and 1000 < at_least <= len(_ids(smollm, text, special=True))
    assert seen and sum(seen) < len(text) // 10             # never the whole text


@pytest.fixture(scope="module")
def prompts(smollm):
    chat = ChatRenderer(smollm, TemplateLimits(timeout_s=10.0))
    yield PromptIds(smollm, chat, 200, lambda adapter_id, _tenant: "{{ messages[0]['content'] }}" if adapter_id else None)
    chat.sandbox.close()


LONG = "The lighthouse keeper finds a message in a bottle. " * 400          # ~20 kB, ~2400 tokens


def test_prompt_ids_refuses_a_long_prompt_naming_the_field(prompts):
    assert len(LONG) > prompts.long_prompt_bytes
    with pytest.raises(RequestRejected) as refused:
        prompts.of_request(GenerationRequest("r", prompt=LONG))
    assert refused.value.field_name == "prompt"
    assert "has at least" in refused.value.message and "the limit is 200" in refused.value.message


@pytest.mark.parametrize("adapter_id, options", [(None, None), (None, ChatOptions(template_kwargs='{"x": 1}')),
                                                 ("own-template", None)])
def test_prompt_ids_refuses_a_long_chat_naming_messages(prompts, adapter_id, options):
    request = GenerationRequest("r", messages=(("user", LONG), ("user", "Summarize.")), adapter_id=adapter_id,
                                chat=options)
    with pytest.raises(RequestRejected) as refused:
        prompts.of_request(request)
    assert refused.value.field_name == "messages"
    assert "the rendered chat has at least" in refused.value.message


def test_the_rendered_chat_is_counted_not_the_contents(prompts):
    """The adapter's template renders only the first message: a long second one never reaches
    the prompt, so the chat fits (counting the contents would have refused it)."""
    request = GenerationRequest("r", messages=(("system", "Be brief."), ("user", LONG)), adapter_id="own-template")
    assert prompts.of_request(request) == _ids(prompts.tokenizer, "Be brief.")


def test_a_long_prompt_that_fits_is_tokenized_whole(prompts):
    """Many characters a token (runs of spaces): past the prefix threshold, within the limit."""
    text = ("x" + " " * 200) * 20
    assert len(text) > prompts.long_prompt_bytes
    ids = prompts.of_request(GenerationRequest("r", prompt=text))
    assert ids == _ids(prompts.tokenizer, text, special=True) and len(ids) <= 200
    chat = prompts.of_request(GenerationRequest("c", messages=(("user", text),)))
    assert len(chat) <= 200
