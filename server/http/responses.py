"""Engine outputs -> OpenAI response bodies and stream chunks (completions and chat)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..engine.io import RequestOutput
from ..engine.sequence import FinishReason

_FINISH = {FinishReason.LENGTH: "length", FinishReason.EOS: "stop", FinishReason.STOP: "stop",
           FinishReason.ABORT: "abort"}
TokenText = Callable[[int], str]     # token id -> its text in logprobs


def finish_reason(reason: FinishReason | None) -> str | None:
    return _FINISH.get(reason) if reason is not None else None


@dataclass
class ChoiceState:
    """What one choice produced so far (non-streaming responses join it at the end)."""

    index: int
    prompt_owner: bool = True          # first choice of its prompt: counts the prompt in usage
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[tuple[tuple[int, float], ...]] = field(default_factory=list)
    last: RequestOutput | None = None

    def add(self, output: RequestOutput) -> None:
        self.text.append(output.text)
        self.token_ids.extend(output.token_ids)
        self.logprobs.extend(output.logprobs)
        self.top_logprobs.extend(output.top_logprobs)
        self.last = output

    @property
    def finished(self) -> bool:
        return self.last is not None and self.last.finished


# ---- logprobs ---------------------------------------------------------------------------------
def completion_logprobs(token_ids: list[int], logprobs: list[float], tops: list, text_of: TokenText,
                        offset: int = 0) -> dict[str, Any]:
    """The legacy completions `logprobs` object: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens = [text_of(t) for t in token_ids]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    top = [{text_of(t): lp for t, lp in alts} for alts in tops] if tops else None
    return {"tokens": tokens, "token_logprobs": list(logprobs), "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(token_ids: list[int], logprobs: list[float], tops: list, text_of: TokenText) -> dict[str, Any]:
    """The chat `logprobs` object: content = one entry per token with its top alternatives."""
    content = []
    for k, (token_id, logprob) in enumerate(zip(token_ids, logprobs)):
        alternatives = tops[k] if k < len(tops) else ()
        content.append({**_token_entry(text_of(token_id), logprob),
                        "top_logprobs": [_token_entry(text_of(t), lp) for t, lp in alternatives]})
    return {"content": content, "refusal": None}


def _token_entry(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


# ---- whole responses --------------------------------------------------------------------------
@dataclass(frozen=True)
class ResponseMeta:
    id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))


def completion_body(meta: ResponseMeta, states: list[ChoiceState], want_logprobs: bool,
                    text_of: TokenText) -> dict[str, Any]:
    choices = []
    for state in sorted(states, key=lambda s: s.index):
        logprobs = (completion_logprobs(state.token_ids, state.logprobs, state.top_logprobs, text_of)
                    if want_logprobs else None)
        choices.append({"index": state.index, "text": "".join(state.text), "logprobs": logprobs,
                        "finish_reason": finish_reason(state.last.finish_reason if state.last else None)})
    return {"id": meta.id, "object": "text_completion", "created": meta.created, "model": meta.model,
            "choices": choices, "usage": usage_of(states)}


def chat_body(meta: ResponseMeta, states: list[ChoiceState], want_logprobs: bool,
              text_of: TokenText, shaper: Any = None) -> dict[str, Any]:
    """shaper: a tool_parsers.shaper.ChatShaper (reasoning / tool calls), None = the text as content."""
    choices = []
    for state in sorted(states, key=lambda s: s.index):
        logprobs = (chat_logprobs(state.token_ids, state.logprobs, state.top_logprobs, text_of)
                    if want_logprobs else None)
        reason = finish_reason(state.last.finish_reason if state.last else None)
        message = {"role": "assistant", "content": "".join(state.text)}
        if shaper is not None:
            message, reason = shaper.message(state.index, message["content"], reason)
        choices.append({"index": state.index, "message": message, "logprobs": logprobs, "finish_reason": reason})
    return {"id": meta.id, "object": "chat.completion", "created": meta.created, "model": meta.model,
            "choices": choices, "usage": usage_of(states)}


def usage_of(states: list[ChoiceState]) -> dict[str, Any]:
    """Prompt tokens of each distinct prompt once (n choices of one prompt share it), plus all outputs;
    prompt_tokens_details.cached_tokens: the prompt owners' tokens found in the prefix cache."""
    owners = [s.last for s in states if s.last is not None and s.prompt_owner]
    prompt = sum(last.prompt_tokens for last in owners)
    completion = sum(s.last.generated_tokens for s in states if s.last is not None)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(last.cached_tokens for last in owners)}}


# ---- stream chunks ----------------------------------------------------------------------------
def completion_chunk(meta: ResponseMeta, index: int, output: RequestOutput, want_logprobs: bool,
                     text_of: TokenText, offset: int) -> dict[str, Any]:
    logprobs = (completion_logprobs(list(output.token_ids), list(output.logprobs), list(output.top_logprobs),
                                    text_of, offset) if want_logprobs else None)
    choice = {"index": index, "text": output.text, "logprobs": logprobs,
              "finish_reason": finish_reason(output.finish_reason)}
    return {"id": meta.id, "object": "text_completion", "created": meta.created, "model": meta.model,
            "choices": [choice]}


def chat_chunk(meta: ResponseMeta, index: int, output: RequestOutput | None, want_logprobs: bool,
               text_of: TokenText, shaper: Any = None) -> dict[str, Any]:
    """A chat delta; `output` None = the opening chunk with the assistant role."""
    if output is None:
        choice = {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                  "finish_reason": None}
    else:
        logprobs = (chat_logprobs(list(output.token_ids), list(output.logprobs), list(output.top_logprobs),
                                  text_of) if want_logprobs else None)
        delta = {"content": output.text} if output.text or not output.finished else {}
        reason = finish_reason(output.finish_reason)
        if shaper is not None:
            delta, reason = shaper.delta(index, output.text, output.finished, reason)
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
    return {"id": meta.id, "object": "chat.completion.chunk", "created": meta.created, "model": meta.model,
            "choices": [choice]}


def usage_chunk(meta: ResponseMeta, obj: str, states: list[ChoiceState]) -> dict[str, Any]:
    return {"id": meta.id, "object": obj, "created": meta.created, "model": meta.model, "choices": [],
            "usage": usage_of(states)}
