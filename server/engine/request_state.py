"""Per-request bookkeeping the engine keeps beside the scheduler's Sequence."""

from __future__ import annotations

from dataclasses import dataclass

from .io import GenerationRequest, RequestOutput, Timing
from .sequence import Sequence
from .text_stream import TextStream


@dataclass(frozen=True)
class Delta:
    """What a request produced since its previous output."""

    text: str = ""
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[float, ...] = ()
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] = ()


EMPTY_DELTA = Delta()


@dataclass(eq=False)
class RequestState:
    """Links a GenerationRequest to its Sequence and turns new tokens into deltas.

    text: the request's TextStream, or None when this engine produces no text (its outputs
    carry token ids only and the front end detokenizes: the engine-core process). Without one,
    every output carries the request's timing so far, so that a front end that ends the request
    on a stop string reports the timing of the output that completed it.
    """

    request: GenerationRequest
    seq: Sequence
    text: TextStream | None
    num_emitted_tokens: int = 0     # output tokens already sent to the caller

    @property
    def stopped_by_text(self) -> bool:
        return self.text is not None and self.text.stopped

    def take_delta(self) -> Delta:
        """Tokens generated since the last call, their text (stop strings applied, see
        TextStream), their logprobs and top alternatives (when asked)."""
        seq = self.seq
        start = self.num_emitted_tokens
        new_ids = seq.output_token_ids[start:]
        new_logprobs = seq.output_logprobs[start:] if seq.sampling.returns_logprobs else []
        new_top = seq.output_top_logprobs[start:] if seq.sampling.top_logprobs else []
        self.num_emitted_tokens = seq.num_output_tokens
        reason = seq.finish_reason if seq.is_finished else None
        text = self.text.feed(new_ids, reason)[0] if self.text is not None else ""
        return Delta(text, tuple(new_ids), tuple(new_logprobs), tuple(new_top))

    def output(self, now: float, delta: Delta = EMPTY_DELTA) -> RequestOutput:
        seq = self.seq
        text = delta.text
        reason = seq.finish_reason if seq.is_finished else None
        if reason is not None and self.text is not None:
            text += self.text.finish(reason)
        timing = self._timing(now) if reason is not None or self.text is None else None
        return RequestOutput(
            request_id=self.request.request_id, text=text, token_ids=delta.token_ids,
            logprobs=delta.logprobs, top_logprobs=delta.top_logprobs, finish_reason=reason,
            prompt_tokens=seq.num_prompt_tokens, generated_tokens=seq.num_output_tokens, timing=timing,
            adapter_key=seq.adapter_key, cached_tokens=seq.num_cached_tokens,
        )

    def _timing(self, now: float) -> Timing:
        seq = self.seq
        scheduled = seq.first_scheduled_time if seq.first_scheduled_time is not None else now
        first = seq.first_token_time if seq.first_token_time is not None else now
        return Timing(queue_s=max(0.0, scheduled - seq.arrival_time),
                      first_token_s=max(0.0, first - seq.arrival_time),
                      total_s=max(0.0, now - seq.arrival_time))
