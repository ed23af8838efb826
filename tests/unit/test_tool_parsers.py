"""Tool-call parsers on canned outputs in the formats real chat templates teach (Qwen 2.5 /
Hermes, Llama 3.1, Mistral v3 and v11), whole and streamed in every chunking, with malformed
and unfinished calls, and the reasoning parser in front of them."""

from __future__ import annotations

import json

import pytest

from loraplex.server.engine.reasoning import ReasoningStream
from loraplex.server.engine.tool_parsers import ToolCall, ToolCallStream, pick_format, tool_format

WEATHER = ToolCall("get_weather", '{"city": "Paris", "unit": "celsius"}')
TIME = ToolCall("get_time", '{"zone": "CET"}')
KNOWN = {"get_weather", "get_time"}


def accept(call: ToolCall) -> bool:
    return call.name in KNOWN


def run(fmt: str, text: str, chunk: int | None = None) -> tuple[str, list[ToolCall]]:
    stream = ToolCallStream(tool_format(fmt), accept)
    if chunk is None:
        piece = stream.feed(text, final=True)
        return piece.content, list(piece.calls)
    content, calls = [], []
    for start in range(0, len(text), chunk):
        piece = stream.feed(text[start:start + chunk])
        content.append(piece.content)
        calls += piece.calls
    piece = stream.feed("", final=True)
    return "".join(content) + piece.content, calls + list(piece.calls)


def _norm(calls):
    return [(c.name, json.loads(c.arguments)) for c in calls]


CASES = [
    # Qwen2.5-7B-Instruct's template teaches this (hermes)
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
               '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>',
     "Let me check.\n", [WEATHER, TIME]),
    ("hermes", "No tools needed: 2 < 3 and <tool is not a tag.", "No tools needed: 2 < 3 and <tool is not a tag.", []),
    # Llama 3.1's JSON-based tool calling (the <|python_tag|> is a special token: already dropped)
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}', "", [WEATHER]),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}; '
                    '{"name": "get_time", "parameters": {"zone": "CET"}}', "", [WEATHER, TIME]),
    ("llama3_json", "The answer is {x}.", "The answer is {x}.", []),
    # Mistral-7B-Instruct-v0.3 (v3 tokenizer) and v11+ tokenizers
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}, '
                '{"name": "get_time", "arguments": {"zone": "CET"}}]', "", [WEATHER, TIME]),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "celsius"}[TOOL_CALLS]get_time[ARGS]{"zone": "CET"}',
     "", [WEATHER, TIME]),
    # [TOOL_CALLS] is a special token in Mistral's v3 tokenizer: the detokenized answer starts at the array
    ("mistral", '[{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}]', "", [WEATHER]),
    ("mistral", "[1] is a citation.", "[1] is a citation.", []),
]


@pytest.mark.parametrize("fmt, text, content, calls", CASES)
@pytest.mark.parametrize("chunk", [None, 1, 3, 7])
def test_parsers_whole_and_streamed(fmt, text, content, calls, chunk):
    got_content, got_calls = run(fmt, text, chunk)
    assert got_content == content
    assert _norm(got_calls) == _norm(calls)


@pytest.mark.parametrize("fmt, text", [
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'),          # cut off mid-call
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": }}\n</tool_call>'),  # bad JSON
    ("hermes", '<tool_call>\n{"name": "delete_everything", "arguments": {}}\n</tool_call>'),   # unknown tool
    ("hermes", '<tool_call>\n{"arguments": {"city": "Paris"}}\n</tool_call>'),                 # no name
    ("llama3_json", '{"name": "get_weather", "parameters": {"city"'),
    ("llama3_json", '{"name": "get_weather", "parameters": "not an object"}'),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"'),
    ("mistral", '[TOOL_CALLS]{"oops": 1}'),
])

@pytest.mark.parametrize("chunk", [None, 1, 5])
def test_malformed_or_unfinished_calls_come_back_as_text(fmt, text, chunk):
    content, calls = run(fmt, text, chunk)
    assert calls == []
    assert content == text


def test_a_mistral_array_with_one_unknown_function_keeps_the_good_call():
    text = '[TOOL_CALLS][{"name": "get_time", "arguments": {"zone": "CET"}}, {"name": "nope", "arguments": {}}]'
    for chunk in (None, 2):
        content, calls = run("mistral", text, chunk)
        assert _norm(calls) == _norm([TIME]) and content == '{"name": "nope", "arguments": {}}'


