"""TextStream (text_stream.py): the text logic the engine's RequestState used to hold inline,
now shared with the engine process's front end (proc/outputs.py).

Checked two ways: against the former RequestState composition of IncrementalDetokenizer and
StopChecker (written out below as it was), for many splits, stop strings (spanning tokens,
inside multi-byte characters, completed only by the final flush) and finish reasons; and end to
end on the tiny model: an engine that produces no text (the core's mode), with its outputs
passed through the front end's InFlight, gives the in-process engine's outputs exactly (text,
token ids, finish reason, usage), also for multi-byte output forced by a regex constraint.
"""

from __future__ import annotations

import random

import pytest

from engine_helpers import make_engine, run_staggered
from loraplex.server.engine.constraints import Constraint
from loraplex.server.engine.detokenizer import IncrementalDetokenizer
from loraplex.server.engine.io import GenerationRequest, RequestOutput
from loraplex.server.engine.proc.outputs import InFlight
from loraplex.server.engine.prompt import load_tokenizer
from loraplex.server.engine.sequence import FinishReason, SamplingParams
from loraplex.server.engine.stop import StopChecker
from loraplex.server.engine.text_stream import TextStream

TEXT = "Prix: 12 € — «漢字» naïve café, 🚀 done. Ünïcödé ok"
PROMPT_TEXT = "Say something:"


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    return load_tokenizer(default_model_dir)


def _former_request_state(tokenizer, prompt_ids, steps, stop, reason) -> tuple[list[str], bool]:
    """The text of each output and whether a stop string hit, exactly as RequestState computed
    them before TextStream (take_delta per step, then output()'s flush rule)."""
    detokenizer, checker = IncrementalDetokenizer(tokenizer, prompt_ids), StopChecker(tuple(stop))
    stopped, texts = False, []
    for step in steps:
        text = ""
        if step and not stopped:
            text, stopped = checker.feed(detokenizer.add(list(step)))
        texts.append(text)
        if stopped:
            return texts, True
    if not stopped and reason is not FinishReason.ABORT:
        tail, stopped = checker.feed(detokenizer.flush())
        texts[-1] += tail if stopped else tail + checker.flush()
    return texts, stopped


def _text_stream(tokenizer, prompt_ids, steps, stop, reason) -> tuple[list[str], bool]:
    stream, texts = TextStream(tokenizer, prompt_ids, tuple(stop)), []
    for step in steps:
        text, stopped = stream.feed(step)
        texts.append(text)
        if stopped:
            return texts, True
    texts[-1] += stream.finish(reason)
    return texts, stream.stopped


def _stops(rng: random.Random, text: str) -> list[str]:
    """Stop strings: absent, spanning characters of every width, a multi-byte one, and one whose
    end is the text's last characters (completed only when the held tail is flushed)."""
    start = rng.randrange(len(text) - 4)
    return [[], ["zzz-not-there"], [text[start:start + rng.randint(1, 4)]], ["漢字"], ["€ —", "naïve"],
            [text[-2:]], [text[-3:] + "?"], ["🚀"]][rng.randrange(8)]


def test_text_stream_reproduces_the_former_request_state(tokenizer):
    rng = random.Random(36)
    prompt_ids = tokenizer(PROMPT_TEXT, add_special_tokens=False)["input_ids"]
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert len(tokenizer.decode(ids[:3])) < len(TEXT)            # several tokens per character somewhere
    hits = 0
    for case in range(300):
        cuts = sorted(rng.sample(range(1, len(ids)), rng.randint(0, len(ids) - 1)))
        steps = [ids[a:b] for a, b in zip([0, *cuts], [*cuts, len(ids)])]
        if case % 7 == 0:
            steps.insert(rng.randrange(len(steps)), [])          # an output with no new tokens
        stop = _stops(rng, TEXT)
        reason = rng.choice([FinishReason.LENGTH, FinishReason.STOP, FinishReason.ABORT, FinishReason.ERROR])
        expected = _former_request_state(tokenizer, prompt_ids, steps, stop, reason)
        assert _text_stream(tokenizer, prompt_ids, steps, stop, reason) == expected, (steps, stop, reason)
        hits += expected[1]
    assert 30 < hits < 270                                         # both kinds of ending were covered


def test_finish_after_a_hit_and_on_abort_adds_nothing(tokenizer):
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    stream = TextStream(tokenizer, [], ("€",))
    text = "".join(stream.feed([token])[0] for token in ids)
    assert text == "Prix: 12 " and stream.stopped and stream.finish(FinishReason.LENGTH) == ""
    aborted = TextStream(tokenizer, [], ("zz",))
    held = "".join(aborted.feed([token])[0] for token in ids[:-1])
    assert aborted.finish(FinishReason.ABORT) == "" and TEXT.startswith(held)


