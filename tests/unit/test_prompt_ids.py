"""One intake path for prompts and chats (prompt_ids.py): the engine process's front-end Intake
renders a chat with its ChatOptions and an adapter's own template exactly as the in-process
engine does (it used to drop the options: tools never reached the prompt in process mode),
and a bad template is refused naming the field."""

from __future__ import annotations

import json

import pytest

from loraplex.server.engine.chat_options import ChatOptions
from loraplex.server.engine.chat_template import ChatRenderer, TemplateLimits
from loraplex.server.engine.config import EngineConfig
from loraplex.server.engine.io import GenerationRequest, RequestRejected
from loraplex.server.engine.intake import Intake
from loraplex.server.engine.prompt import render_chat
from loraplex.server.engine.prompt_ids import PromptIds

CHAT = (("system", "Be brief."), ("user", "Weather in Paris?"))
TOOLS = json.dumps([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}])
ADAPTER_TEMPLATE = "{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }}\n{% endfor %}[ASSISTANT]"


@pytest.fixture(scope="module")
def prompts(default_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    chat = ChatRenderer(tokenizer, TemplateLimits(timeout_s=5.0))
    templates = {"tpl": ADAPTER_TEMPLATE, "broken": "{{ raise_exception('bad template') }}"}
    yield PromptIds(tokenizer, chat, 512, lambda adapter_id, _tenant: templates.get(adapter_id or ""))
    chat.sandbox.close()


def _ids(prompts: PromptIds, text: str) -> list[int]:
    return list(prompts.tokenizer(text, add_special_tokens=False)["input_ids"])


def test_plain_chat_is_the_base_template(prompts):
    assert prompts.of_chat(CHAT) == render_chat(prompts.tokenizer, CHAT)
    assert prompts.of_chat(CHAT, "unknown-adapter") == render_chat(prompts.tokenizer, CHAT)


def test_options_and_adapter_templates_reach_the_prompt(prompts):
    with_tools = prompts.of_chat(CHAT, None, ChatOptions(tools=TOOLS))
    assert with_tools != prompts.of_chat(CHAT)
    assert "get_weather" in prompts.tokenizer.decode(with_tools)
    own = _ids(prompts, "[SYSTEM] Be brief.\n[USER] Weather in Paris?\n[ASSISTANT]")
    assert prompts.of_chat(CHAT, "tpl") == own


def test_the_front_end_intake_renders_chats_as_the_engine_does(prompts, tmp_path):
    intake = Intake(EngineConfig(model_dir=tmp_path), prompts, vocab_size=49152)
    for adapter_id, options in ((None, ChatOptions(tools=TOOLS)), ("tpl", None), (None, None)):
        request = GenerationRequest("r", messages=CHAT, adapter_id=adapter_id, chat=options)
        ids = intake.prepare(request).prompt_ids
        assert ids == prompts.of_chat(CHAT, adapter_id, options)
    assert "get_weather" in prompts.tokenizer.decode(
        intake.prepare(GenerationRequest("t", messages=CHAT, chat=ChatOptions(tools=TOOLS))).prompt_ids)


def test_bad_templates_are_refused_naming_the_field(prompts):
    with pytest.raises(RequestRejected) as error:
        prompts.of_chat(CHAT, "broken")
    assert error.value.violations[0].field == "messages" and "bad template" in str(error.value)
    with pytest.raises(RequestRejected) as error:
        prompts.of_chat(CHAT, None, ChatOptions(chat_template="{{ raise_exception('no') }}"))
    assert error.value.violations[0].field == "chat_template"
