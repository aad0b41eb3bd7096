"""ShadowKV runtime: the gather-GEMM-RoPE and value kernels against their references, the pieces, the Cache, the method, bad inputs.

Kernel-vs-reference tests run on CUDA tensors where CUDA is visible (the compiled kernel) and on CPU tensors otherwise (the Triton
interpreter); tests that drive the interpreter through a CPU model carry `needs_interpreter`. The framework's own tests (states,
wiring, the baselines) are in test_kvcache.py."""
import functools
import warnings
import pytest
import torch
import longctx_nb.core  # noqa: F401  (before triton)
from helpers import tiny_llama_config, needs_interpreter, shadow_keys_inputs, gather_inputs, assert_dropped_caches_are_freed
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from longctx_nb.models import rope_tables, rotate_half
from longctx_nb.evals import greedy_generate
from longctx_nb.kvcache import PrefillRecord, LayerState, attend, record_prefill, host_empty, SnapKV, StreamingLLM, QuestPages
from longctx_nb.shadowkv import (
    ShadowKV, ShadowKVConfig, ShadowKVCache, shadowkv_layout, low_rank_keys, svd_relative_error, chunk_landmarks, landmark_scores,
    landmark_scores_fused,
    assign_slots, assign_slots_fused, shadow_keys, shadow_keys_ref, half_rope_tables,
    gather_chunks, gather_chunks_ref, quantize_chunks_fp8, dequantize_chunks, FP8_MAX)

DEV = "cuda" if torch.cuda.is_available() else "cpu"    # kernel tests: the compiled kernel on CUDA, the interpreter on CPU

# ---------------------------------------------------------------- kernel

_kernel_inputs = functools.partial(shadow_keys_inputs, device=DEV)   # the compiled kernel on CUDA, the interpreter on CPU

SHAPES = [(1, 4, 16, 1, 32, 8, 2), (2, 9, 23, 3, 64, 8, 5), (1, 7, 48, 2, 48, 5, 7), (3, 5, 17, 3, 64, 3, 4), (2, 3, 70, 2, 128, 8, 3)]
ids_of = lambda s: "B{}-Sc{}-R{}-H{}-D{}-C{}-n{}".format(*s)

@pytest.mark.parametrize("shape", SHAPES, ids=[ids_of(s) + "-fp32" for s in SHAPES])
def test_kernel_matches_reference(shape):
    B, Sc, R, Hkv, D, C, n = shape
    U, SV, cos, sin, pos, ids = _kernel_inputs(*shape)
    ref = shadow_keys_ref(U, SV, cos, sin, pos, ids, C)
    out = torch.full_like(ref, float("nan"))
    shadow_keys(U, SV, cos, sin, pos, ids, C, out=out)
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # the reference itself against the plain formula for one row
    b, h, i, j = B - 1, Hkv - 1, n - 1, C - 1
    t = int(ids[b, h, i]) * C + j
    k = U[b, t] @ SV[b, h]
    p = int(pos[b, t])
    torch.testing.assert_close(ref[b, h, i * C + j], k * cos[p] + rotate_half(k) * sin[p], rtol=1e-5, atol=1e-5)

@pytest.mark.parametrize("shape", SHAPES[1:4], ids=[ids_of(s) + "-slots-fp32" for s in SHAPES[1:4]])
def test_kernel_slots_and_counts_leave_other_rows_alone(shape):
    B, Sc, R, Hkv, D, C, n = shape
    U, SV, cos, sin, pos, ids = _kernel_inputs(*shape, seed=1)
    g = torch.Generator().manual_seed(2)
    slots = torch.stack([torch.randperm(n, generator=g) for _ in range(B * Hkv)]).view(B, Hkv, n).to(DEV)
    counts = torch.randint(0, n + 1, (B, Hkv), generator=g).to(DEV)
    a = torch.full((B, Hkv, n * C, D), float("nan"), device=DEV); b = a.clone()
    shadow_keys_ref(U, SV, cos, sin, pos, ids, C, slots=slots, counts=counts, out=a)
    shadow_keys(U, SV, cos, sin, pos, ids, C, slots=slots, counts=counts, out=b, block_t=32)
    assert torch.equal(a.isnan(), b.isnan())
    written = (~a.isnan()).any(-1).view(B, Hkv, n, C).any(-1).sum(-1)
    assert torch.equal(written, counts)                                   # exactly the first counts[b, h] chunks were written
    torch.testing.assert_close(a.nan_to_num(), b.nan_to_num(), rtol=1e-5, atol=1e-5)