# ---- the engine with no text + the front end's InFlight == the in-process engine ----------------
def _request(rid: str, stop: tuple[str, ...] = (), constraint: Constraint | None = None, max_new: int = 24):
    """Seeded sampling (greedy repeats one token on the random model); greedy under a constraint."""
    sampled = dict(temperature=1.0, seed=36, ignore_eos=True) if constraint is None else dict(temperature=0.0)
    return GenerationRequest(request_id=rid, prompt="The quick brown fox jumps over",
                             sampling=SamplingParams(max_new_tokens=max_new, stop=stop, constraint=constraint,
                                                     **sampled))


def _through_front_end(engine_outputs, tokenizer, request) -> list:
    prompt_ids = tokenizer(request.prompt)["input_ids"]
    flight = InFlight(None, None, tokenizer, prompt_ids, request.sampling.stop)
    received = []
    for output in engine_outputs:
        item = flight.receive(output)
        if item is not None:
            received.append(item)
            flight.done = item.finished
    return received


def _view(outputs) -> list[tuple]:
    return [(o.text, o.token_ids, o.finish_reason, o.prompt_tokens, o.generated_tokens, o.timing is None)
            for o in outputs]


def test_token_only_engine_and_front_end_give_the_in_process_outputs(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir, cpu_kernels="torch")
    free = run_staggered(engine, [(0, _request("free"))])["free"]
    text = "".join(o.text for o in free)
    texts = [o.text for o in free]
    spanning = next(a[-2:] + b[:2] for a, b in zip(texts, texts[1:]) if len(a) >= 2 and len(b) >= 2)
    multibyte = Constraint("regex", "«漢字» café €{2} 🚀 done")
    requests = [_request("plain"), _request("span", (spanning,)), _request("tail", (text[-2:] + "§",)),
                _request("mb", ("字» c",), multibyte, max_new=48), _request("mb-free", (), multibyte, max_new=48)]
    expected = run_staggered(engine, [(0, r) for r in requests])
    engine.detokenize = False                                    # as the engine-core process builds it
    got = run_staggered(engine, [(0, r) for r in requests])
    for request in requests:
        rid = request.request_id
        assert all(o.text == "" for o in got[rid])                   # the core makes no text
        assert all(o.timing is not None for o in got[rid])           # ... and times every output
        front = _through_front_end(got[rid], engine.tokenizer, request)
        assert _view(front) == _view(expected[rid]), rid
    assert expected["span"][-1].finish_reason is FinishReason.STOP
    assert "".join(o.text for o in expected["span"]) == text[:text.index(spanning)]
    assert expected["span"][-1].generated_tokens < len(free)
    assert "".join(o.text for o in expected["tail"]) == text and expected["tail"][-1].finish_reason is FinishReason.LENGTH
    assert "".join(o.text for o in expected["mb-free"]) == "«漢字» café €€ 🚀 done"
    assert "".join(o.text for o in expected["mb"]) == "«漢" and expected["mb"][-1].finish_reason is FinishReason.STOP


def test_kept_special_tokens_are_text_but_the_token_that_ends_the_request_is_not(tokenizer):
    """skip_special_tokens=False (a Mistral tool request): special tokens in the middle are text;
    the EOS / stop token id that ends the request is not, in either mode; with special tokens
    skipped the ids decode as before (an EOS adds nothing, a normal stop token id stays)."""
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    ids = tokenizer("Hi there", add_special_tokens=False)["input_ids"]
    steps = [[start], ids, [eos]]
    for skip, expected in ((False, "<|im_start|>Hi there"), (True, "Hi there")):
        stream = TextStream(tokenizer, [], (), skip_special_tokens=skip)
        text = "".join(stream.feed(step, FinishReason.EOS if step == [eos] else None)[0] for step in steps)
        assert text + stream.finish(FinishReason.EOS) == expected
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    kept = TextStream(tokenizer, [], (), skip_special_tokens=False)
    assert kept.feed(ids + newline, FinishReason.STOP)[0] + kept.finish(FinishReason.STOP) == "Hi there"
    skipped = TextStream(tokenizer, [], ())
    assert skipped.feed(ids + newline, FinishReason.STOP)[0] + skipped.finish(FinishReason.STOP) == "Hi there\n"
    flight = InFlight(None, None, tokenizer, [], (), skip_special_tokens=False)
    first = flight.receive(_output("r", [start, *ids], None))
    last = flight.receive(_output("r", [eos], FinishReason.EOS))
    assert first.text + last.text == "<|im_start|>Hi there" and last.finish_reason is FinishReason.EOS


def _output(request_id: str, token_ids: list[int], reason: FinishReason | None) -> RequestOutput:
    return RequestOutput(request_id=request_id, text="", token_ids=tuple(token_ids), finish_reason=reason)
