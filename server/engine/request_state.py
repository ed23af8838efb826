"""Per-request bookkeeping the engine keeps beside the scheduler's Sequence."""

from __future__ import annotations

from dataclasses import dataclass

from .detokenizer import IncrementalDetokenizer
from .io import GenerationRequest, RequestOutput, Timing
from .sequence import FinishReason, Sequence
from .stop import StopChecker


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
    """Links a GenerationRequest to its Sequence and turns new tokens into text deltas."""

    request: GenerationRequest
    seq: Sequence
    detokenizer: IncrementalDetokenizer
    stop: StopChecker
    num_emitted_tokens: int = 0     # output tokens already sent to the caller
    stopped_by_text: bool = False

    def take_delta(self) -> Delta:
        """Detokenize tokens generated since the last call; apply stop strings.

        Returns the text safe to emit, the new token ids, their logprobs and top alternatives
        (when asked); sets stopped_by_text when a stop string was found (the text never
        includes it).
        """
        seq = self.seq
        start = self.num_emitted_tokens
        new_ids = seq.output_token_ids[start:]
        new_logprobs = seq.output_logprobs[start:] if seq.sampling.returns_logprobs else []
        new_top = seq.output_top_logprobs[start:] if seq.sampling.top_logprobs else []
        self.num_emitted_tokens = seq.num_output_tokens
        text = ""
        if new_ids and not self.stopped_by_text:
            text, self.stopped_by_text = self.stop.feed(self.detokenizer.add(new_ids))
        return Delta(text, tuple(new_ids), tuple(new_logprobs), tuple(new_top))

    def output(self, now: float, delta: Delta = EMPTY_DELTA) -> RequestOutput:
        seq = self.seq
        text = delta.text
        reason = seq.finish_reason if seq.is_finished else None
        if reason is not None and not self.stopped_by_text and reason is not FinishReason.ABORT:
            tail, self.stopped_by_text = self.stop.feed(self.detokenizer.flush())
            text += tail if self.stopped_by_text else tail + self.stop.flush()
        timing = self._timing(now) if reason is not None else None
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