@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[4]], ids=[ids_of(SHAPES[1]), ids_of(SHAPES[4])])
def test_kernel_half_tables_equal_the_full_tables(shape):
    "RoPE tables whose halves are equal (every real one) passed as their first half: kernel and reference give the full tables' keys."
    B, Sc, R, Hkv, D, C, n = shape
    U, SV, cos, sin, pos, ids = _kernel_inputs(*shape, real_rope=True)
    cos_h, sin_h = half_rope_tables(cos, sin)
    assert cos_h.shape == (cos.shape[0], D // 2) and torch.equal(cos_h, cos[:, :D // 2])
    full = shadow_keys_ref(U, SV, cos, sin, pos, ids, C)
    torch.testing.assert_close(shadow_keys_ref(U, SV, cos_h, sin_h, pos, ids, C), full, rtol=0, atol=0)
    out = torch.full_like(full, float("nan"))
    shadow_keys(U, SV, cos_h, sin_h, pos, ids, C, out=out)
    torch.testing.assert_close(out, full, rtol=1e-5, atol=1e-5)

def test_half_rope_tables_keeps_tables_with_unequal_halves():
    _, _, cos, sin, _, _ = shadow_keys_inputs(1, 4, 16, 1, 32, 8, 2)                 # random tables: halves differ
    c, s = half_rope_tables(cos, sin)
    assert c is cos and s is sin
    cos2 = torch.cat([cos[:, :16]] * 2, 1)                                          # cos halves equal, sin's not: still the full pair
    assert half_rope_tables(cos2, sin)[0] is cos2
    rot_cos, rot_sin = rope_tables(LlamaRotaryEmbedding(tiny_llama_config()), 64, "cpu")
    assert half_rope_tables(rot_cos, rot_sin)[0].shape[1] == rot_cos.shape[1] // 2   # a model's real tables: halves equal

def test_kernel_writes_into_a_strided_view():
    U, SV, cos, sin, pos, ids = _kernel_inputs(2, 6, 20, 2, 32, 8, 3)
    buf = torch.full((2, 2, 64, 32), float("nan"), device=DEV)
    view = buf[:, :, 10:10 + 24]
    shadow_keys(U, SV, cos, sin, pos, ids, 8, out=view)
    torch.testing.assert_close(buf[:, :, 10:34], shadow_keys_ref(U, SV, cos, sin, pos, ids, 8), rtol=1e-5, atol=1e-5)
    assert buf[:, :, :10].isnan().all() and buf[:, :, 34:].isnan().all()

def test_kernel_bad_inputs():
    U, SV, cos, sin, pos, ids = _kernel_inputs(1, 4, 16, 2, 32, 8, 2)
    with pytest.raises(ValueError, match="disagree on batch or rank"):
        shadow_keys(U, SV[:, :, :8], cos, sin, pos, ids, 8)
    with pytest.raises(ValueError, match="head_dim"):
        shadow_keys(U, SV, cos[:, :12], sin[:, :12], pos, ids, 8)        # neither head_dim (32) nor its half
    with pytest.raises(ValueError, match="whole number of chunks"):
        shadow_keys(U, SV, cos, sin, pos, ids, 5)
    with pytest.raises(TypeError, match="float32"):
        shadow_keys(U, SV, cos.double(), sin.double(), pos, ids, 8)
    with pytest.raises(TypeError, match="int32/int64"):
        shadow_keys(U, SV, cos, sin, pos, ids.float(), 8)
    with pytest.raises(ValueError, match="slots need an `out`"):
        shadow_keys(U, SV, cos, sin, pos, ids, 8, slots=ids)

# ---------------------------------------------------------------- pieces

def test_low_rank_keys_is_the_svd_and_exact_at_full_rank():
    g = torch.Generator().manual_seed(0)
    K = torch.randn(2, 50, 12, generator=g) @ torch.randn(12, 24, generator=g)      # rank 12 of width 24
    U, SV, s = low_rank_keys(K, 24)
    torch.testing.assert_close(U @ SV, K, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s[:, :12], torch.linalg.svdvals(K)[:, :12], rtol=1e-4, atol=1e-4)
    U6, SV6, _ = low_rank_keys(K, 6)
    err = (U6 @ SV6 - K).norm(dim=(1, 2)) / K.norm(dim=(1, 2))
    torch.testing.assert_close(err, svd_relative_error(s, [6])[:, 0], rtol=1e-3, atol=1e-4)
    assert torch.allclose(U6.transpose(1, 2) @ U6, torch.eye(6).expand(2, 6, 6), atol=1e-4)
    e = svd_relative_error(s, range(0, 25, 4))
    assert (e[:, 1:] <= e[:, :-1] + 1e-7).all() and torch.allclose(e[:, 0], torch.ones(2)) and (e[:, -1] < 1e-4).all()

def test_low_rank_keys_ignores_padding():
    K = torch.randn(1, 40, 16)
    valid = torch.arange(40)[None] >= 8
    U, SV, s = low_rank_keys(K, 16, valid)
    U2, SV2, s2 = low_rank_keys(K[:, 8:], 16)
    torch.testing.assert_close(s, s2, rtol=1e-5, atol=1e-5)
    assert (U[:, :8] == 0).all()
    torch.testing.assert_close((U @ SV)[:, 8:], K[:, 8:], rtol=1e-4, atol=1e-4)

def test_chunk_landmarks_with_padding():
    keys = torch.randn(1, 2, 24, 8)
    valid = torch.arange(24)[None] >= 4                                          # first chunk half padded
    lm, min_cos, cv = chunk_landmarks(keys, 8, valid)
    torch.testing.assert_close(lm[0, :, 0], keys[0, :, 4:8].mean(1))
    torch.testing.assert_close(lm[0, :, 1], keys[0, :, 8:16].mean(1))
    assert cv.tolist() == [[True, True, True]]
    lm_all, _, _ = chunk_landmarks(keys, 8, torch.arange(24)[None] >= 8)
    _, mc, cv = chunk_landmarks(keys, 8, torch.arange(24)[None] >= 8)
    assert cv.tolist() == [[False, True, True]] and torch.isinf(mc[0, :, 0]).all()

def test_landmark_scores_max_over_group():
    q, lm = torch.randn(2, 6, 3, 8), torch.randn(2, 2, 5, 8)
    s = landmark_scores(q, lm, 0.3)
    naive = torch.stack([torch.stack([torch.stack([(q[b, h] @ lm[b, h // 3].T * 0.3).softmax(-1).sum(0) for h in range(6)]).view(2, 3, 5).amax(1)[k]
                                      for k in range(2)]) for b in range(2)])
    torch.testing.assert_close(s, naive)
    s_masked = landmark_scores(q, lm, 0.3, torch.tensor([True, False, True, True, True]).expand(2, 2, 5))
    assert (s_masked[..., 1] == 0).all()

@pytest.mark.parametrize("B,Hkv,k,n", [(1, 1, 4, 10), (2, 3, 7, 30), (3, 2, 16, 16), (1, 2, 33, 100), (1, 1, 256, 4000)],
                         ids=["k4", "k7-odd", "k16-all-chunks", "k33", "k256-paper"])
def test_assign_slots_fused_equals_the_reference(B, Hkv, k, n):
    "On CUDA the compiled kernel, on CPU the interpreter: all four outputs over steps from an empty table, one repeating a selection."
    g = torch.Generator().manual_seed(k)
    held = torch.full((B, Hkv, k), -1, dtype=torch.long, device=DEV)
    for step in range(4):
        new = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(B * Hkv)]).view(B, Hkv, k).to(DEV)
        if step == 2: new = held[..., torch.randperm(k, generator=g).to(DEV)]          # every chunk a hit, in another order
        ref, got = assign_slots(held, new), assign_slots_fused(held, new)
        for name, r, t in zip(("miss_ids", "miss_slots", "n_miss", "updated"), ref, got):
            assert torch.equal(r, t), f"{name} differs at step {step}"
        if step == 2: assert int(got[2].sum()) == 0
        held = ref[3]

def test_assign_slots_fused_bad_inputs():
    with pytest.raises(ValueError, match="differ in shape"): assign_slots_fused(torch.zeros(1, 2, 4, dtype=torch.long), torch.zeros(1, 2, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="int64"): assign_slots_fused(torch.zeros(1, 2, 4, dtype=torch.int32), torch.zeros(1, 2, 4, dtype=torch.int32))

def test_assign_slots_keeps_hits_in_place():
    g = torch.Generator().manual_seed(0)
    held = torch.full((3, 2, 6), -1)
    for step in range(8):
        new = torch.stack([torch.randperm(10, generator=g)[:6] for _ in range(6)]).view(3, 2, 6)
        miss, slots, n_miss, held2 = assign_slots(held, new)
        for b in range(3):
            for h in range(2):
                old, nw = set(held[b, h].tolist()), set(new[b, h].tolist())
                assert set(held2[b, h].tolist()) == nw and int(n_miss[b, h]) == len(nw - old)
                for j in range(6):                                                 # a chunk selected again stays in its slot
                    if int(held[b, h, j]) in nw: assert held2[b, h, j] == held[b, h, j]
                assert set(miss[b, h, :n_miss[b, h]].tolist()) == nw - old
        held = held2

def test_config_and_layout_validation():
    with pytest.raises(ValueError, match="fraction of the context"): ShadowKVConfig(budget=1.5)
    with pytest.raises(ValueError, match="number of tokens"): ShadowKVConfig(budget=0)
    with pytest.raises(TypeError, match="budget"): ShadowKVConfig(budget="2%")
    with pytest.raises(ValueError, match="kernel"): ShadowKVConfig(kernel="cuda")
    with pytest.raises(ValueError, match="rank"): ShadowKVConfig(rank=0)
    lay = shadowkv_layout(131072, ShadowKVConfig(budget=2048))
    assert (lay.selected_chunks, lay.outlier_chunks, lay.local_tokens) == (256, 48, 32)
    lay = shadowkv_layout(1003, ShadowKVConfig(budget=1.0, chunk_size=8))            # remainder goes to the local window
    assert lay.local_tokens == 1003 - lay.ctx_chunks * 8 and lay.over_budget and lay.selected_chunks == lay.landmark_chunks

# ---------------------------------------------------------------- the Cache on a tiny model

@pytest.fixture
def tiny():
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    m = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=2, max_position_embeddings=1024)).eval()
    return m

GEN = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)

def _ids(n, b=2, seed=0):
    return torch.randint(1, 128, (b, n), generator=torch.Generator().manual_seed(seed))

@pytest.mark.parametrize("kernel", ["torch", pytest.param("triton", marks=needs_interpreter)])
def test_generate_full_budget_full_rank_equals_full_attention(tiny, kernel):
    ids = _ids(83)
    with torch.no_grad():
        ref = tiny.generate(ids, **GEN, output_logits=True, return_dict_in_generate=True)
        with pytest.warns(UserWarning, match="every chunk is selected"):
            with ShadowKVCache(tiny, budget=1.0, rank=32, min_prefill=16, kernel=kernel) as cache:
                out = tiny.generate(ids, **GEN, past_key_values=cache, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits): torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    st = cache.stats()
    assert 0 < st["hit_rate"] <= 1 and st["host_mb"] > 0

def test_sparse_decode_attends_only_to_the_budget(tiny):
    ids = _ids(160, b=1)
    with torch.no_grad(), ShadowKVCache(tiny, budget=16, rank=8, min_prefill=16, outliers=1) as cache:
        tiny.generate(ids, **GEN, past_key_values=cache)
        layer = cache.layers[0]
        lay = layer.layout
        assert lay.selected_chunks == 2 and lay.outlier_chunks == 1
        assert layer.buf.len == lay.local_tokens + lay.outlier_chunks * 8 + lay.selected_tokens + GEN["max_new_tokens"] - 1
        assert layer.U.shape == (1, lay.ctx_chunks * 8, 8) and layer.v_host.device.type == "cpu"
        assert cache.get_seq_length() == 160 + GEN["max_new_tokens"] - 1

def test_short_prefill_falls_back_to_exact_and_says_so_once(tiny):
    ids = _ids(40)
    with torch.no_grad():
        ref = tiny.generate(ids, **GEN)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            with ShadowKVCache(tiny, rank=8, min_prefill=64) as cache: out = tiny.generate(ids, **GEN, past_key_values=cache)
    msgs = [x for x in w if "min_prefill" in str(x.message)]
    assert len(msgs) == 1 and torch.equal(out, ref)
    assert all(l.state is LayerState.EXACT for l in cache.layers)

def test_rank_larger_than_key_width_is_an_error(tiny):
    with pytest.raises(ValueError, match="exceeds the key width"):
        ShadowKVCache(tiny, rank=33)                                             # 2 kv heads x 16

def test_left_padded_batch_matches_rows_alone(tiny):
    a, b = _ids(96, b=1, seed=1), _ids(80, b=1, seed=2)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 16, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch); mask[1, :16] = 0
    kw = dict(budget=16, rank=16, min_prefill=16, outliers=1)
    with torch.no_grad():
        with ShadowKVCache(tiny, **kw) as c: out = tiny.generate(batch, attention_mask=mask, **GEN, past_key_values=c)
        alone = []
        for x in (a, b):
            with ShadowKVCache(tiny, **kw) as c: alone.append(tiny.generate(x, **GEN, past_key_values=c)[0, x.shape[1]:])
    assert torch.equal(out[0, 96:], alone[0]) and torch.equal(out[1, 96:], alone[1])

