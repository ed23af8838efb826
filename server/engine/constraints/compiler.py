"""Constraint -> llguidance matcher: compiled off the engine thread, bounded, cached by hash.

llguidance was chosen over xgrammar (both maintained, both made for LLM decoding) because its
compile step is lazy and bounded: a grammar is checked and its lexer built in milliseconds
under fixed fuel limits, so a pathological schema fails fast with the limit's name instead
of occupying a thread for seconds (xgrammar precomputes a per-token mask cache: 18.8 s for a
20,000-value enum and 1.6 s for 200 nested objects on this CPU, uninterruptible). It also
takes Lark grammars. Its per-token mask (~60 us median for the SmolLM2 vocabulary) is slower
than xgrammar's (~7 us) but is computed in a background thread while the forward runs
(`masks.GuidedDecoding`). See docs/structured-output.md for the measurement.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from typing import Any, Callable

from .compile_queue import CompileQueue
from .spec import Constraint, ConstraintError, ConstraintLimits, schema_object

# JSON is emitted in the usual one-line style: ", " between items, ": " after keys, no
# other whitespace (free whitespace lets a small model pad forever and never close).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

EventHook = Callable[[str, str, float], None]   # (event, kind, seconds): "request" / "compiled"


def grammar_text(constraint: Constraint) -> str:
    """The llguidance grammar (its JSON form) for a checked constraint."""
    import llguidance

    kind = constraint.kind
    if kind in ("json_schema", "json_object"):
        schema = schema_object(constraint.value) if kind == "json_schema" else {"type": "object"}
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
        except (ValueError, RecursionError) as error:
            raise ConstraintError(f"invalid JSON Schema: {error}") from None
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(constraint.value)
    if kind == "choice":   # Lark string literals take JSON string syntax
        return llguidance.LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in constraint.choices))
    return llguidance.LLMatcher.grammar_from_lark(constraint.value)


class Guide:
    """One request's position in its grammar. Used on the engine thread only."""

    def __init__(self, matcher: Any, kind: str):
        self.matcher = matcher        # llguidance.LLMatcher
        self.kind = kind
        self.error: str | None = None
        self.request_fault = False    # the error is the constraint's own (a 400), not the server's
        self.costly_masks = 0         # tokens whose mask cost more than the budget (masks.GuidedDecoding)

    def check_mask(self) -> bool:
        """After its mask was computed: False (and `error` set) when the grammar could not compute
        it (a parser or lexer limit): the mask would allow only end-of-sequence, an empty success."""
        if self.error is None and self.matcher.is_error():
            self.error = f"the {self.kind} cannot be enforced: {_first_line(self.matcher.get_error())}"
            self.request_fault = True
        return self.error is None

    def accept(self, token_id: int) -> bool:
        """Advance by the sampled token; False (and `error` set) when the grammar refuses it."""
        if self.error is None and not self.matcher.consume_token(token_id):
            self.error = self.matcher.get_error() or f"token {token_id} is not allowed here"
        return self.error is None


class ConstraintCompiler:
    """Compiles constraints for one tokenizer; thread-safe.

    `vocab_size` is the bitmask width in tokens: the larger of the tokenizer's size and the
    LM head's rows (logit columns past the tokenizer's last token are never allowed).
    The llguidance tokenizer (~1 s to build) is made on first use, on the compile thread.
    """

    def __init__(self, hf_tokenizer: Any, lm_vocab_size: int, eos_token_ids: tuple[int, ...],
                 limits: ConstraintLimits = ConstraintLimits(), clock: Callable[[], float] = time.perf_counter):
        self.limits = limits
        self.vocab_size = max(len(hf_tokenizer), lm_vocab_size)
        self._hf_tokenizer = hf_tokenizer
        self._eos = list(eos_token_ids)
        self._clock = clock
        self._tokenizer: Any = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, Any] = OrderedDict()     # cache_key -> template LLMatcher
        self._queue = CompileQueue(self.guide, limits.max_queued_per_tenant, limits.max_queued)
        self._hook: EventHook | None = None

    def set_event_hook(self, hook: EventHook | None) -> None:
        self._hook = hook

    @property
    def num_cached(self) -> int:
        return len(self._cache)

    def submit(self, constraint: Constraint, tenant: str | None = None) -> Future:
        """Check now (raises ConstraintError), compile on the grammar thread -> Future[Guide].
        A cached grammar is answered at once; others wait in `tenant`'s share of the compile
        queue (QueueFull when it is full: compile_queue.py)."""
        constraint.check(self.limits)
        with self._lock:
            cached = constraint.cache_key in self._cache
        if cached:
            done: Future = Future()
            try:
                done.set_result(self.guide(constraint))
            except ConstraintError as error:
                done.set_exception(error)
            return done
        return self._queue.submit(tenant, constraint)

    def guide(self, constraint: Constraint) -> Guide:
        """A fresh Guide at the grammar's start (compiles on the calling thread if not cached)."""
        constraint.check(self.limits)
        self._emit("request", constraint.kind, 0.0)
        key = constraint.cache_key
        with self._lock:
            template = self._cache.get(key)
            if template is not None:
                self._cache.move_to_end(key)
        if template is None:
            template = self._compile(constraint)
            with self._lock:
                self._cache[key] = template
                while len(self._cache) > self.limits.cache_size:
                    self._cache.popitem(last=False)
        return Guide(template.deep_copy(), constraint.kind)

    def _compile(self, constraint: Constraint) -> Any:
        import llguidance

        started = self._clock()
        grammar = grammar_text(constraint)
        matcher = llguidance.LLMatcher(self.tokenizer(), grammar, log_level=0,
                                       limits=llguidance.LLParserLimits())
        if matcher.is_error():
            raise ConstraintError(f"invalid {constraint.kind}: {_first_line(matcher.get_error())}")
        self._probe(matcher, constraint.kind)
        self._emit("compiled", constraint.kind, self._clock() - started)
        return matcher

    def _probe(self, matcher: Any, kind: str) -> None:
        """Compute the first token mask once, here on the grammar thread: a grammar whose mask
        fails, or costs more than `max_mask_ms` per token (which every step of every batch
        holding it would pay), is refused before the request is admitted."""
        best = float("inf")
        for _ in range(2):                               # best of two: the first may warm caches
            probe = matcher.deep_copy()
            started = time.perf_counter()
            probe.compute_bitmask()
            best = min(best, (time.perf_counter() - started) * 1000)
            if probe.is_error():
                raise ConstraintError(f"the {kind} cannot be enforced: {_first_line(probe.get_error())}")
        if best > self.limits.max_mask_ms:
            raise ConstraintError(f"the {kind} takes {best:.0f} ms per token to enforce; this server enforces "
                                  f"constraints up to {self.limits.max_mask_ms:g} ms per token "
                                  "(--constraint-mask-budget); simplify it")

    def tokenizer(self) -> Any:
        """The llguidance tokenizer (built once)."""
        with self._lock:
            if self._tokenizer is None:
                import llguidance.hf

                self._tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer, n_vocab=self.vocab_size,
                                                               eos_token=self._eos)
            return self._tokenizer

    def close(self) -> None:
        self._queue.close()

    def _emit(self, event: str, kind: str, seconds: float) -> None:
        if self._hook is not None:
            self._hook(event, kind, seconds)


def _first_line(message: str | None, limit: int = 300) -> str:
    """The first line of an llguidance error (the rest is a dump of its parser state)."""
    lines = [line.strip() for line in (message or "").strip().splitlines() if line.strip()]
    return (lines[0] if lines else "unknown error")[:limit]