def test_streaming_emits_each_call_as_soon_as_it_is_complete_and_holds_partial_markers():
    stream = ToolCallStream(tool_format("hermes"), accept)
    assert stream.feed("Checking <tool").content == "Checking "       # '<tool' may open a call: held
    piece = stream.feed('_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>')
    assert piece.content == "" and _norm(piece.calls) == _norm([TIME])
    assert stream.feed("\n<tool_call>\n{").calls == ()                 # the second call is unfinished
    piece = stream.feed('"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>')
    assert _norm(piece.calls) == _norm([WEATHER])
    assert stream.feed(" Done.", final=True).content.strip() == "Done."


def test_write_then_parse_round_trips_for_every_format():
    for name in ("hermes", "llama3_json", "mistral"):
        fmt = tool_format(name)
        content, calls = run(name, fmt.write([WEATHER, TIME]))
        assert content.strip() == "" and _norm(calls) == _norm([WEATHER, TIME]), name


def test_auto_picks_the_format_from_the_chat_template():
    assert pick_format("auto", "{{ '<tool_call>' }}").name == "hermes"
    assert pick_format("auto", "{%- if tools %}[AVAILABLE_TOOLS]{%- endif %}[TOOL_CALLS]").name == "mistral"
    assert pick_format("auto", "<|start_header_id|>ipython<|end_header_id|>{{ '<|python_tag|>' }}").name == "llama3_json"
    assert pick_format("auto", "{{ message.content }}").name == "hermes"          # no tool syntax: chatml's
    assert pick_format("mistral", "<tool_call>").name == "mistral"
    with pytest.raises(ValueError, match="hermes"):
        tool_format("nope")


@pytest.mark.parametrize("parser, text, reasoning, content", [
    ("think", "<think>\nThe user wants 2+2.\n</think>\n\n4", "\nThe user wants 2+2.\n", "4"),
    ("think", "4, no thinking", "", "4, no thinking"),
    ("deepseek_r1", "2+2 is 4.</think>The answer is 4.", "2+2 is 4.", "The answer is 4."),
    ("deepseek_r1", "still thinking when cut off", "still thinking when cut off", ""),
    ("think", "<think>never closed", "never closed", ""),
])
@pytest.mark.parametrize("chunk", [None, 1, 4])
def test_reasoning_parser(parser, text, reasoning, content, chunk):
    stream = ReasoningStream(parser)
    pieces = [stream.feed(text, final=True)] if chunk is None else \
        [stream.feed(text[i:i + chunk]) for i in range(0, len(text), chunk)] + [stream.feed("", final=True)]
    assert "".join(p.reasoning for p in pieces) == reasoning
    assert "".join(p.content for p in pieces) == content


def test_tool_calls_are_looked_for_after_the_reasoning():
    text = '<think>I should call <tool_call> get_time.</think>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'
    reasoning = ReasoningStream("think")
    tools = ToolCallStream(tool_format("hermes"), accept)
    thought, calls, content = [], [], []
    for i in range(0, len(text), 3):
        piece = reasoning.feed(text[i:i + 3])
        thought.append(piece.reasoning)
        out = tools.feed(piece.content)
        calls += out.calls
        content.append(out.content)
    last = tools.feed(reasoning.feed("", final=True).content, final=True)
    calls += last.calls
    assert "".join(thought) == "I should call <tool_call> get_time."
    assert _norm(calls) == _norm([TIME]) and "".join(content) + last.content == ""


def test_forced_call_grammars_take_valid_calls_and_refuse_invalid_arguments(default_model_dir):
    """The grammar each format forces (tool_choice required / named) with llguidance on the default tokenizer."""
    from transformers import AutoTokenizer

    from loraplex.server.engine.constraints.compiler import ConstraintCompiler
    from loraplex.server.engine.constraints.spec import Constraint

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    compiler = ConstraintCompiler(tokenizer, len(tokenizer), (tokenizer.eos_token_id,))
    weather = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
               "properties": {"city": {"type": "string", "enum": ["Paris", "Tokyo"]},
                              "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}
    functions = [("get_weather", weather), ("get_time", {"type": "object", "properties": {"zone": {"type": "string"}}})]

    def accepts(grammar: str, text: str) -> bool:
        guide = compiler.guide(Constraint("grammar", grammar))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return all(guide.accept(t) for t in ids) and guide.matcher.is_accepting()

    for name in ("hermes", "llama3_json", "mistral"):
        fmt = tool_format(name)
        two = fmt.write([WEATHER, TIME])
        assert accepts(fmt.grammar(functions, 2), two), name
        assert not accepts(fmt.grammar(functions, 1), two), name                  # parallel_tool_calls false
        assert not accepts(fmt.grammar(functions, 2), fmt.write([ToolCall("get_weather", '{"city": "Berlin", "unit": "celsius"}')]))
        assert not accepts(fmt.grammar(functions[1:], 1), fmt.write([WEATHER])), name  # a named function only
    compiler.close()
