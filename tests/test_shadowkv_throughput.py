"ShadowKV at 8B scale: the memory model against built caches, the caps, the bandwidth formulas, the Llama-3-8B shape."
import math
import pytest
import torch
import longctx_nb.core  # noqa: F401  (before triton)
from longctx_nb.shadowkv import ShadowKVConfig, shadowkv_layout
from longctx_nb.shadowkv_throughput import (llama_config, random_llama, footprint, batch_caps, synthetic_prefill, constructed_cache,
                                            decode_speed, equivalent_bandwidth, predicted_step_ms, LLAMA3_8B)

TOY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)

@pytest.fixture(scope="module")
def toy():
    return random_llama(llama_config(**TOY), "cpu", torch.float32)

def test_llama3_8b_shape_has_8b_parameters():
    with torch.device("meta"):
        from transformers import LlamaForCausalLM
        m = LlamaForCausalLM(llama_config())
    assert abs(sum(p.numel() for p in m.parameters()) - 8.030e9) < 0.001e9
    assert m.config.num_key_value_heads == 8 and m.config.head_dim == 128 and m.config.num_hidden_layers == 32

@pytest.mark.parametrize("method,kw", [("full", {}), ("shadowkv", {}), ("shadowkv", dict(value_dtype="fp8")),
                                       ("shadowkv", dict(outliers=0, local_chunks=0))], ids=["full", "shadowkv", "fp8", "no-outliers"])
def test_footprint_is_what_a_built_cache_holds(toy, method, kw):
    S, B = 520, 3                                                     # not a multiple of the chunk size
    st = ShadowKVConfig(budget=48, rank=12, min_prefill=64, reserve_tokens=5, **kw) if method == "shadowkv" else None
    rec = synthetic_prefill(toy, S, rank=12)
    cache = constructed_cache(toy, rec, B, method, st, reserve_tokens=5)
    try:
        fp = footprint(toy.config, S, method, st, dtype_bytes=4, reserve_tokens=5)
        assert cache.gpu_bytes() == B * fp["gpu"] and cache.host_bytes() == B * fp["host"]
        speed = decode_speed(toy, cache, B, S, n_tokens=3, warmup=1)
        assert speed["tok_s"] > 0 and cache.get_seq_length() == S + 4
    finally:
        cache.detach()

def test_synthetic_keys_are_low_rank_and_roped(toy):
    rec = synthetic_prefill(toy, 256, rank=6, noise=0.0)
    s = torch.linalg.svdvals(rec.k_pre[0].float())
    assert (s[6:] < 1e-4 * s[0]).all()                               # rank 6 exactly without noise
    assert rec.keys.shape == (1, 2, 256, 16) and torch.equal(rec.positions[0], torch.arange(256))

def test_batch_caps():
    caps = batch_caps(dict(gpu=10, host=100), gpu_free=105, host_free=450, workspace_per_seq=5)
    assert caps == dict(gpu_cap=7, host_cap=4, cap=4)
    assert batch_caps(dict(gpu=10, host=0), 105, 0, max_batch=3)["cap"] == 3

def test_equivalent_bandwidth_formula():
    lay = shadowkv_layout(122880, ShadowKVConfig(budget=2048, rank=160))
    # all hits: 2S / (S/C + 2(K+O)C) times the GPU bandwidth
    want = 2 * 122880 / (122880 / 8 + 2 * (lay.selected_chunks + lay.outlier_chunks) * 8)
    assert equivalent_bandwidth(122880, lay, 1.0, 1.0, 1.0) == pytest.approx(want)
    # misses cost B_gpu/B_pcie more per fetched token: lower equivalent bandwidth, monotone in the hit rate
    e = [equivalent_bandwidth(122880, lay, a, 3000.0, 25.0) for a in (0.0, 0.5, 0.9)]
    assert e[0] < e[1] < e[2] < 3000.0 * want

def test_predicted_step_ms_orders_methods():
    cfg = llama_config()
    bw = dict(hbm=6000.0, uva_gather=25.0)
    st = ShadowKVConfig(budget=2048, rank=160)
    full = predicted_step_ms(cfg, 122880, 3, "full", None, bw, weight_bytes=16e9)
    assert full == pytest.approx(1e3 * (16e9 + 3 * 32 * 2 * 8 * 128 * 122880 * 2) / 3e12)
    s0, s6 = (predicted_step_ms(cfg, 122880, 13, "shadowkv", st, bw, a, 16e9) for a in (0.0, 0.6))
    assert s6 < s0

def test_decode_speed_bad_inputs(toy):
    with pytest.raises(ValueError, match="inputs"): decode_speed(toy, None, 1, 10, 1, inputs="greedy")
