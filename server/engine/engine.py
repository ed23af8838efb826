"""The synchronous engine: add_request / abort / step over scheduler + runner."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

from ...adapters_store.errors import StoreError
from .adapters import AdapterGateway
from .batch import RunnerOutput, ScheduledBatch
from .config import EngineConfig
from .constraints.spec import ConstraintError
from .adapter_tokenizers import AdapterTokenizers, RequestTokenizer
from .intake import Intake
from .io import (EngineError, EngineStats, GenerationRequest, QueueFull,
                 RequestFailed, RequestOutput, RequestRejected, ValidatedRequest)
from .chat_template import ChatRenderer
from .prompt_ids import OWN_VOCAB_CONSTRAINT, PromptIds
from .request_state import EMPTY_DELTA, Delta, RequestState
from .scheduler import Scheduler
from .sequence import FinishReason, Sequence
from .text_stream import TextStream

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
    prefix_query_tokens: int = 0     # prompt tokens looked up in the prefix cache this step
    prefix_hit_tokens: int = 0       # ... of which found cached
    prefix_evicted_blocks: int = 0   # cached blocks evicted for new allocations this step


class LLMEngine:
    """Single-threaded core. Only the thread that calls `step` may touch the scheduler."""

    def __init__(self, config: EngineConfig, scheduler: Scheduler, runner: Any, tokenizer: Any,
                 eos_token_ids: tuple[int, ...], adapters: AdapterGateway | None = None,
                 clock: Callable[[], float] = time.monotonic, constraints: Any = None, guided: Any = None,
                 tokenizers: AdapterTokenizers | None = None, detokenize: bool = True):
        """constraints: a ConstraintCompiler, guided: the GuidedDecoding whose hook the runner's
        sampler calls (both None: structured output is refused). tokenizers: each request's
        tokenizer (an adapter with a resized vocabulary has its own; default: the base's).
        detokenize=False: outputs carry token ids, logprobs, finish reasons, usage and timing but
        no text, and stop strings are not matched (the engine-core process: its front end does
        both, text_stream.py)."""
        self.config = config
        self.constraints = constraints
        self.guided = guided
        self.scheduler = scheduler
        self.runner = runner
        self.tokenizer = tokenizer
        self.chat = ChatRenderer(tokenizer)
        self.eos_token_ids = eos_token_ids
        self.adapters = adapters
        self.clock = clock
        self.detokenize = detokenize
        self._states: dict[str, RequestState] = {}
        self._by_seq: dict[int, RequestState] = {}
        self._next_seq_id = 0
        self._last_batch: ScheduledBatch | None = None
        self._prefix_seen = scheduler.blocks.stats      # cumulative counters at the last step
        self.tokenizers = tokenizers or AdapterTokenizers(tokenizer, getattr(runner, "vocab_size", None))
        self.prompts = PromptIds(tokenizer, self.chat, config.limits.max_input_tokens, self.adapter_template,
                                 self.tokenizers)
        self.max_prompt_bytes = self.prompts.max_prompt_bytes
        self.intake = Intake(config, self.prompts, getattr(runner, "vocab_size", None))

    # ---- intake ---------------------------------------------------------------------
    def render_with_options(self, messages: tuple[tuple[str, str], ...], options: Any,
                            template: str | None = None) -> list[int]:
        """A chat with template options (chat_template.py); template: an adapter's own."""
        return self.prompts.with_options(messages, options, template)

    def adapter_template(self, adapter_id: str | None, tenant: str | None) -> str | None:
        """The chat template an adapter version carries (None: the base model's). An unknown
        adapter renders with the base's; resolving it for the request reports the error."""
        if not adapter_id or self.adapters is None:
            return None
        try:
            return self.adapters.store.resolve(adapter_id, tenant).chat_template
        except StoreError:
            return None

    def compile_constraint(self, request: GenerationRequest) -> Any:
        """The request's Guide (None when unconstrained); compiles on this thread if needed."""
        if request.sampling.constraint is None:
            return None
        if not self.prompts.for_request(request).is_base:
            raise RequestRejected("sampling.constraint", OWN_VOCAB_CONSTRAINT)
        if self.constraints is None or self.guided is None:
            raise RequestRejected("sampling.constraint", "this server does not support structured output")
        try:
            return self.constraints.guide(request.sampling.constraint)
        except ConstraintError as error:
            raise RequestRejected("sampling.constraint", str(error)) from None

    def add_request(self, request: GenerationRequest | ValidatedRequest, guide: Any = None) -> None:
        """Queue a request. Raises RequestRejected, QueueFull, store errors.

        A ValidatedRequest (intake.py; both EngineClients pass one) is queued as it is; a bare
        GenerationRequest (warm-up, tests, benchmarks) goes through `intake` here first, on this
        thread. guide: the constraint's compiled Guide (the EngineClients compile it off this
        thread); None with a constraint set compiles it here."""
        request_id = (request.request if isinstance(request, ValidatedRequest) else request).request_id
        if request_id in self._states:
            raise RequestRejected("request_id", f"duplicate request id {request_id!r}")
        if self.scheduler.queue_full:
            raise QueueFull(f"{self.scheduler.num_waiting} requests are queued; retry later")
        if not isinstance(request, ValidatedRequest):
            request = self.intake.prepare(request)
        request, prompt_ids, tokenizer_key = request.request, request.prompt_ids, request.tokenizer_key
        if guide is None:
            guide = self.compile_constraint(request)
        adapter_key = self._resolve_adapter(request)
        own = self._own_tokenizer(adapter_key)          # the tokenizer (and eos) of the request's ids
        if own.adapter_key != tokenizer_key:
            self._release(adapter_key)
            raise RequestRejected("adapter_id", f"adapter {request.adapter_id!r} now resolves to {adapter_key}, "
                                  f"whose vocabulary differs from the version the prompt was tokenized for; "
                                  f"retry (or pin a version, name@N)")
        seq = Sequence(seq_id=self._next_seq_id, prompt_token_ids=prompt_ids,
                       sampling=request.sampling, adapter_key=adapter_key,
                       arrival_time=self.clock(), eos_token_ids=self._eos_ids(own), guide=guide)
        self._next_seq_id += 1
        try:
            self.scheduler.add(seq)
        except ValueError as error:
            self._release(adapter_key)
            raise RequestRejected("sampling.max_new_tokens", str(error)) from None
        text = (TextStream(own.tokenizer, prompt_ids, request.sampling.stop, request.sampling.skip_special_tokens)
                if self.detokenize else None)
        state = RequestState(request=request, seq=seq, text=text)
        self._states[request.request_id] = state
        self._by_seq[seq.seq_id] = state

    def _own_tokenizer(self, adapter_key: str | None) -> RequestTokenizer:
        """The tokenizer of a request on `adapter_key`: its version's own (a resized vocabulary,
        loaded once per version) or the base's; no registry query (the gateway resolved it)."""
        vocab_size = self.adapters.vocab_size(adapter_key) if adapter_key and self.adapters is not None else 0
        return self.tokenizers.for_key(adapter_key, vocab_size) if vocab_size else self.tokenizers.base

    def _eos_ids(self, own: RequestTokenizer) -> tuple[int, ...]:
        """The base's end-of-sequence ids, plus an adapter's own tokenizer's eos (e.g. an added token)."""
        if own.is_base:
            return self.eos_token_ids
        eos = getattr(own.tokenizer, "eos_token_id", None)
        return tuple(dict.fromkeys((*self.eos_token_ids, *([eos] if isinstance(eos, int) else []))))

    def _resolve_adapter(self, request: GenerationRequest) -> str | None:
        if not request.adapter_id:
            return None
        if self.adapters is None:
            raise RequestRejected("adapter_id", "this server was started without adapters")
        return self.adapters.resolve(request.adapter_id, request.tenant)

    def _release(self, adapter_key: str | None) -> None:
        if adapter_key and self.adapters is not None:
            self.adapters.release(adapter_key)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached KV block (between steps; running requests keep theirs).
        False when prefix caching is off (there is nothing to reset)."""
        self.scheduler.blocks.reset()
        return self.scheduler.blocks.enable_caching

    def forget_adapter_blocks(self, adapter_keys: list[str]) -> int:
        """Drop the cached KV blocks computed with deleted adapters first (between steps)."""
        return sum(self.scheduler.blocks.drop_adapter(key) for key in adapter_keys)

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
            try:
                result = self._run_guided(batch) if self.guided is not None else self._run(batch)
                finished = self.scheduler.update(batch, result)
                outputs += self._collect(batch, finished)
            except Exception:  # noqa: BLE001 - last resort: fail this batch once, never loop on it
                log.exception("engine step failed; failing the %d requests of this batch", batch.num_seqs)
                outputs += self._fail_batch(batch)
        self._last_batch = batch
        return outputs, self._step_stats(batch, self.clock() - started, outputs)

    def _run(self, batch: ScheduledBatch) -> RunnerOutput:
        slots, bad_keys = self._activate(batch.adapter_keys)
        if bad_keys:
            return self._run_isolated(batch, slots, bad_keys)
        try:
            return self.runner.run(batch, slots)
        except Exception:  # noqa: BLE001 - isolate the failure to the requests that cause it
            log.exception("forward pass failed; re-running the %d requests of this batch one by one",
                          batch.num_seqs)
        return self._run_isolated(batch, slots)

    def _activate(self, keys: set[str]) -> tuple[dict[str, int], set[str]]:
        """Device slots for the batch's adapters, and the keys whose slot load raised.

        On a failure each key is retried alone, so one bad adapter fails only its own requests
        (once: they finish with an error) and the rest of the batch still runs.
        """
        if self.adapters is None or not keys:
            return {}, set()
        try:
            return self.adapters.activate(keys), set()
        except Exception:  # noqa: BLE001 - found per key below
            pass
        slots: dict[str, int] = {}
        bad: set[str] = set()
        for key in sorted(keys):
            try:
                slots.update(self.adapters.activate({key}))
            except Exception:  # noqa: BLE001 - this adapter's own failure
                log.exception("adapter %s could not be loaded into a device slot", key)
                bad.add(key)
        return {key: slot for key, slot in slots.items() if self.adapters.manager.slot_of(key) == slot}, bad

    def _run_guided(self, batch: ScheduledBatch) -> RunnerOutput:
        """_run with the constrained rows' masks computed beside the forward, then each guide
        advanced by its token; a token its grammar refuses fails that request."""
        seqs = [item.seq for item in batch.sampled_items]
        self.guided.begin_step(seqs)
        result = self._run(batch)
        refused = self.guided.end_step(seqs, result.sampled_token_ids)
        if not refused:
            return result
        for seq in seqs:
            if seq.seq_id in refused:
                what = "the request's constraint ended it" if seq.guide.request_fault else "the constraint failed"
                log.warning("sequence %d: %s: %s", seq.seq_id, what, seq.guide.error)
        return replace(result, failed_seq_ids=result.failed_seq_ids | frozenset(refused))

    def _run_isolated(self, batch: ScheduledBatch, slots: dict[str, int],
                      bad_keys: set[str] = frozenset()) -> RunnerOutput:
        """Re-run each item alone; fail only the items whose own forward pass (or adapter) fails.

        Safe because nothing was advanced by the failed attempt: each item recomputes the same
        positions into the same KV slots, and sampling seeds do not depend on the batch. A
        failed item gets no token: it is listed in `failed_seq_ids` and finished with ERROR.
        """
        tokens: dict[int, int] = {}
        logprobs: dict[int, float] = {}
        alternatives: dict[int, tuple[tuple[int, float], ...]] = {}
        failed: set[int] = set()
        failed_blocks: set[int] = set()      # K/V a failed item may have left half written
        for item in batch.items:
            try:
                if failed_blocks.intersection(item.seq.block_table):
                    raise RequestFailed("a prefix-cache block this request shares failed to compute")
                if item.seq.adapter_key in bad_keys or (item.seq.adapter_key and item.seq.adapter_key not in slots):
                    raise RequestFailed(f"adapter {item.seq.adapter_key} could not be loaded into a device slot")
                out = self.runner.run(ScheduledBatch(items=(item,)), slots)
            except Exception:  # noqa: BLE001 - this request's own failure
                log.exception("request sequence %d failed inside the engine", item.seq.seq_id)
                failed.add(item.seq.seq_id)
                bs = self.scheduler.blocks.block_size      # the blocks it was writing
                failed_blocks.update(item.seq.block_table[item.start // bs:-(-(item.start + item.num_new_tokens) // bs)])
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
            guide = state.seq.guide
            if error is None and guide is not None and guide.error is not None:
                error = (RequestRejected("sampling.constraint", guide.error) if guide.request_fault
                         else RequestFailed(f"the output constraint failed: {guide.error}"))
            output = replace(output, error=error or RequestFailed("the request failed inside the engine"))
        return output

    def _fail_batch(self, batch: ScheduledBatch) -> list[RequestOutput]:
        outputs = []
        for item in batch.items:
            state = self._by_seq.get(item.seq.seq_id)
            if state is None:
                continue
            if not state.seq.is_finished:
                self.scheduler.finish(state.seq, FinishReason.ERROR)
            outputs.append(self._finalize(state, error=RequestFailed("the request failed inside the engine")))
        return outputs

    def _fail_unloadable_adapters(self) -> list[RequestOutput]:
        if self.adapters is None:
            return []
        failures = self.adapters.take_failures()
        outputs = []
        for state in [s for s in self._states.values() if s.seq.adapter_key in failures]:
            if state.seq.is_finished:
                continue
            failure = failures[state.seq.adapter_key]
            log.warning("adapter %s could not be loaded: %s", state.seq.adapter_key, failure)
            self.scheduler.finish(state.seq, FinishReason.ERROR)
            message = f"adapter {state.seq.adapter_key} cannot be served: {failure}"
            outputs.append(self._finalize(state, error=type(failure)(message)))
        return outputs

    # ---- introspection --------------------------------------------------------------
    def _step_stats(self, batch: ScheduledBatch, seconds: float, outputs: list[RequestOutput]) -> StepStats:
        stats = self.stats()
        prefix, seen = self.scheduler.blocks.stats, self._prefix_seen
        self._prefix_seen = prefix
        return StepStats(batch_size=batch.num_seqs, batch_tokens=batch.num_tokens, step_seconds=seconds,
                         num_running=stats.num_running, num_waiting=stats.num_waiting,
                         kv_usage=stats.kv_usage, active_adapters=len(batch.adapter_keys),
                         num_preempted=len(batch.preempted),
                         num_finished=sum(1 for o in outputs if o.finished),
                         prefix_query_tokens=prefix.query_tokens - seen.query_tokens,
                         prefix_hit_tokens=prefix.hit_tokens - seen.hit_tokens,
                         prefix_evicted_blocks=prefix.evicted_blocks - seen.evicted_blocks)

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
            slot_adapters=manager.resident_keys() if manager is not None else (),
            num_cached_blocks=blocks.num_cached_blocks, prefix_caching=blocks.enable_caching,
        )
