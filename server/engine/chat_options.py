"""ChatOptions: what a chat request asks of the chat template beyond (role, content) pairs.

Plain data (JSON text, not live objects), so that a request crosses to an engine process as
it is. Front ends fill it from their wire format (OpenAI's tools / tool_calls / tool_call_id,
chat_template_kwargs, ...); chat_template.py turns it into the template's variables.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChatOptions:
    message_fields: tuple[str, ...] = ()   # per message: JSON object of extra fields (tool_calls, tool_call_id, name) or ""
    tools: str = ""                        # JSON list of tool definitions ({"type": "function", "function": {...}})
    documents: str = ""                    # JSON list of documents (RAG templates)
    template_kwargs: str = ""              # JSON object: extra template variables (e.g. enable_thinking)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str = ""                # a request's own template (front ends allow it for admin keys only)
    tool_format: str = "hermes"            # how calls are written into prompts whose template has no tool support

    @property
    def num_bytes(self) -> int:
        """UTF-8 bytes of the data the template receives besides the messages' content (the
        template itself has its own limit: chat_template.TemplateLimits)."""
        parts = (*self.message_fields, self.tools, self.documents, self.template_kwargs)
        return sum(len(part.encode("utf-8", "surrogatepass")) for part in parts)