def test_right_padding_is_refused(tiny):
    ids = _ids(64)
    mask = torch.ones_like(ids); mask[1, -8:] = 0
    with pytest.raises(ValueError, match="left padding"):
        with torch.no_grad(), ShadowKVCache(tiny, rank=8, min_prefill=16) as c: tiny.generate(ids, attention_mask=mask, **GEN, past_key_values=c)

def test_detach_and_garbage_collection_restore_the_model(tiny):
    ids = _ids(50)
    with torch.no_grad():
        ref = tiny(ids).logits
        cache = ShadowKVCache(tiny, rank=8, min_prefill=16)
        assert tiny.config._attn_implementation == "longctx"
        del cache                                                                 # hooks hold weak references only
        torch.testing.assert_close(tiny(ids).logits, ref, rtol=1e-5, atol=1e-5)
        c = ShadowKVCache(tiny, rank=8, min_prefill=16); c.detach()
        assert tiny.config._attn_implementation == "sdpa"
        assert not any(m.k_proj._forward_hooks for m in (l.self_attn for l in tiny.model.layers))

def test_record_then_load_equals_online(tiny):
    ids = _ids(120)
    with torch.no_grad():
        with ShadowKVCache(tiny, budget=24, rank=12, min_prefill=16) as c:
            online = tiny.generate(ids, **GEN, past_key_values=c)[:, 120:]
        logits, recs = record_prefill(tiny, ids)
        with ShadowKVCache(tiny, budget=24, rank=12, min_prefill=16) as c:
            c.load_prefill(recs)
            offline = greedy_generate(tiny, ids, stop_ids=(), max_new_tokens=GEN["max_new_tokens"], cache=c, first_logits=logits)
    assert torch.equal(online, torch.tensor(offline))

