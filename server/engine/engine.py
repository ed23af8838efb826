"""The synchronous engine: add_request / abort / step over scheduler + runner."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

from .adapters import AdapterGateway
from .batch import RunnerOutput, ScheduledBatch
from .config import EngineConfig
from .detokenizer import IncrementalDetokenizer
from .io import (AdapterUnavailable, EngineError, EngineStats, GenerationRequest, QueueFull,
                 RequestFailed, RequestOutput, RequestRejected)
from .prompt import encode_prompt, render_chat
from .request_state import EMPTY_DELTA, Delta, RequestState
from .scheduler import Scheduler
from .sequence import FinishReason, Sequence
from .stop import StopChecker
from .validation import check_prompt, validate_request

log = logging.getLogger("loraplex.engine")


@dataclass(frozen=True)
class StepStats:
    """What one step did; exported to metrics by listeners."""

    batch_size: int
    batch_tokens: int
    step_seconds: float
    num_running: int
    num_waiting: int
    kv_usage: float
    active_adapters: int
    num_preempted: int
    num_finished: int


class LLMEngine:
    """Single-threaded core. Only the thread that calls `step` may touch the scheduler."""

    def __init__(self, config: EngineConfig, scheduler: Scheduler, runner: Any, tokenizer: Any,
                 eos_token_ids: tuple[int, ...], adapters: AdapterGateway | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.scheduler = scheduler
        self.runner = runner
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.adapters = adapters
        self.clock = clock
        self._states: dict[str, RequestState] = {}
        self._by_seq: dict[int, RequestState] = {}
        self._next_seq_id = 0
        self._last_batch: ScheduledBatch | None = None

    # ---- intake ---------------------------------------------------------------------
    def tokenize(self, request: GenerationRequest) -> list[int]:
        """The prompt's token ids (prompt_token_ids as given, chat rendered, or text encoded)."""
        if request.prompt_token_ids is not None:
            return list(request.prompt_token_ids)
        if request.messages is not None:
            try:
                return render_chat(self.tokenizer, request.messages)
            except ValueError as error:
                raise RequestRejected("messages", str(error)) from None
        return encode_prompt(self.tokenizer, request.prompt)

    def add_request(self, request: GenerationRequest, prompt_ids: list[int] | None = None) -> None:
        """Validate and queue a request. Raises RequestRejected, QueueFull, store errors."""
        if request.request_id in self._states:
            raise RequestRejected("request_id", f"duplicate request id {request.request_id!r}")
        if self.scheduler.queue_full:
            raise QueueFull(f"{self.scheduler.num_waiting} requests are queued; retry later")
        limits = self.config.limits
        request = validate_request(request, limits)
        if prompt_ids is None:
            prompt_ids = self.tokenize(request)
        violations = check_prompt(request, prompt_ids, limits, self.config.scheduler.max_model_len,
                                  getattr(self.runner, "vocab_size", None))
        if violations:
            raise RequestRejected.of(violations)
        adapter_key = self._resolve_adapter(request)
        seq = Sequence(seq_id=self._next_seq_id, prompt_token_ids=prompt_ids,
                       sampling=request.sampling, adapter_key=adapter_key,
                       arrival_time=self.clock(), eos_token_ids=self.eos_token_ids)
        self._next_seq_id += 1
        try:
            self.scheduler.add(seq)
        except ValueError as error:
            self._release(adapter_key)
            raise RequestRejected("sampling.max_new_tokens", str(error)) from None
        state = RequestState(request=request, seq=seq,
                             detokenizer=IncrementalDetokenizer(self.tokenizer, prompt_ids),
                             stop=StopChecker(tuple(request.sampling.stop)))
        self._states[request.request_id] = state
        self._by_seq[seq.seq_id] = state

    def _resolve_adapter(self, request: GenerationRequest) -> str | None:
        if not request.adapter_id:
            return None
        if self.adapters is None:
            raise RequestRejected("adapter_id", "this server was started without adapters")
        return self.adapters.resolve(request.adapter_id, request.tenant)

    def _release(self, adapter_key: str | None) -> None:
        if adapter_key and self.adapters is not None:
            self.adapters.release(adapter_key)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Drop a request now; its KV blocks are freed before this returns."""
        state = self._states.get(request_id)
        if state is None:
            return None
        self.scheduler.abort(state.seq.seq_id)
        return self._finalize(state)

    # ---- the step loop --------------------------------------------------------------
    def has_work(self) -> bool:
        return self.scheduler.has_unfinished

    def step(self) -> tuple[list[RequestOutput], StepStats]:
        started = self.clock()
        outputs = self._fail_unloadable_adapters()
        ready = self.adapters.ready if self.adapters is not None else (lambda _key: True)
        batch = self.scheduler.schedule(ready)
        if self.adapters is not None:
            self.adapters.prefetch(self.scheduler.pending_adapter_keys()[: self.config.scheduler.max_loras])
        if not batch.is_empty:
            result = self._run(batch)
            finished = self.scheduler.update(batch, result)
            outputs += self._collect(batch, finished)
        self._last_batch = batch
        return outputs, self._step_stats(batch, self.clock() - started, outputs)

    def _run(self, batch: ScheduledBatch) -> RunnerOutput:
        slots = self.adapters.activate(batch.adapter_keys) if self.adapters is not None else {}
        try:
            return self.runner.run(batch, slots)
        except Exception:  # noqa: BLE001 - isolate the failure to the requests that cause it
            log.exception("forward pass failed; re-running the %d requests of this batch one by one",
                          batch.num_seqs)
        return self._run_isolated(batch, slots)

    def _run_isolated(self, batch: ScheduledBatch, slots: dict[str, int]) -> RunnerOutput:
        """Re-run each item alone; fail only the items whose own forward pass raises.

        Safe because nothing was advanced by the failed attempt: each item recomputes the same
        positions into the same KV slots, and sampling seeds do not depend on the batch. A
        failed item gets no token: it is listed in `failed_seq_ids` and finished with ERROR.
        """
        tokens: dict[int, int] = {}
        logprobs: dict[int, float] = {}
        alternatives: dict[int, tuple[tuple[int, float], ...]] = {}
        failed: set[int] = set()
        for item in batch.items:
            try:
                out = self.runner.run(ScheduledBatch(items=(item,)), slots)
            except Exception:  # noqa: BLE001 - this request's own failure
                log.exception("request sequence %d failed inside the engine", item.seq.seq_id)
                failed.add(item.seq.seq_id)
                continue
            tokens.update(out.sampled_token_ids)
            logprobs.update(out.logprobs or {})
            alternatives.update(out.top_logprobs or {})
        wants_logprobs = any(item.seq.sampling.returns_logprobs for item in batch.sampled_items)
        wants_top = any(item.seq.sampling.top_logprobs for item in batch.sampled_items)
        return RunnerOutput(sampled_token_ids=tokens, logprobs=logprobs if wants_logprobs else None,
                            top_logprobs=alternatives if wants_top else None, failed_seq_ids=frozenset(failed))

    def _collect(self, batch: ScheduledBatch, finished: list[Sequence]) -> list[RequestOutput]:
        outputs = []
        done = {seq.seq_id for seq in finished}
        for item in batch.items:
            state = self._by_seq.get(item.seq.seq_id)
            if state is None or not (item.sample or item.seq.seq_id in done):
                continue
            delta = state.take_delta()
            if state.stopped_by_text and not state.seq.is_finished:
                self.scheduler.finish(state.seq, FinishReason.STOP)
            if state.seq.is_finished:
                outputs.append(self._finalize(state, delta))
            elif delta.text or delta.token_ids:
                outputs.append(state.output(self.clock(), delta))
        return outputs

    def _finalize(self, state: RequestState, delta: Delta = EMPTY_DELTA,
                  error: EngineError | None = None) -> RequestOutput:
        self._states.pop(state.request.request_id, None)
        self._by_seq.pop(state.seq.seq_id, None)
        self._release(state.seq.adapter_key)
        output = state.output(self.clock(), delta)
        if output.finish_reason is FinishReason.ERROR:
            output = replace(output, error=error or RequestFailed("the request failed inside the engine"))
        return output

    def _fail_unloadable_adapters(self) -> list[RequestOutput]:
        if self.adapters is None:
            return []
        failures = self.adapters.take_failures()
        outputs = []
        for state in [s for s in self._states.values() if s.seq.adapter_key in failures]:
            if state.seq.is_finished:
                continue
            log.warning("adapter %s could not be loaded: %s", state.seq.adapter_key,
                        failures[state.seq.adapter_key])
            self.scheduler.finish(state.seq, FinishReason.ERROR)
            message = f"adapter {state.seq.adapter_key} cannot be served: {failures[state.seq.adapter_key]}"
            outputs.append(self._finalize(state, error=AdapterUnavailable(message)))
        return outputs

    # ---- introspection --------------------------------------------------------------
    def _step_stats(self, batch: ScheduledBatch, seconds: float, outputs: list[RequestOutput]) -> StepStats:
        stats = self.stats()
        return StepStats(batch_size=batch.num_seqs, batch_tokens=batch.num_tokens, step_seconds=seconds,
                         num_running=stats.num_running, num_waiting=stats.num_waiting,
                         kv_usage=stats.kv_usage, active_adapters=len(batch.adapter_keys),
                         num_preempted=len(batch.preempted),
                         num_finished=sum(1 for o in outputs if o.finished))

    def stats(self) -> EngineStats:
        blocks = self.scheduler.blocks
        last = self._last_batch
        manager = self.adapters.manager if self.adapters is not None else None
        return EngineStats(
            num_running=self.scheduler.num_running, num_waiting=self.scheduler.num_waiting,
            num_free_blocks=blocks.num_free_blocks, num_total_blocks=blocks.num_blocks,
            num_active_adapters=len(last.adapter_keys) if last else 0,
            num_loaded_slots=manager.num_loaded if manager is not None else 0,
            last_batch_size=last.num_seqs if last else 0,
            last_batch_tokens=last.num_tokens if last else 0,
            total_preemptions=self.scheduler.total_preemptions,
            running_adapters=self.scheduler.running_adapter_keys,
            waiting_adapters=tuple(dict.fromkeys(self.scheduler.pending_adapter_keys())),
            max_loras=self.config.scheduler.max_loras,
        )
