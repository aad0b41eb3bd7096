"""Tensorized models: per-dimension RoPE attention vs its dense operator in both causal modes (dominance, complete), the engines (the
Triton kernel: the interpreter on CPU, compiled on CUDA tensors where a GPU is visible; SDPA; the reference), tensorize() on a tiny Llama,
decoding and its stored state, the RULER adapter, checkpoints, bad inputs."""
import math
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
import longctx_nb.core  # noqa: F401  (TRITON_INTERPRET=1 on CPU before triton is imported)
from longctx_nb.models import repeat_kv, attention_modules, train_lm, apply_rope, set_rope_scaling
from longctx_nb.tensorized import tensorized_attention_ref
from longctx_nb.tensorized_models import (TensorLayout, make_layout, tensorized_rope_attention, tensorized_rope_matrix, tensorize,
                                          cast_keep_rope, TensorizedRotary, rope_backend, evaluate_tensorized, save_cpt, load_cpt)
from helpers import needs_interpreter
MODES = ["dominance", "complete"]

DEV = "cuda" if torch.cuda.is_available() else "cpu"   # the kernel's tensors: compiled on CUDA, the interpreter on CPU


def rope_table(n, D=8, theta=50.0, dtype=torch.float64):
    inv = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    f = torch.outer(torch.arange(n, dtype=torch.float64), inv); e = torch.cat([f, f], -1)
    return e.cos().to(dtype), e.sin().to(dtype)


def rand(B, H, Hkv, L, D, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, L, D, generator=g, dtype=dtype) for h in (H, Hkv, Hkv)]


# ---------------------------------------------------------------- layout
def test_layout_outer_dimension_grows_and_coordinates_are_length_free():
    lay = make_layout(2, length=2048)
    assert lay.shape == (64, 32) and lay.shape_for(2048) == (64, 32) and lay.shape_for(32768) == (1024, 32)
    assert lay.shape_for(1000) == (32, 32) and lay.shape_for(5) == (1, 32)          # 1000 doesn't factor by 32: padded to 1024
    p = torch.arange(3000)
    c = lay.coords(p)
    assert torch.equal(c[:, 0] * 32 + c[:, 1], p) and int(c[:, 1].max()) == 31
    assert make_layout((4, 4, 3)).strides == (12, 3, 1) and make_layout(None, length=8192).shape == (128, 64)
    assert make_layout(lay) is lay


@pytest.mark.parametrize("args,exc,match", [(dict(shape=(8, 8), grow="none"), ValueError, "fewer than the sequence length"),
                                            (dict(shape=(8, 0)), ValueError, "positive ints"),
                                            (dict(shape=(8, 8), grow="sideways"), ValueError, "grow must be"),
                                            (dict(shape="8x8"), TypeError, "shape must be None, an int")],
                         ids=["product-too-small", "zero-factor", "bad-grow", "string-shape"])
def test_layout_errors(args, exc, match):
    with pytest.raises((exc, TypeError), match=match):
        make_layout(args.get("shape"), grow=args.get("grow", "outer")).shape_for(100)


# ---------------------------------------------------------------- the attention op
@pytest.mark.parametrize("B,H,Hkv,L,D,shape", [(1, 1, 1, 27, 8, (3, 3, 3)), (2, 4, 2, 45, 8, (4, 4, 3)), (1, 3, 1, 30, 8, (5, 6)),
                                               (1, 2, 2, 19, 8, (19,))], ids=["3x3x3", "pad-GQA-4x4x3", "5x6-GQA3", "m1-T19"])