@needs_interpreter
def test_driven_without_weights(tiny):
    "Construct the cache state directly (no model): at full budget and rank a step equals exact attention over all keys."
    cfg = tiny_llama_config()
    B, Hkv, S, D, H = 2, cfg.num_key_value_heads, 64, cfg.hidden_size // cfg.num_attention_heads, cfg.num_attention_heads
    cache = ShadowKVCache(model_config=cfg, budget=1.0, rank=Hkv * D, min_prefill=16, kernel="triton")
    cos, sin = rope_tables(cache.rotary_emb, S, "cpu")
    g = torch.Generator().manual_seed(0)
    recs = []
    for _ in range(cfg.num_hidden_layers):
        k_pre = torch.randn(B, S, Hkv * D, generator=g)
        kh = k_pre.view(B, S, Hkv, D).transpose(1, 2)
        keys = kh * cos[None, None] + rotate_half(kh) * sin[None, None]
        recs.append(PrefillRecord(keys=keys, values=torch.randn(B, Hkv, S, D, generator=g), positions=torch.arange(S).expand(B, S), k_pre=k_pre))
    with pytest.warns(UserWarning, match="every chunk"): cache.load_prefill(recs)
    q, k1, v1 = torch.randn(B, H, 1, D, generator=g), torch.randn(B, Hkv, 1, D, generator=g), torch.randn(B, Hkv, 1, D, generator=g)
    out = cache.step(0, q, k1, v1)
    ref = attend(q, torch.cat([recs[0].keys, k1], 2), torch.cat([recs[0].values, v1], 2), D ** -0.5)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)

