"""Request bodies of the OpenAI-compatible API (pydantic), with every accepted parameter.

Unknown fields are collected (`extra="allow"`) so the converter can refuse them by name:
the API never ignores a parameter silently.
"""

from __future__ import annotations

from typing import Any, Union

from pydantic import BaseModel, ConfigDict, Field

MAX_N = 16                      # completions per prompt


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False


class SamplingFields(BaseModel):
    """Parameters shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = Field(default=None, ge=1, le=MAX_N)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None                 # OpenAI's end-user id: accepted, not used
    # extensions (vLLM / TGI names)
    top_k: int | None = Field(default=None, ge=-1)
    repetition_penalty: float | None = None
    ignore_eos: bool | None = False
    min_tokens: int | None = Field(default=None, ge=0)
    stop_token_ids: list[int] | None = None
    return_tokens_as_token_ids: bool | None = False
    skip_special_tokens: bool | None = None   # None: True, False for a chat with tools whose parser needs them

    def extras(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: str
    content: Union[str, list[dict[str, Any]], None] = None
    name: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    tokens: list[int]


class LoadLoraRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    lora_name: str
    lora_path: str
    private: bool = False                   # loraplex extension: owned by the caller's tenant


class UnloadLoraRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    lora_name: str
    lora_int_id: int | None = None          # vLLM sends it; ignored (names identify adapters here)
