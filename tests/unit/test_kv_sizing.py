"""KV cache sizing (model/kv_sizing.py) and lazily backed CPU pages (kv_cache.allocate_kv_caches)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraplex.server.config import ConfigError, load_server_config
from loraplex.server.engine.builder import plan_kv_cache_for
from loraplex.server.engine.config import EngineConfig
from loraplex.server.model.config import ModelConfig, RopeConfig
from loraplex.server.model.kv_cache import allocate_kv_caches, bytes_per_block
from loraplex.server.model.kv_sizing import KVCacheDemand, plan_kv_cache

GiB = 2**30


def _config() -> ModelConfig:
    return ModelConfig(architecture="LlamaForCausalLM", model_type="llama", vocab_size=100,
                       hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4,
                       num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, max_position_embeddings=64,
                       rope=RopeConfig(theta=10000.0), tie_word_embeddings=True)


def test_auto_sizes_by_sequences_times_length_plus_prefix_share():
    config = _config()
    block = bytes_per_block(config, 16, torch.float32)
    demand = KVCacheDemand(max_num_seqs=8, max_model_len=100, block_size=16, prefix_share=0.5)
    assert demand.blocks_per_seq == 7 and demand.running_blocks == 56 and demand.total_blocks == 84
    plan = plan_kv_cache("auto", "1GiB", demand, config, torch.float32)
    assert (plan.num_blocks, plan.demand_blocks, plan.capped) == (84, 84, False)
    assert plan.num_bytes == 84 * block
    assert "the configuration can use 84" in plan.describe() and "within --kv-cache-max-memory" in plan.describe()


def test_auto_is_capped_by_bytes_or_a_fraction_of_free_memory():
    config = _config()
    block = bytes_per_block(config, 16, torch.float32)
    demand = KVCacheDemand(max_num_seqs=64, max_model_len=4096, block_size=16)
    plan = plan_kv_cache("auto", str(10 * block), demand, config, torch.float32)
    assert (plan.num_blocks, plan.capped) == (10, True)
    assert "capped at --kv-cache-max-memory" in plan.describe()
    fraction = plan_kv_cache("auto", "0.5", demand, config, torch.float32, available_bytes=40 * block)
    assert (fraction.num_blocks, fraction.available_bytes) == (20, 40 * block)
    assert "free" in fraction.describe()


def test_explicit_size_is_allocated_as_given():
    config = _config()
    block = bytes_per_block(config, 16, torch.float32)
    demand = KVCacheDemand(max_num_seqs=1, max_model_len=16, block_size=16)
    plan = plan_kv_cache("1MiB", "1KiB", demand, config, torch.float32)
    assert (plan.num_blocks, plan.demand_blocks) == (2**20 // block, 0)
    assert "--kv-cache-memory 1MiB" in plan.describe()


def test_default_engine_config_sizes_the_default_model_by_demand_not_free_memory():
    smollm = ModelConfig(architecture="LlamaForCausalLM", model_type="llama", vocab_size=49152,
                         hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                         num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, max_position_embeddings=8192,
                         rope=RopeConfig(theta=100000.0), tie_word_embeddings=True)
    small = EngineConfig.from_settings(Path("."), max_num_seqs=4, max_model_len=1024, max_input_tokens=512)
    plan = plan_kv_cache_for(small, smollm, torch.float32, "cpu", available_bytes=100 * GiB)
    assert plan.num_blocks == 4 * 64 + 64       # 4 sequences x 64 blocks, + 25% for prefixes
    assert plan.num_bytes < 300 * 2**20         # was a quarter of free memory (25 GiB here)
    no_prefix = EngineConfig.from_settings(Path("."), max_num_seqs=4, max_model_len=1024, max_input_tokens=512,
                                           prefix_caching=False)
    assert plan_kv_cache_for(no_prefix, smollm, torch.float32, "cpu", available_bytes=100 * GiB).num_blocks == 256
    roomy = plan_kv_cache_for(EngineConfig(model_dir=Path(".")), smollm, torch.float32, "cpu",
                              available_bytes=8 * GiB)
    assert roomy.capped and roomy.num_bytes <= 2 * GiB


def test_too_small_a_cache_for_one_request_names_the_flag():
    config = _config()
    engine = EngineConfig.from_settings(Path("."), kv_cache_max_memory="1KiB")
    with pytest.raises(ValueError, match="--kv-cache-max-memory"):
        plan_kv_cache_for(engine, config, torch.float32, "cpu")


def test_bad_sizes_are_refused_at_startup_naming_the_flag():
    with pytest.raises(ConfigError) as error:
        load_server_config({"kv_cache_memory": "lots", "kv_cache_max_memory": "-1",
                            "prefix_cache_share": "-0.5"}, {})
    text = str(error.value)
    assert "--kv-cache-memory 'lots' is not understood" in text
    assert "--kv-cache-max-memory" in text and "--prefix-cache-share" in text
    assert load_server_config({}, {"LORAPLEX_KV_CACHE_MAX_MEMORY": "3GiB"}).kv_cache_max_memory == "3GiB"


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


def test_cpu_cache_pages_are_backed_only_when_written():
    config = ModelConfig(architecture="LlamaForCausalLM", model_type="llama", vocab_size=100,
                         hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
                         num_kv_heads=4, head_dim=64, rms_norm_eps=1e-5, max_position_embeddings=64,
                         rope=RopeConfig(theta=10000.0), tie_word_embeddings=True)
    num_blocks = 4096                                     # 4 x 4096 x 16 x 4 x 64 x 4 B = 1 GiB
    before = _rss_bytes()
    caches = allocate_kv_caches(config, num_blocks, 16, torch.float32)
    allocated = _rss_bytes() - before
    assert allocated < 64 * 2**20, f"allocating a 1 GiB cache made {allocated} bytes resident"
    k_cache, v_cache = caches[0]
    assert k_cache.shape == (num_blocks, 16, 4, 64) and k_cache.is_contiguous()
    k_cache[7].fill_(1.5)                                 # one block written: 16 KiB
    assert float(k_cache[7].sum()) == 1.5 * 16 * 4 * 64
    assert not k_cache[8].any() and not v_cache[7].any() and not caches[1][0][-1].any()
    assert _rss_bytes() - before < 64 * 2**20
