"""Tokenizer loading, prompt encoding, chat rendering and eos ids with the SmolLM2 tokenizer."""

from __future__ import annotations

import json
import shutil

import pytest

from loraplex.server.engine.prompt import encode_prompt, eos_token_ids, load_tokenizer, render_chat


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    return load_tokenizer(default_model_dir)


@pytest.fixture
def tokenizer_only_dir(tmp_path, default_model_dir):
    """A copy of the tokenizer files without the chat template or generation config."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_dir / name, tmp_path / name)
    return tmp_path


def test_load_tokenizer_reads_the_model_directory(tokenizer):
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.decode(tokenizer("hello world")["input_ids"]) == "hello world"


def test_load_tokenizer_errors_name_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(ValueError, match="cannot load a tokenizer"):
        load_tokenizer(tmp_path)


def test_encode_prompt_matches_transformers(tokenizer):
    for text in ["Hello", " two  spaces", "héllo 🦀 世界", "<|im_start|>user\nhi<|im_end|>"]:
        assert encode_prompt(tokenizer, text) == tokenizer(text)["input_ids"]
    assert encode_prompt(tokenizer, "<|im_start|>")[0] == tokenizer.bos_token_id


def test_render_chat_uses_the_template_and_adds_the_generation_prompt(tokenizer):
    messages = [("system", "Be brief."), ("user", "Hi!"), ("assistant", "Hello."), ("user", "Bye?")]
    ids = render_chat(tokenizer, messages)
    text = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
            "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye?<|im_end|>\n"
            "<|im_start|>assistant\n")
    assert tokenizer.decode(ids) == text
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert all(isinstance(t, int) for t in ids)


def test_render_chat_default_system_prompt_comes_from_the_template(tokenizer):
    text = tokenizer.decode(render_chat(tokenizer, [("user", "Hi")]))
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("messages,field,description", [
    ([], "messages", "at least one message"),
    ([("user", "ok"), ("robot", "x")], "messages[1].role", "(got 'robot')"),
    ([("User", "x")], "messages[0].role", "must be one of system, user, assistant"),
    ([("user", 3)], "messages[0].content", "must be a string"),
    ([("user",)], "messages[0]", "must be a (role, content) pair"),
])
def test_validator_rejects_bad_chat_messages(messages, field, description):
    from loraplex.server.engine.config import RequestLimits
    from loraplex.server.engine.io import GenerationRequest
    from loraplex.server.engine.validation import check_request

    violations = check_request(GenerationRequest("r", messages=tuple(messages)), RequestLimits())
    assert [v.field for v in violations] == [field]
    assert description in violations[0].description


def test_render_chat_without_template_says_what_to_do(tokenizer_only_dir):
    with pytest.raises(ValueError, match="no chat template"):
        render_chat(load_tokenizer(tokenizer_only_dir), [("user", "hi")])


def test_eos_ids_of_the_default_model(tokenizer, default_model_dir):
    assert eos_token_ids(default_model_dir, tokenizer) == (tokenizer.eos_token_id,) == (2,)


@pytest.mark.parametrize("config_eos,expected", [(None, (2,)), (5, (2, 5)), ([2, 7, 5], (2, 7, 5)),
                                                 ([], (2,))])
def test_eos_ids_merge_generation_config(tokenizer, tokenizer_only_dir, config_eos, expected):
    if config_eos is not None:
        (tokenizer_only_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": config_eos}))
    assert eos_token_ids(tokenizer_only_dir, tokenizer) == expected


def test_eos_ids_bad_generation_config(tokenizer, tokenizer_only_dir):
    (tokenizer_only_dir / "generation_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="generation_config.json is not valid JSON"):
        eos_token_ids(tokenizer_only_dir, tokenizer)