@pytest.mark.parametrize("causal", MODES)
@pytest.mark.parametrize("backend", ["torch", "sdpa"])
def test_hops_equal_dense_per_dimension_rope_matrix(B, H, Hkv, L, D, shape, causal, backend):
    q, k, v = rand(B, H, Hkv, L, D)
    o = tensorized_rope_attention(q, k, v, shape, rope_table, backend=backend, causal=causal)
    A = tensorized_rope_matrix(q, k, shape, rope_table, causal=causal)
    dense = (A @ F.pad(repeat_kv(v, H // Hkv), (0, 0, 0, math.prod(shape) - L)))[:, :, :L]
    torch.testing.assert_close(o, dense, rtol=1e-12, atol=1e-12)
    assert (A[0, 0].triu(1) == 0).all()


@pytest.mark.parametrize("shape,L", [((4, 4, 3), 45), ((5, 6), 27), ((3, 2, 3, 3), 54)], ids=["4x4x3-T45", "pad-5x6-T27", "3x2x3x3-T54"])
def test_complete_support_is_exactly_the_lower_triangle(shape, L):
    "The complete mode's dense operator is positive on every (p, j <= p) and zero above the diagonal; the dominance one misses pairs."
    q, k, _ = rand(1, 2, 1, L, 8, seed=3)
    A = tensorized_rope_matrix(q, k, shape, rope_table, causal="complete")[0, :, :L, :L]
    assert torch.equal(A > 0, torch.ones(L, L, dtype=torch.bool).tril().expand_as(A))
    A_d = tensorized_rope_matrix(q, k, shape, rope_table, causal="dominance")[0, :, :L, :L]
    assert (A_d.triu(1) == 0).all() and ((A_d > 0).sum() < (A > 0).sum())


def test_per_dimension_rope_sees_only_relative_distance_along_the_hop():
    "Shifting every coordinate's RoPE phase by a constant leaves the output unchanged (scores depend on j_k - i_k only)."
    q, k, v = rand(1, 2, 1, 24, 8)
    a = tensorized_rope_attention(q, k, v, (4, 6), rope_table, backend="torch")
    b = tensorized_rope_attention(q, k, v, (4, 6), lambda n: (rope_table(n + 5)[0][5:], rope_table(n + 5)[1][5:]), backend="torch")
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("causal", MODES)
def test_no_rope_equals_the_fused_op_and_m1_equals_sdpa(causal):
    q, k, v = rand(2, 4, 2, 50, 8)
    torch.testing.assert_close(tensorized_rope_attention(q, k, v, (4, 4, 4), None, backend="torch", causal=causal),
                               tensorized_attention_ref(q, k, v, (4, 4, 4), causal=causal), rtol=1e-12, atol=1e-12)
    cos, sin = rope_table(50)
    ref = F.scaled_dot_product_attention(apply_rope(q, cos, sin), repeat_kv(apply_rope(k, cos, sin), 2), repeat_kv(v, 2), is_causal=True)
    torch.testing.assert_close(tensorized_rope_attention(q, k, v, (50,), rope_table, backend="torch", causal=causal), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("causal", MODES)
@pytest.mark.parametrize("backend", ["torch", "sdpa"])
def test_causality_exact_zero_gradients(causal, backend):
    "No output reads a later position: its gradient with respect to q, k and v there is exactly zero (a padded 3 x 7 fold, GQA)."
    q, k, v = (t.requires_grad_() for t in rand(1, 2, 1, 20, 8))
    o = tensorized_rope_attention(q, k, v, (3, 7), rope_table, backend=backend, causal=causal)
    for p in range(20):
        gq, gk, gv = torch.autograd.grad(o[:, :, p].sum(), (q, k, v), retain_graph=True)
        assert all((g[:, :, p + 1:] == 0).all() for g in (gq, gk, gv))
        if causal == "complete": assert (gv[:, :, :p + 1].abs().sum(-1) > 0).all()        # ... and it reads every earlier one


@pytest.mark.parametrize("causal", MODES)
def test_sdpa_engine_matches_reference_fwd_bwd(causal):
    q, k, v = rand(2, 4, 2, 37, 8, dtype=torch.float32)
    do = torch.randn(2, 4, 37, 8, generator=torch.Generator().manual_seed(1))
    outs = {}
    for backend in ("sdpa", "torch"):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        o = tensorized_rope_attention(qq, kk, vv, (5, 8), lambda n: tuple(t.float() for t in rope_table(n)), backend=backend, causal=causal)
        outs[backend] = (o, *torch.autograd.grad(o, (qq, kk, vv), do))
    for a, b in zip(outs["sdpa"], outs["torch"]): torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("B,H,Hkv,L,D,shape", [(1, 2, 1, 37, 16, (5, 8)), (2, 2, 2, 20, 16, (3, 3, 3))], ids=["GQA-5x8-T37", "B2-3x3x3-T20"])
@pytest.mark.parametrize("causal", MODES)
def test_triton_path_matches_reference_fwd_bwd(B, H, Hkv, L, D, shape, causal):
    """backend='triton' (float32) vs backend='torch', forward and backward, in both modes (complete: 10's tensorized_complete_hop per hop);
    kernel buffers start as NaN (conftest's nan_poison)."""
    q, k, v = (t.float().to(DEV) for t in rand(B, H, Hkv, L, D))
    rope = lambda n: tuple(t.float().to(DEV) for t in rope_table(n, D=D))
    do = torch.randn(B, H, L, D, generator=torch.Generator().manual_seed(1)).to(DEV)
    outs = {}
    for backend in ("triton", "torch"):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        o = tensorized_rope_attention(qq, kk, vv, shape, rope, backend=backend, causal=causal)
        outs[backend] = (o, *torch.autograd.grad(o, (qq, kk, vv), do))
    for a, b in zip(outs["triton"], outs["torch"]):
        assert a.isfinite().all()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_op_bad_inputs():
    q, k, v = rand(1, 2, 1, 20, 8)
    with pytest.raises(ValueError, match="fewer than the sequence length"): tensorized_rope_attention(q, k, v, (4, 4), rope_table)
    with pytest.raises(ValueError, match="H % H_kv"): tensorized_rope_attention(q, k[:, :, :10], v, (4, 5), rope_table)
    with pytest.raises(ValueError, match="backend"): tensorized_rope_attention(q, k, v, (4, 5), rope_table, backend="cuda")
    with pytest.raises(ValueError, match="causal must be one of"): tensorized_rope_attention(q, k, v, (4, 5), rope_table, causal="exact")
    with pytest.raises(TypeError, match="causal must be a bool"): tensorized_rope_attention(q, k, v, (4, 5), rope_table, causal=1)
    with pytest.raises(ValueError, match="is causal"): tensorized_rope_attention(q, k, v, (4, 5), rope_table, causal="none")
    with pytest.raises(ValueError, match="backend must be one of"): tensorized_rope_attention(q, k, v, (4, 5), rope_table, causal="complete", backend="flash")


def test_backend_resolution():
    assert rope_backend("auto", True, "cpu") == "torch" and rope_backend("auto", "complete", "cpu") == "torch"
    assert rope_backend("auto", "dominance", "cuda") == "triton" and rope_backend("auto", "complete", "cuda") == "triton"
    assert rope_backend("sdpa", "complete", "cpu") == "sdpa" and rope_backend("triton", "complete", "cpu") == "triton"
    with pytest.raises(ValueError, match="causal must be one of"): rope_backend("auto", "exact", "cpu")
    with pytest.raises(ValueError, match="backend must be one of"): rope_backend("flash", "complete", "cpu")


# ---------------------------------------------------------------- tensorize()
@pytest.mark.parametrize("causal", MODES)
def test_tensorize_one_dimension_is_the_original_model(tiny_llama, causal):
    ids = torch.randint(0, 128, (2, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = tiny_llama(ids).logits
        tz = tensorize(tiny_llama, shape=1, length=33, causal=causal)
        torch.testing.assert_close(tz(ids).logits, ref, rtol=1e-4, atol=1e-4)
        flat = tensorize(tiny_llama, shape=1, length=33, rope="flat")
        torch.testing.assert_close(flat(ids).logits, ref, rtol=1e-4, atol=1e-4)
        # the original is untouched: same logits, no hook, sdpa, its own rotary module; the weights are equal
        torch.testing.assert_close(tiny_llama(ids).logits, ref, rtol=0, atol=0)
    assert tiny_llama.config._attn_implementation != "longctx" and getattr(tiny_llama, "tensorized", None) is None
    assert all(getattr(m, "longctx_attention", None) is None for m in attention_modules(tiny_llama))
    assert not isinstance(tiny_llama.model.rotary_emb, TensorizedRotary) and isinstance(tz.model.rotary_emb, TensorizedRotary)
    assert all(torch.equal(a, b) for a, b in zip(tiny_llama.state_dict().values(), tz.state_dict().values()))


@pytest.mark.parametrize("causal", MODES)
def test_tensorize_inplace_and_prefix_stability_with_padding(tiny_llama, causal):
    ids = torch.randint(0, 128, (1, 70), generator=torch.Generator().manual_seed(1))
    tz = tensorize(tiny_llama, shape=(4, 8), inplace=True, causal=causal)
    assert tz is tiny_llama and tz.tensorized.layout.shape_for(70) == (9, 8)      # 70 = 8 * 8.75: padded to 72
    with torch.no_grad():
        h70 = tz.model(ids, use_cache=False).last_hidden_state
        h45 = tz.model(ids[:, :45], use_cache=False).last_hidden_state
    torch.testing.assert_close(h70[:, :45], h45, rtol=1e-5, atol=1e-5)


def _dense_attention_model(tz):
    "A copy of tensorized `tz` whose every layer computes attention as the dense per-dimension-RoPE operator (float64) times V."
    import copy
    from functools import partial
    from longctx_nb.models import set_attention_hook
    dense, spec = copy.deepcopy(tz), tz.tensorized
    def hook(module, query, key, value, attention_mask, scaling=None, dropout=0.0, rotary=None, **kw):
        L = query.shape[2]; shape = spec.layout.shape_for(L); H = query.shape[1]
        rope = lambda n: tuple(t.double() for t in rotary.table(n, query))
        A = tensorized_rope_matrix(query, key, shape, rope, scaling, causal=spec.causal)
        out = (A @ F.pad(repeat_kv(value.double(), H // value.shape[1]), (0, 0, 0, math.prod(shape) - L)))[:, :, :L]
        return out.to(query.dtype).transpose(1, 2), None
    set_attention_hook(dense, partial(hook, rotary=dense.model.rotary_emb))
    return dense


@pytest.mark.parametrize("causal", MODES)
def test_model_forward_equals_the_dense_operator(tiny_llama, causal):
    "The tensorized tiny Llama (GQA, padded: 27 tokens into 4 x 8) equals the same model with every layer's attention the dense operator."
    tz = tensorize(tiny_llama, shape=(4, 8), causal=causal)
    ids = torch.randint(0, 128, (2, 27), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(tz(ids).logits, _dense_attention_model(tz)(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", MODES)
@pytest.mark.parametrize("rope,shape", [("tensorized", (4, 4)), ("tensorized", (2, 3, 4)), ("flat", (4, 4))], ids=["perdim-4x4", "perdim-2x3x4", "flat-4x4"])
def test_incremental_decoding_equals_full_forward(tiny_llama, rope, shape, causal):
    tz = tensorize(tiny_llama, shape=shape, rope=rope, causal=causal)
    prompt = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        gen = tz.generate(prompt, max_new_tokens=17, do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0)
        full = tz(gen.sequences[:, :-1]).logits[:, prompt.shape[1] - 1:]
        nocache = tz.generate(prompt, max_new_tokens=17, do_sample=False, use_cache=False, pad_token_id=0)
    torch.testing.assert_close(torch.stack(gen.scores, 1), full, rtol=1e-4, atol=1e-4)
    assert torch.equal(gen.sequences, nocache)


@pytest.mark.parametrize("causal", MODES)
def test_chunked_prefill_through_the_cache(tiny_llama, causal):
    "Two forwards through one DynamicCache (13 tokens, then 9 at once) equal one forward over all 22."
    from transformers import DynamicCache
    tz = tensorize(tiny_llama, shape=(3, 4), causal=causal)
    ids = torch.randint(0, 128, (1, 22), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = tz(ids).logits
        cache = DynamicCache(config=tz.config)
        a = tz(ids[:, :13], past_key_values=cache, use_cache=True).logits
        b = tz(ids[:, 13:], past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(torch.cat([a, b], 1), full, rtol=1e-4, atol=1e-4)
    state = cache.tensorized_values[0]
    assert set(cache.tensorized_values) == {0, 1} and state.length == 22
    assert state.values[0].n == (22 if causal == "dominance" else 20)          # complete: the aggregates of the 5 completed rows of 4


def test_complete_decoding_stores_each_aggregate_once_and_reads_it(tiny_llama):
    """Complete mode, 3 dims (2 x 3 x 4): after a 7-token prefill and 30 decoded tokens the cache holds the aggregates of the completed blocks
    only (rows of 4 for hop 1, planes of 12 for hop 2), each computed exactly once (prefill + decode), the queries of the unfinished plane;
    and a decode step reads the stored aggregates of earlier fibres: changing them changes the next logits."""
    from transformers import DynamicCache
    tz = tensorize(tiny_llama, shape=(2, 3, 4), causal="complete")
    ids = torch.randint(0, 128, (1, 38), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        cache = DynamicCache(config=tz.config)
        tz(ids[:, :7], past_key_values=cache, use_cache=True)
        assert [v.n for v in cache.tensorized_values[0].values] == [4, 0] and cache.tensorized_values[0].queries.shape[2] == 7
        for t in range(7, 37): tz(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
        for state in cache.tensorized_values.values():
            assert state.length == 37 and [v.n for v in state.values] == [36, 36] and state.rows == [36, 36]
            assert state.queries.shape[2] == 1 and state.values[0].view().shape == (1, 4, 36, 16)
        ref = tz(ids[:, 37:], past_key_values=copy_cache(cache), use_cache=True).logits
        for state in cache.tensorized_values.values():
            state.values[1].buf[:, :, :12] *= 0.5                       # the first plane's aggregates, read by hop 3 of token 37 (plane 3)
        changed = tz(ids[:, 37:], past_key_values=cache, use_cache=True).logits
    assert not torch.allclose(ref, changed)
    full = tz(ids).logits[:, -1:]
    torch.testing.assert_close(ref, full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("p", [37, 301])
def test_a_decode_step_scores_sum_of_fibre_lengths(p):
    """A decode step's attention work is O(sum_k n_k), not O(p): at position p, hop k scores the i_k + 1 keys of the causal part of p's
    fibre (FLOPs of the per-token rule: q.k and p.v per key, per head), the same in both modes (the complete mode reads stored aggregates)."""
    from torch.utils.flop_counter import FlopCounterMode
    from longctx_nb.tensorized_models import _decode_token
    lay, H, D = make_layout((4, 8)), 2, 16
    k, v, past = torch.randn(1, H, p + 1, D), torch.randn(1, H, p + 1, D), [torch.randn(1, H, p + 1, D)]
    with FlopCounterMode(display=False) as fc: _decode_token(torch.randn(1, H, 1, D), k, v, past, p, lay, None, D ** -0.5)
    assert fc.get_total_flops() == 4 * H * D * ((p // 8 + 1) + (p % 8 + 1))


def copy_cache(cache):
    "A deep copy of a DynamicCache with its tensorized hop states."
    import copy
    return copy.deepcopy(cache)


@pytest.mark.parametrize("causal", MODES)
def test_tensorized_model_trains(tiny_llama, causal):
    tz = tensorize(tiny_llama, shape=(4, 4), causal=causal)
    before = tz.model.layers[0].self_attn.q_proj.weight.detach().clone()
    batches = iter([torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(s)) for s in range(3)])
    hist = train_lm(tz, batches, steps=3, lr=1e-3, progress=False)
    assert all(math.isfinite(h["loss"]) for h in hist)
    assert not torch.equal(before, tz.model.layers[0].self_attn.q_proj.weight.detach().cpu())   # compared on the CPU, wherever the weights live


def test_tensorize_bad_inputs(tiny_llama):
    from transformers import GPT2Config, GPT2LMHeadModel
    with pytest.raises(TypeError, match="supported attention layout"): tensorize(GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50)))
    with pytest.raises(TypeError, match="supported attention layout"): tensorize(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="rope must be"): tensorize(tiny_llama, rope="alibi")
    with pytest.raises(ValueError, match="backend must be"): tensorize(tiny_llama, backend="flash")
    tz = tensorize(tiny_llama, shape=(4, 4))
    with pytest.raises(ValueError, match="already tensorized"): tensorize(tz)
    ids = torch.randint(0, 128, (2, 20))
    with pytest.raises(ValueError, match="unpadded"):
        tz(ids, attention_mask=torch.tensor([[1] * 20, [0] * 4 + [1] * 16]))
    with pytest.raises(ValueError, match="position ids"):
        tz(ids, position_ids=torch.arange(20).flip(0)[None])
    fixed = tensorize(tiny_llama, shape=(4, 4), grow="none")
    with pytest.raises(ValueError, match="fewer than the sequence length 20"): fixed(ids)
    with pytest.raises(ValueError, match="causal must be one of"): tensorize(tiny_llama, causal="exact")
    with pytest.raises(ValueError, match="a causal LM needs"): tensorize(tiny_llama, causal=False)
    with pytest.raises(ValueError, match="backend must be one of"): tensorize(tiny_llama, causal="complete", backend="flash")
    assert tensorize(tiny_llama, shape=(4, 4), causal="complete", backend="triton").tensorized.backend == "triton"   # every engine has both modes


def test_rope_scaling_copies_for_the_baselines(tiny_llama):
    pi = set_rope_scaling(tiny_llama, "linear", 4.0, inplace=False)
    x = torch.zeros(1, 1)
    torch.testing.assert_close(pi.model.rotary_emb(x, torch.tensor([[40]]))[0], tiny_llama.model.rotary_emb(x, torch.tensor([[10]]))[0])
    yarn = set_rope_scaling(tiny_llama, "yarn", 4.0, inplace=False)
    assert yarn.model.rotary_emb.attention_scaling > 1 and tiny_llama.config.rope_parameters["rope_type"] == "default"
    with pytest.raises(TypeError, match="rotary_emb"):          # a tensorized model's rotary module is a TensorizedRotary
        set_rope_scaling(tensorize(tiny_llama, shape=(4, 4)), "linear", 2.0, inplace=False)


@pytest.mark.parametrize("causal,kernel", [("dominance", "tensorized_attention"), ("complete", "tensorized_complete_hop")])
def test_fibre_batches_split_under_the_grid_limit(monkeypatch, causal, kernel):
    "More fibres x heads than CUDA's grid-y limit: the Triton engine runs a hop in chunks of fibres and gives the same result, in both modes."
    import longctx_nb.tensorized_models as TM
    q, k, v = (t.float().to(DEV) for t in rand(1, 2, 1, 24, 16))
    rope = lambda n: tuple(t.float().to(DEV) for t in rope_table(n, D=16))
    whole = tensorized_rope_attention(q, k, v, (2, 3, 4), rope, backend="triton", causal=causal)
    calls, real = [], getattr(TM, kernel)
    monkeypatch.setattr(TM, kernel, lambda *a, **kw: calls.append(a[0].shape[0]) or real(*a, **kw))
    monkeypatch.setattr(TM, "_MAX_GRID_Y", 5)          # 5 // 2 heads: 2 fibres per call
    torch.testing.assert_close(tensorized_rope_attention(q, k, v, (2, 3, 4), rope, backend="triton", causal=causal), whole, rtol=1e-6, atol=1e-6)
    assert max(calls) == 2 and len(calls) == 6 // 2 + 8 // 2 + 12 // 2      # fibres per hop: 24/4, 24/3, 24/2


def test_cast_keep_rope(tiny_llama):
    tz = tensorize(tiny_llama, shape=(4, 4))
    cast_keep_rope(tz, torch.bfloat16)
    assert tz.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16 and tz.model.rotary_emb.base.inv_freq.dtype == torch.float32


@pytest.mark.parametrize("causal", MODES)
def test_beam_search_with_cache_equals_without(tiny_llama, causal):
    "Beam search reorders the cache: the stored hop states follow, so cached and uncached beam search agree."
    tz = tensorize(tiny_llama, shape=(3, 4), causal=causal)
    prompt = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a = tz.generate(prompt, max_new_tokens=12, num_beams=3, do_sample=False, pad_token_id=0)
        b = tz.generate(prompt, max_new_tokens=12, num_beams=3, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(a, b)


# ---------------------------------------------------------------- the forward's overheads
class Syncs(TorchDispatchMode):
    "Counts host reads of device values (aten._local_scalar_dense) below autograd while active."
    n = 0
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += str(func.overloadpacket) == "aten._local_scalar_dense"
        return func(*args, **(kwargs or {}))


def test_rope_tables_are_cached_and_checks_run_once_per_forward(tiny_llama):
    "A warm forward builds no RoPE table and reads the host once (the position check) beyond the untensorized model's own syncs."
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(7))
    def syncs(m):
        with torch.no_grad(), Syncs() as c: m.model(input_ids=ids, use_cache=False)
        return c.n
    tz = tensorize(tiny_llama, shape=(5, 8), causal="complete")
    with torch.no_grad(): tz.model(input_ids=ids, use_cache=False)
    built = dict(tz.model.rotary_emb._cache)
    assert syncs(tz) <= syncs(tiny_llama) + 1 and tz.model.rotary_emb._cache.keys() == built.keys()
    cos, sin = tz.model.rotary_emb(torch.zeros(2, 3), torch.arange(40)[None].expand(2, -1))
    assert cos.shape == (2, 40, 16) and cos.stride()[:2] == (0, 0) and (cos == 1).all() and (sin == 0).all()   # views of one row


def test_forward_ms_graphs_needs_cuda(tiny_llama):
    from longctx_nb.tensorized_models import forward_ms
    if torch.cuda.is_available(): pytest.skip("checks the message given where the model is not on a GPU")
    with pytest.raises(ValueError, match="captures a CUDA graph: the model is on cpu"): forward_ms(tiny_llama, 16, graphs=True)


@pytest.mark.parametrize("causal", MODES)
def test_forward_in_a_capture_reads_nothing_on_the_host(tiny_llama, causal, monkeypatch):
    """What a CUDA-graph capture requires, checked on CPU with the capture flag patched on: after an eager forward of the same shape a
    capture-mode forward makes no host read at all (transformers' own packed-sequence check is skipped while capturing too) and
    computes the same; a capture-mode forward at a shape no eager forward checked is refused, saying why."""
    import longctx_nb.tensorized_models as TM
    tz = tensorize(tiny_llama, shape=(5, 8), causal=causal)
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        eager = tz.model(input_ids=ids, use_cache=False).last_hidden_state
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
        with Syncs() as c: captured = tz.model(input_ids=ids, use_cache=False).last_hidden_state
        assert c.n == 0 and torch.equal(captured, eager)
        TM._LAST_CHECK.clear()
        with pytest.raises(RuntimeError, match="must be captured right after the same forward ran eagerly"):
            tz.model(input_ids=ids[:, :33], use_cache=False)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", MODES)
def test_forward_ms_graphs_times_full_and_tensorized_forwards(causal):
    "On CUDA: the graphed forward of the untouched and the tensorized model (Triton engine, padded shape) captures and times."
    from helpers import tiny_llama as make
    from longctx_nb.tensorized_models import forward_ms
    m = make().cuda()
    tz = tensorize(make().cuda(), shape=(7, 8), causal=causal, backend="triton")
    for model in (m, tz):
        for graphs in (False, True):
            ms = forward_ms(model, 50, batch=3, warmup=1, reps=3, graphs=graphs)
            assert math.isfinite(ms) and ms > 0


# ---------------------------------------------------------------- RULER adapter, checkpoints
@pytest.fixture(scope="module")
def smol_tok():
    from longctx_nb.models import load_tokenizer
    return load_tokenizer("smollm2-135m")


def test_evaluate_tensorized_matches_evaluate_fullkv_and_runs_tensorized(smol_tok):
    "On a plain model the adapter gives evaluate(FullKV)'s rows; on a tensorized one it decodes through the model's own cache."
    import helpers
    from longctx_nb.evals import TaskSample, evaluate
    from longctx_nb.kvcache import FullKV
    m = helpers.tiny_llama(vocab_size=len(smol_tok))
    g = torch.Generator().manual_seed(8)
    samples = [TaskSample("niah_single", torch.randint(0, 1000, (L,), generator=g).tolist(), ["123"], 6) for L in (24, 24, 24, 31)]
    a = evaluate({"m": FullKV()}, samples, m, smol_tok, batch_size=2)
    b = evaluate_tensorized({"m": m}, samples, smol_tok, batch_size=2)
    cols = ["method", "setting", "budget", "task", "length", "sample", "score", "attended_tokens", "prediction", "answers"]
    assert list(a.columns) == list(b.columns) and a[cols].equals(b[cols])
    tz = tensorize(m, shape=(3, 8), causal="complete")
    c = evaluate_tensorized({"tz": tz}, samples, smol_tok, batch_size=2)
    assert (c.method == "tensorized-complete").all() and len(c) == 4 and (c.attended_tokens == 4 + 8).all()   # sum of shape_for(S + 1)
    with pytest.raises(ValueError, match="no samples"): evaluate_tensorized({"tz": tz}, [], smol_tok)


@pytest.mark.parametrize("causal", [None, "complete"])
def test_save_and_load_cpt(tiny_llama, tmp_path, causal):
    m = tiny_llama if causal is None else tensorize(tiny_llama, shape=(3, 4), causal=causal)
    with torch.no_grad():
        for p in m.parameters(): p.add_(0.01)                            # "trained" weights
    save_cpt(m, tmp_path, "x", dict(steps=3))
    fresh = __import__("helpers").tiny_llama(seed=1)                      # another base: the weights must come from the file
    back, info = load_cpt(fresh, tmp_path, "x")
    ids = torch.randint(0, 128, (1, 13), generator=torch.Generator().manual_seed(9))
    with torch.no_grad(): torch.testing.assert_close(back(ids).logits, m(ids).logits, rtol=0, atol=0)
    assert info == dict(steps=3) and (getattr(back, "tensorized", None) is None) == (causal is None)
    if causal: assert back.tensorized == m.tensorized
    with pytest.raises(FileNotFoundError, match="part 'cpt-y'"): load_cpt(fresh, tmp_path, "y")


# ---------------------------------------------------------------- all hops' RoPE in one broadcast
def _per_hop_rope(q, k, v, shape, rope, mode):
    "The earlier path: each hop rotates its own fibres with apply_rope (the equality target of the one-broadcast rotation)."
    from longctx_nb.tensorized import fold, unfold, hop_order
    from longctx_nb.tensorized_models import _to_fibres, _from_fibres, HOPS
    B, H, L, D = q.shape; m = len(shape); qf, kf = fold(q, shape), fold(k, shape); c = a = fold(v, shape)
    for j, dim in enumerate(hop_order(m)):
        cos, sin = rope(shape[dim]); qh, kh = apply_rope(_to_fibres(qf, dim), cos, sin), apply_rope(_to_fibres(kf, dim), cos, sin)
        need_a = mode == "complete" and j < m - 1
        out, agg = HOPS["torch"](qh, kh, _to_fibres(a, dim), D ** -0.5, mode, _to_fibres(c, dim) if mode == "complete" and j > 0 else None, need_a)
        c = _from_fibres(out, B, shape, dim); a = _from_fibres(agg, B, shape, dim) if need_a else c
    return unfold(c, L)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape,L,H,Hkv", [((3, 5), 13, 4, 2), ((3, 2, 3), 17, 4, 1), ((5,), 5, 3, 3)])
def test_one_broadcast_rope_equals_per_hop(mode, shape, L, H, Hkv):
    q, k, v = (t.requires_grad_() for t in rand(2, H, Hkv, L, 8, seed=3))
    want = _per_hop_rope(q, k, v, shape, rope_table, mode); g = torch.randn_like(want)
    got = tensorized_rope_attention(q, k, v, shape, rope_table, backend="torch", causal=mode)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), g), torch.autograd.grad(want, (q, k, v), g)): torch.testing.assert_close(a, b)
    assert tensorized_rope_attention(q, k, v, shape, rope_table, backend="torch", causal=mode).equal(got)   # the cached tables
