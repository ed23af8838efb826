"""ModelRunner: step inputs from a ScheduledBatch, sampling only where asked, LoRA routing."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from loraplex.server.engine.batch import ScheduledBatch, ScheduledSeq
from loraplex.server.engine.runner import ModelRunner
from loraplex.server.engine.sequence import SamplingParams, Sequence
from loraplex.server.layers.base import QuantSpec
from loraplex.server.lora.batch_info import LoraBatchInfo
from loraplex.server.lora.delta import LoraStep
from loraplex.server.model.kv_cache import allocate_kv_caches
from loraplex.server.model.llama import build_model

BLOCK_SIZE = 8


@dataclass(frozen=True)
class Greedy:
    token_ids: list[int]
    logprobs: list[float] | None


def greedy(logits: torch.Tensor, seqs: list[Sequence]) -> Greedy:
    assert logits.dtype == torch.float32 and logits.shape[0] == len(seqs)
    return Greedy(logits.argmax(-1).tolist(), logits.log_softmax(-1).max(-1).values.tolist())


class StepSource:
    """The runner's LoRA step source (the SlotPool's role): routing plus unit scales."""

    def prepare_step(self, info: LoraBatchInfo) -> LoraStep:
        return LoraStep(info=info, scales=torch.ones(2))


def make_runner(model_dir, num_blocks=64):
    model, config = build_model(model_dir, QuantSpec())
    caches = allocate_kv_caches(config, num_blocks, BLOCK_SIZE, torch.float32)
    return ModelRunner(model, config, caches, BLOCK_SIZE, greedy, lora=StepSource()), model


def new_seq(seq_id: int, prompt: list[int], first_block: int, adapter: str | None = None) -> Sequence:
    seq = Sequence(seq_id, prompt, SamplingParams(), adapter_key=adapter)
    seq.block_table = list(range(first_block, first_block + 8))
    return seq


def greedy_generate(runner: ModelRunner, prompts: list[list[int]], num_new: int) -> list[list[int]]:
    """Prefill all prompts in one step, then decode them together (no scheduler needed)."""
    seqs = [new_seq(i, list(p), 8 * i) for i, p in enumerate(prompts)]
    items = [ScheduledSeq(seq, 0, seq.num_prompt_tokens, True) for seq in seqs]
    for _ in range(num_new):
        out = runner.run(ScheduledBatch(tuple(items)))
        for seq in seqs:
            seq.output_token_ids.append(out.sampled_token_ids[seq.seq_id])
        items = [ScheduledSeq(seq, seq.num_tokens - 1, 1, True) for seq in seqs]
    return [seq.output_token_ids for seq in seqs]


def hf_greedy(model_dir, prompts: list[list[int]], num_new: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outputs = []
    for prompt in prompts:
        with torch.no_grad():
            ids = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=num_new, do_sample=False, pad_token_id=0)
        outputs.append(ids[0, len(prompt):].tolist())          # may stop early at EOS
    return outputs


def test_greedy_decode_matches_transformers_on_tiny_model(tiny_llama_dir):
    runner, _ = make_runner(tiny_llama_dir)
    prompts = [[5, 900, 33, 7001, 12], [44, 45, 46], list(range(300, 320))]
    ours, theirs = greedy_generate(runner, prompts, 8), hf_greedy(tiny_llama_dir, prompts, 8)
    assert [o[: len(t)] for o, t in zip(ours, theirs)] == theirs
    assert sum(len(t) for t in theirs) >= 12


def test_samples_only_items_that_ask(tiny_llama_dir):
    runner, model = make_runner(tiny_llama_dir)
    a, b = new_seq(0, list(range(10, 22)), 0), new_seq(1, [7, 8, 9], 8)
    out = runner.run(ScheduledBatch((ScheduledSeq(a, 0, 6, False), ScheduledSeq(b, 0, 3, True))))
    assert len(out.sampled_token_ids) == 1 and len(out.logprobs) == 1
    out = runner.run(ScheduledBatch((ScheduledSeq(a, 6, 6, True),)))   # finish a's prompt
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = hf(torch.tensor([a.prompt_token_ids])).logits[0, -1].argmax().item()
    assert out.sampled_token_ids == {a.seq_id: expected}
    assert runner.run(ScheduledBatch(())).sampled_token_ids == {}


class RecordingLora:
    """A real LoRA-style hook: adds x @ A.T @ B.T for tokens whose slot is 0; records routing."""

    def __init__(self, in_features: int, out_features: int):
        gen = torch.Generator().manual_seed(0)
        self.a = torch.randn(2, in_features, generator=gen)
        self.b = torch.randn(out_features, 2, generator=gen)
        self.seen: list[LoraBatchInfo] = []

    def add_delta(self, x: torch.Tensor, y: torch.Tensor, step: LoraStep) -> None:
        info = step.info
        self.seen.append(info)
        rows = info.token_slots == 0
        y[rows] += x[rows] @ self.a.T @ self.b.T


def test_lora_routing(tiny_llama_dir):
    runner, model = make_runner(tiny_llama_dir)
    proj = model.lora_targets()[0]
    hook = RecordingLora(proj.in_features, proj.out_features)
    proj.lora = hook
    prompt = [3, 4, 5, 6]
    plain = new_seq(0, prompt, 0)
    out_base = runner.run(ScheduledBatch((ScheduledSeq(plain, 0, 4, True),)))
    assert hook.seen == []                                # no adapter anywhere: ctx.lora is None
    with_adapter = new_seq(1, prompt, 8, adapter="x@1")
    other = new_seq(2, [9, 9], 16, adapter="y@2")
    batch = ScheduledBatch((ScheduledSeq(new_seq(3, prompt, 24), 0, 4, True),
                            ScheduledSeq(with_adapter, 0, 4, True), ScheduledSeq(other, 0, 2, True)))
    out = runner.run(batch, adapter_slots={"x@1": 0, "y@2": 1})
    info = hook.seen[0]
    assert info.token_slots.tolist() == [-1] * 4 + [0] * 4 + [1] * 2
    assert info.active_slots == (0, 1)
    assert out.sampled_token_ids[3] == out_base.sampled_token_ids[0]
    logits_differ = out.logprobs[1] != pytest.approx(out.logprobs[3], abs=1e-6)
    assert logits_differ                                  # the delta changed slot 0's output
    with pytest.raises(ValueError, match="adapter 'y@2'"):
        runner.run(batch, adapter_slots={"x@1": 0})


def test_batch_order_is_kept_and_the_lora_metadata_carries_the_grouping(tiny_llama_dir):
    """Items run in the scheduler's order; the routing says which tokens share a slot (runs for
    SGMV, tokens sorted by slot) and outputs are keyed by sequence id."""
    runner, model = make_runner(tiny_llama_dir)
    proj = model.lora_targets()[0]
    hook = RecordingLora(proj.in_features, proj.out_features)
    proj.lora = hook
    slots = {"a@1": 1, "b@1": 0}
    seqs = [new_seq(0, [3, 4, 5], 0, "a@1"), new_seq(1, [7, 8], 8, "b@1"), new_seq(2, [9, 10, 11, 12], 16),
            new_seq(3, [13, 14], 24, "b@1"), new_seq(4, [15], 32, "a@1")]
    items = [ScheduledSeq(seq, 0, seq.num_prompt_tokens, seq.seq_id != 2) for seq in seqs]
    out = runner.run(ScheduledBatch(tuple(items)), adapter_slots=slots)
    info = hook.seen[-1]
    assert info.token_slots.tolist() == [1, 1, 1, 0, 0, -1, -1, -1, -1, 0, 0, 1]
    assert info.seg_slots.tolist() == [1, 0, -1, 0, 1] and info.active_slots == (0, 1)
    tokens, token_slots = info.slot_order
    assert tokens.tolist() == [3, 4, 9, 10, 0, 1, 2, 11] and token_slots.tolist() == [0] * 4 + [1] * 4
    alone = {item.seq.seq_id: runner.run(ScheduledBatch((item,)), adapter_slots=slots)
             for item in items if item.sample}
    assert set(out.sampled_token_ids) == {0, 1, 3, 4}
    assert out.sampled_token_ids == {i: o.sampled_token_ids[i] for i, o in alone.items()}
    assert out.logprobs == pytest.approx({i: o.logprobs[i] for i, o in alone.items()}, abs=1e-5)


def test_block_table_too_short_is_reported(tiny_llama_dir):
    runner, _ = make_runner(tiny_llama_dir)
    seq = new_seq(0, list(range(100)), 0)                 # 8 blocks of 8 = 64 slots
    with pytest.raises(ValueError, match="needs 13 KV blocks"):
        runner.run(ScheduledBatch((ScheduledSeq(seq, 0, 100, True),)))


@pytest.mark.integration
def test_default_model_greedy_matches_transformers_generate(default_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    runner, _ = make_runner(default_model_dir)
    ours, theirs = greedy_generate(runner, prompts, 12), hf_greedy(default_model_dir, prompts, 12)
    assert [o[: len(t)] for o, t in zip(ours, theirs)] == theirs
    assert all(len(t) >= 4 for t in theirs)