SSHAPES = [(1, 2, 1, 1, 5, 16, False), (2, 6, 2, 1, 37, 32, True), (2, 4, 2, 3, 150, 48, False), (3, 8, 2, 1, 129, 64, True)]
sids = lambda s: "B{}-H{}-Hkv{}-L{}-n{}-D{}".format(*s[:6]) + ("-masked" if s[6] else "") + "-fp32"

@pytest.mark.parametrize("shape", SSHAPES, ids=[sids(s) for s in SSHAPES])
def test_fused_landmark_scores_match_the_reference(shape):
    "The two-launch scores against landmark_scores (+ nan_to_num), several tiles per row, masked landmarks, one row with none valid."
    B, H, Hkv, L, n, D, masked = shape
    g = torch.Generator().manual_seed(n)
    q, lm = torch.randn(B, H, L, D, generator=g).to(DEV), torch.randn(B, Hkv, n, D, generator=g).to(DEV)
    valid = None
    if masked:
        valid = torch.rand(B, Hkv, n, generator=g) > 0.3
        valid[0, 0] = False
        valid = valid.to(DEV)
    ref = landmark_scores(q, lm, D ** -0.5, valid).nan_to_num(0.0)
    got = landmark_scores_fused(q, lm, D ** -0.5, valid, block_n=32)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    if masked: assert (got[0, 0] == 0).all()

def test_fused_landmark_scores_bad_inputs():
    with pytest.raises(ValueError, match="not a multiple of kv heads"): landmark_scores_fused(torch.randn(1, 3, 1, 16), torch.randn(1, 2, 5, 16), 0.25)
    with pytest.raises(ValueError, match="disagree on batch or head_dim"): landmark_scores_fused(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 5, 32), 0.25)
    with pytest.raises(ValueError, match="landmark_valid must be"):
        landmark_scores_fused(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 5, 16), 0.25, torch.ones(1, 2, 4, dtype=torch.bool))

@needs_interpreter
def test_triton_selection_decodes_like_the_reference(tiny):
    "kernel='triton' (fused scores, fused assignment, the key kernel; the interpreter on CPU) decodes the tokens of kernel='torch'."
    ids = _ids(200)
    out = []
    for kernel in ("torch", "triton"):
        with torch.no_grad(), ShadowKVCache(tiny, budget=24, rank=12, min_prefill=16, kernel=kernel) as c:
            out.append(tiny.generate(ids, **GEN, past_key_values=c)[:, 200:])
    assert torch.equal(out[0], out[1])

# ---------------------------------------------------------------- ShadowKV as a KV method, and the equal-budget rule

def test_shadowkv_method_builds_its_cache_and_counts_its_tokens(tiny):
    m = ShadowKV(budget=1 / 64, rank=16, min_prefill=1024)
    lay = shadowkv_layout(8192, m)
    assert m.attended_tokens(8192) == lay.attended_tokens == (lay.selected_chunks + lay.outlier_chunks) * 8 + lay.local_tokens
    assert m.attended_tokens(512) == 512 and m.label == "shadowkv@0.015625" and ShadowKV(budget=48).label == "shadowkv@48t"
    with m.make_cache(tiny) as c:
        assert isinstance(c, ShadowKVCache) and c.method is m and c.settings == ShadowKVConfig(budget=1 / 64, rank=16, min_prefill=1024)
        assert c.needs_pre_rope and c._handles
    with pytest.raises(ValueError, match="fraction of the context"): ShadowKV(budget=2.0)

@pytest.mark.parametrize("cls", [StreamingLLM, QuestPages, SnapKV])
def test_baselines_at_shadowkvs_budget_attend_to_as_many_tokens(cls):
    "The equal-budget rule: a baseline whose budget is the ShadowKV method attends to ShadowKV's selected + outlier + local tokens."
    for S in (1024, 2048, 4096, 8128):
        for b in (1 / 64, 1 / 32, 1 / 16):
            skv = ShadowKV(budget=b, rank=88, min_prefill=1024)
            assert cls(budget=skv).attended_tokens(S) == shadowkv_layout(S, ShadowKVConfig(budget=b, rank=88)).attended_tokens
            assert cls(budget=skv).label == f"{cls.name}@{b:g}"

def _random_records(cfg, B, S, seed=0, rank=None):
    "Records of a weightless prefill: random pre-RoPE keys (low rank when `rank`), their RoPE, random values."
    g = torch.Generator().manual_seed(seed)
    Hkv, D = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    cos, sin = rope_tables(LlamaRotaryEmbedding(cfg), S, "cpu")
    recs = []
    for _ in range(cfg.num_hidden_layers):
        k_pre = torch.randn(B, S, rank or Hkv * D, generator=g) @ (torch.randn(rank, Hkv * D, generator=g) if rank else torch.eye(Hkv * D))
        kh = k_pre.view(B, S, Hkv, D).transpose(1, 2)
        recs.append(PrefillRecord(keys=kh * cos + rotate_half(kh) * sin, values=torch.randn(B, Hkv, S, D, generator=g),
                                  positions=torch.arange(S).expand(B, S), k_pre=k_pre))
    return recs

@pytest.mark.parametrize("kernel", ["torch", pytest.param("triton", marks=needs_interpreter)])
def test_sparse_step_equals_attention_over_the_kept_tokens(kernel):
    "Across steps (with cache hits), a decode step is exact attention over local + outliers + the selected chunks + new tokens."
    cfg = tiny_llama_config()
    B, S, C, Hkv, H = 2, 200, 8, cfg.num_key_value_heads, cfg.num_attention_heads
    D = cfg.hidden_size // H
    recs = _random_records(cfg, B, S, rank=12)
    cache = ShadowKVCache(model_config=cfg, budget=40, rank=12, outliers=2, min_prefill=16, kernel=kernel).load_prefill(recs)
    layer, rec = cache.layers[1], recs[1]
    lay = layer.layout
    g = torch.Generator().manual_seed(5)
    new_k, new_v = [], []
    for step in range(4):
        q = torch.randn(B, H, 1, D, generator=g)
        k1, v1 = torch.randn(B, Hkv, 1, D, generator=g), torch.randn(B, Hkv, 1, D, generator=g)
        new_k.append(k1); new_v.append(v1)
        out = cache.step(1, q, k1, v1)
        T = lay.ctx_chunks * C
        for b in range(B):
            for h in range(Hkv):
                chunks = layer.slot_ids[b, h].tolist()
                assert len(set(chunks)) == lay.selected_chunks
                static_k = layer.buf.k[b, h, :layer.sel_start]                  # local window + outliers, exact
                idx = torch.tensor([c * C + j for c in chunks for j in range(C)])
                keys = torch.cat([static_k, rec.keys[b, h, idx], torch.cat(new_k, 2)[b, h]])
                vals = torch.cat([layer.buf.v[b, h, :layer.sel_start], rec.values[b, h, idx], torch.cat(new_v, 2)[b, h]])
                qh = q[b, h * (H // Hkv):(h + 1) * (H // Hkv), 0]
                ref = ((qh @ keys.T) * D ** -0.5).softmax(-1) @ vals
                torch.testing.assert_close(out[b, 0, h * (H // Hkv):(h + 1) * (H // Hkv)], ref, rtol=1e-4, atol=1e-4)
                # the static part really is the local window and the recorded outlier chunks
                torch.testing.assert_close(static_k[:lay.local_tokens], rec.keys[b, h, T:])
    assert 0 < cache.stats()["hit_rate"] < 1

# ---------------------------------------------------------------- the value store: gather kernel, fp8, host memory, batch repeat

_gather_inputs = gather_inputs

GSHAPES = [(1, 1, 5, 8, 32, 3), (2, 3, 17, 8, 64, 5), (3, 2, 9, 5, 48, 7), (2, 2, 4, 3, 16, 4)]
gids = lambda s: "B{}-H{}-N{}-C{}-D{}-k{}".format(*s)

GRIDS = [None, 1, 3]          # one program per chunk; the SM-light grid with one program (it loops over everything) and three
gpid = lambda p: "Pall" if p is None else f"P{p}"

@pytest.mark.parametrize("programs", GRIDS, ids=gpid)
@pytest.mark.parametrize("shape", GSHAPES, ids=[gids(s) + "-fp32" for s in GSHAPES])
def test_gather_kernel_matches_reference_and_writes_only_the_misses(shape, programs):
    B, Hkv, N, C, D, k = shape
    v, src, _, ids, slots, counts = _gather_inputs(*shape, device=DEV)
    a = torch.full((B, Hkv, k * C, D), float("nan"), device=DEV); b = a.clone()
    gather_chunks_ref(src, None, ids, slots, counts, a, C)
    gather_chunks(src, None, ids, slots, counts, b, C, programs=programs)
    assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
    # the reference against the definition, entry by entry
    for bb in range(B):
        for h in range(Hkv):
            for i in range(k):
                rows = a[bb, h, int(slots[bb, h, i]) * C:(int(slots[bb, h, i]) + 1) * C]
                if i < counts[bb, h]: assert torch.equal(rows, v[bb, h, int(ids[bb, h, i])].view(C, D))
                else: assert rows.isnan().all()

@pytest.mark.parametrize("programs", GRIDS, ids=gpid)
@pytest.mark.parametrize("shape", GSHAPES, ids=[gids(s) + "-fp8" for s in GSHAPES])
def test_gather_kernel_dequantizes_fp8_like_the_reference(shape, programs):
    B, Hkv, N, C, D, k = shape
    _, src, scale, ids, slots, counts = _gather_inputs(*shape, seed=4, fp8=True, device=DEV)
    a = torch.full((B, Hkv, k * C, D), float("nan"), device=DEV); b = a.clone()
    gather_chunks_ref(src, scale, ids, slots, counts, a, C)
    gather_chunks(src, scale, ids, slots, counts, b, C, programs=programs)
    assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())

def test_gather_into_a_buffer_view_and_bad_inputs():
    B, Hkv, N, C, D, k = 2, 2, 7, 4, 16, 3
    _, src, _, ids, slots, counts = _gather_inputs(B, Hkv, N, C, D, k, seed=1, device=DEV)
    buf = torch.full((B, Hkv, 40, D), float("nan"), device=DEV)
    view = buf[:, :, 10:10 + k * C]                                      # the selected-chunk region of a TokenBuffer
    gather_chunks(src, None, ids, slots, counts, view, C)
    assert buf[:, :, :10].isnan().all() and buf[:, :, 10 + k * C:].isnan().all()
    with pytest.raises(ValueError, match="C\\*D"): gather_chunks(src, None, ids, slots, counts, torch.empty(B, Hkv, k * C, D + 1, device=DEV), C)
    with pytest.raises(ValueError, match="counts"): gather_chunks(src, None, ids, slots, counts[:1], view, C)
    with pytest.raises(TypeError, match="scales"): gather_chunks(src, torch.ones(B, Hkv, N, device=DEV), ids, slots, counts, view, C)
    with pytest.raises(ValueError, match="rows must be contiguous"): gather_chunks(src, None, ids, slots, counts, view.transpose(2, 3).contiguous().transpose(2, 3), C)
    with pytest.raises(ValueError, match="programs must be None or an int >= 1"): gather_chunks(src, None, ids, slots, counts, view, C, programs=0)
    with pytest.raises(ValueError, match="fetch_programs must be None or an int >= 1"): ShadowKVConfig(fetch_programs=0)

def test_fp8_chunks_round_trip_and_reference_fetch():
    v, src, scale, ids, slots, counts = _gather_inputs(2, 3, 11, 8, 32, 4, seed=2, fp8=True)
    assert src.dtype == torch.float8_e4m3fn and scale.shape == v.shape[:3]
    back = dequantize_chunks(src, scale, torch.float32)
    assert ((back - v).abs() <= v.abs() * 2 ** -4 + scale[..., None] * 2 ** -9).all()      # e4m3: 3 mantissa bits (+ subnormals)
    assert torch.allclose(src.float().abs().amax(-1), torch.full_like(scale, FP8_MAX))     # each chunk uses the full fp8 range
    out = torch.full((2, 3, 4 * 8, 32), float("nan"))
    gather_chunks_ref(src, scale, ids, slots, counts, out, 8)
    b, h = 1, 2
    if counts[b, h] > 0:
        torch.testing.assert_close(out[b, h, int(slots[b, h, 0]) * 8:(int(slots[b, h, 0]) + 1) * 8], back[b, h, int(ids[b, h, 0])].view(8, 32))
    zeros = torch.zeros(1, 1, 2, 16)                                       # an all-zero chunk: no division by zero
    q, s = quantize_chunks_fp8(zeros)
    assert torch.equal(dequantize_chunks(q, s, torch.float32), zeros)

@pytest.mark.parametrize("value_dtype", ["auto", "fp8"])
def test_fp8_values_decode_close_to_bf16(tiny, value_dtype):
    "fp8 values change attention outputs by about the fp8 rounding; the full-budget cache then matches full attention closely."
    ids = _ids(83)
    with torch.no_grad():
        ref = tiny(ids).logits[:, -1]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with ShadowKVCache(tiny, budget=1.0, rank=32, min_prefill=16, value_dtype=value_dtype) as cache:
                tiny(ids[:, :-1], past_key_values=cache, use_cache=True)
                out = tiny(ids[:, -1:], past_key_values=cache, use_cache=True).logits[:, -1]
    err = ((out - ref).norm() / ref.norm()).item()
    if value_dtype == "auto": assert err < 1e-5
    else:
        assert 1e-6 < err < 0.05 and cache.layers[0].v_host.dtype == torch.float8_e4m3fn
        assert cache.host_bytes() * 2 == sum(l.v_host.numel() * 2 for l in cache.layers)     # half the bytes of bf16 (1 B per value)

def test_new_settings_validation():
    with pytest.raises(ValueError, match="value_dtype"): ShadowKVConfig(value_dtype="int4")
    with pytest.raises(ValueError, match="value_fetch"): ShadowKVConfig(value_fetch="zero-copy")
    with pytest.raises(ValueError, match="reserve_tokens"): ShadowKVConfig(reserve_tokens=-1)

def test_batch_repeat_of_a_filled_cache_decodes_like_the_original():
    "Repeating a filled cache (one prefill shared by several sequences) gives every copy the original row's decode."
    cfg = tiny_llama_config()
    B, S, H, Hkv = 2, 160, cfg.num_attention_heads, cfg.num_key_value_heads
    D = cfg.hidden_size // H
    make = lambda: ShadowKV(budget=32, rank=12, outliers=2, min_prefill=16, reserve_tokens=2).make_cache(model_config=cfg)
    one, rep = make().load_prefill(_random_records(cfg, B, S, rank=12)), make().load_prefill(_random_records(cfg, B, S, rank=12))
    rep.batch_repeat_interleave(3)
    g = torch.Generator().manual_seed(7)
    for step in range(4):                                              # past reserve_tokens=2: the buffers grow on the way
        q, k1, v1 = torch.randn(B, H, 1, D, generator=g), torch.randn(B, Hkv, 1, D, generator=g), torch.randn(B, Hkv, 1, D, generator=g)
        r = lambda t: t.repeat_interleave(3, 0)
        for layer in range(cfg.num_hidden_layers):
            a, b = one.step(layer, q, k1, v1), rep.step(layer, r(q), r(k1), r(v1))
            torch.testing.assert_close(b, r(a), rtol=1e-5, atol=1e-5)
    assert rep.get_seq_length() == one.get_seq_length() == S + 4
    assert rep.host_bytes() == 3 * one.host_bytes() and rep.stats()["hit_rate"] == pytest.approx(one.stats()["hit_rate"])
    with pytest.raises(ValueError, match="repeats"): rep.layers[0].batch_repeat_interleave(0)

# ---------------------------------------------------------------- CUDA (run on the GPU machine: pytest tests/test_shadowkv.py -k cuda)

cuda = pytest.mark.gpu      # the compiled kernels, the side-stream and zero-copy value fetch

@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=[ids_of(s) for s in SHAPES])
def test_cuda_kernel_matches_reference(shape, dtype):
    B, Sc, R, Hkv, D, C, n = shape
    U, SV, cos, sin, pos, ids = (t.cuda() for t in _kernel_inputs(*shape))
    U, SV = U.to(dtype), SV.to(dtype)
    g = torch.Generator().manual_seed(3)
    slots = torch.stack([torch.randperm(n, generator=g) for _ in range(B * Hkv)]).view(B, Hkv, n).cuda()
    counts = torch.randint(0, n + 1, (B, Hkv), generator=g).cuda()
    a = torch.full((B, Hkv, n * C, D), float("nan"), device="cuda", dtype=dtype); b = a.clone()
    shadow_keys_ref(U, SV, cos, sin, pos, ids, C, slots=slots, counts=counts, out=a)
    shadow_keys(U, SV, cos, sin, pos, ids, C, slots=slots, counts=counts, out=b)
    assert torch.equal(a.isnan(), b.isnan())
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(b.float().nan_to_num(), a.float().nan_to_num(), **tol)

@cuda
def test_cuda_runtime_exact_and_side_stream_fetch(tiny):
    m = tiny.cuda()
    ids = _ids(200).cuda()
    with torch.no_grad():
        ref = m.generate(ids, **GEN, output_logits=True, return_dict_in_generate=True)
        with pytest.warns(UserWarning, match="every chunk"):
            with ShadowKVCache(m, budget=1.0, rank=32, min_prefill=16) as c:
                exact = m.generate(ids, **GEN, past_key_values=c, output_logits=True, return_dict_in_generate=True)
        assert torch.equal(exact.sequences, ref.sequences)
        outs = {}
        for name, kw in dict(pinned=dict(offload_values=True, value_fetch="uva"), device=dict(offload_values=False), torch_ref=dict(kernel="torch"),
                             staged=dict(value_fetch="staged")).items():
            with ShadowKVCache(m, budget=24, rank=16, min_prefill=16, outliers=1, **kw) as c:
                outs[name] = m.generate(ids, **GEN, past_key_values=c, output_logits=True, return_dict_in_generate=True)
                st = c.stats()
                if name == "pinned":
                    assert c.layers[0].v_host.is_pinned() and 0 < st["hit_rate"] < 1 and st["fetched_mb"] > 0
    for name in ("device", "torch_ref", "staged"):
        assert torch.equal(outs[name].sequences, outs["pinned"].sequences), name
        for x, y in zip(outs[name].logits, outs["pinned"].logits): torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)

def test_a_dropped_cache_is_freed_at_once(tiny):
    "No reference cycle: GPU buffers and pinned host memory go when the last reference does (evaluation builds dozens of caches)."
    assert_dropped_caches_are_freed(tiny, [lambda: ShadowKVCache(tiny, budget=16, rank=8, min_prefill=16),
                                           lambda: ShadowKV(budget=16, rank=8, min_prefill=16).make_cache(tiny)], _ids(100), **GEN)

@cuda
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("shape", GSHAPES, ids=[gids(s) for s in GSHAPES])
def test_cuda_gather_reads_page_locked_host_memory(shape, fp8):
    B, Hkv, N, C, D, k = shape
    v, src, scale, ids, slots, counts = _gather_inputs(*shape, seed=3, fp8=fp8)
    host = host_empty(src.shape, src.dtype if fp8 else torch.bfloat16)
    host.copy_(src if fp8 else src.to(torch.bfloat16))
    assert host.is_pinned() and host.untyped_storage().nbytes() == src.numel() * host.element_size()
    a = torch.full((B, Hkv, k * C, D), float("nan"), device="cuda", dtype=torch.bfloat16); b = a.clone()
    dev = lambda t: None if t is None else t.cuda()
    gather_chunks_ref(host, dev(scale), dev(ids), dev(slots), dev(counts), a, C)
    gather_chunks(host, dev(scale), dev(ids), dev(slots), dev(counts), b, C)
    assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())

@cuda
def test_cuda_fp8_and_repeat_through_generate(tiny):
    m = tiny.cuda()
    ids = _ids(200).cuda()
    with torch.no_grad():
        outs = {}
        for name, kw in dict(bf16=dict(), fp8=dict(value_dtype="fp8"), fp8_staged=dict(value_dtype="fp8", value_fetch="staged")).items():
            with ShadowKVCache(m, budget=24, rank=16, min_prefill=16, outliers=1, **kw) as c:
                outs[name] = m.generate(ids, **GEN, past_key_values=c, output_logits=True, return_dict_in_generate=True)
        for x, y in zip(outs["fp8"].logits, outs["fp8_staged"].logits): torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)
        for x, y in zip(outs["fp8"].logits, outs["bf16"].logits): assert ((x - y).norm() / y.norm()) < 0.05
