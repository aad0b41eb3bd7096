"""Tensorized attention: formulation proofs on the reference, and the Triton kernel vs the reference in float32: in the interpreter on CPU,
or compiled on CUDA tensors where a GPU is visible (then the interpreter is off). Every test runs inside core.nan_poison() (conftest)."""
import math
import pytest
import torch
import torch.nn.functional as F
from helpers import needs_interpreter
import longctx_nb.core  # noqa: F401  (TRITON_INTERPRET=1 on CPU before triton is imported)
from longctx_nb.tensorized import (choose_factorization, tensorized_attention, tensorized_attention_ref, tensorized_attention_matrix,
                                   normalize_shape, causal_mode, tensorized_mask, causal_coverage, tensorized_cost, benchmark_vs_sdpa,
                                   tensorized_complete_hop, fold, unfold, hop_order)

DEV = "cuda" if torch.cuda.is_available() else "cpu"   # the kernel's tensors: compiled on CUDA, the interpreter on CPU


def rand(B, H, Hkv, L, D, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, L, D, generator=g, dtype=dtype).to(device) for h in (H, Hkv, Hkv)]


# ---------------------------------------------------------------- factorization
def test_choose_factorization():
    assert choose_factorization(64, 3) == (4, 4, 4)
    assert choose_factorization(1000, 3) == (10, 10, 10)
    assert choose_factorization(8192) == (128, 64) and choose_factorization(131072, 3) == (64, 64, 32)
    for L in [1, 2, 7, 97, 1000, 1023, 4099]:
        for m in (1, 2, 3, 4):
            s = choose_factorization(L, m)
            assert len(s) == m and math.prod(s) >= L
    assert all(n <= 512 for n in choose_factorization(1 << 20))
    assert normalize_shape(1000, (16, 8, 8)) == (16, 8, 8) and normalize_shape(1000, 2) == choose_factorization(1000, 2)


@pytest.mark.parametrize("bad,exc,match", [((0, 2), ValueError, "positive int"), ((10, 0), ValueError, "positive int")])
def test_choose_factorization_errors(bad, exc, match):
    with pytest.raises(exc, match=match): choose_factorization(*bad)


# ---------------------------------------------------------------- (a) the dense matrix
@pytest.mark.parametrize("B,H,Hkv,L,D,shape,causal", [(1, 1, 1, 64, 8, (4, 4, 4), True), (2, 4, 2, 50, 8, (4, 4, 4), True),
                                                     (1, 2, 1, 27, 8, (3, 3, 3), False), (1, 1, 1, 30, 4, (5, 6), True)],
                         ids=["4x4x4", "pad-GQA-4x4x4", "full-3x3x3", "5x6"])
def test_output_is_dense_matrix_times_v(B, H, Hkv, L, D, shape, causal):
    q, k, v = rand(B, H, Hkv, L, D, dtype=torch.float64)
    A = tensorized_attention_matrix(q, k, shape, causal)
    vp = F.pad(v.repeat_interleave(H // Hkv, 1), (0, 0, 0, math.prod(shape) - L))
    torch.testing.assert_close(tensorized_attention_ref(q, k, v, shape, causal), (A @ vp)[:, :, :L], rtol=1e-12, atol=1e-12)
    if causal:
        assert (A.triu(1) == 0).all()
        tri = [torch.ones(n, n, dtype=torch.float64).tril() for n in shape]
        mask = tri[0]
        for t in tri[1:]: mask = torch.kron(mask, t)
        assert torch.equal(A[0, 0, :L, :L] != 0, mask.bool()[:L, :L])   # support = Kronecker product of the per-dimension masks


def test_kronecker_special_case():
    "q, k built from per-dimension parts: the dense matrix is exactly the Kronecker product of per-dimension attentions."
    shape, d = (3, 4, 2), 4
    g = torch.Generator().manual_seed(3)
    qb = [torch.randn(n, d, generator=g, dtype=torch.float64) for n in shape]
    kb = [torch.randn(n, d, generator=g, dtype=torch.float64) for n in shape]
    idx = torch.stack(torch.unravel_index(torch.arange(math.prod(shape)), shape), -1)
    q = torch.cat([qb[j][idx[:, j]] for j in range(3)], -1)[None, None]
    k = torch.cat([kb[j][idx[:, j]] for j in range(3)], -1)[None, None]
    A = tensorized_attention_matrix(q, k, shape, True, scale=0.3)[0, 0]
    K = None
    for j, n in enumerate(shape):
        a = torch.softmax((qb[j] @ kb[j].T * 0.3).masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf")), -1)
        K = a if K is None else torch.kron(K, a)
    torch.testing.assert_close(A, K, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- (b) causality
def _future_grad(fn, L=26, shape=(3, 3, 3), points=(0, 4, 9, 13, 20, 25), device="cpu"):
    q, k, v = (t.requires_grad_() for t in rand(1, 2, 1, L, 16, seed=1, device=device))
    o = fn(q, k, v, shape)
    worst = 0.0
    for p in points:
        grads = torch.autograd.grad(o[:, :, p].sum(), (q, k, v), retain_graph=True)
        assert grads[2][:, :, p].abs().sum() > 0        # the position itself does matter
        worst = max(worst, max(g_[:, :, p + 1:].abs().max().item() if p + 1 < L else 0.0 for g_ in grads))
    return worst


def test_causality_reference_exact_zero():
    assert _future_grad(lambda q, k, v, s: tensorized_attention_ref(q, k, v, s), points=range(26)) == 0.0


def test_causality_kernel_exact_zero():
    assert _future_grad(lambda q, k, v, s: tensorized_attention(q, k, v, s, backend="triton"), device=DEV) == 0.0


# ---------------------------------------------------------------- (c) m = 1
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_one_dim_is_causal_attention(backend):
    q, k, v = rand(2, 4, 2, 45, 16, seed=2, device=DEV if backend == "triton" else "cpu")
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    torch.testing.assert_close(tensorized_attention(q, k, v, shape=1, backend=backend), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- kernel vs reference (interpreter on CPU)
CASES = [  # B, H, Hkv, L, D, shape, causal
    (1, 2, 1, 45, 16, (4, 4, 3), True),      # m=3, GQA, padding (48 > 45)
    (2, 3, 3, 63, 32, (8, 8), True),         # m=2, odd L, pad 1
    (1, 4, 2, 100, 24, (5, 5, 4), False),    # non-causal, non-power-of-two D, GQA
    (1, 2, 2, 130, 16, (65, 2), True),       # long fibre: several query and key blocks per fibre
    (1, 2, 1, 19, 16, (19,), True),          # m=1
    (1, 2, 2, 40, 16, (2, 5, 2, 2), True),   # m=4
    # the complete mode (two value streams per hop)
    (1, 2, 1, 45, 16, (4, 4, 3), "complete"),      # m=3, GQA, padding
    (2, 3, 3, 63, 24, (8, 8), "complete"),         # m=2, odd L, non-power-of-two D, batch 2
    (1, 2, 1, 19, 16, (19,), "complete"),          # m=1: one causal pass
    (1, 2, 1, 139, 16, (70, 2), "complete"),       # outermost fibre of 70: several query/key blocks, strictly-causal C pass, GQA
    (1, 1, 1, 137, 16, (2, 70), "complete"),       # innermost fibre of 70: both streams across several blocks, past the diagonal
]


@pytest.mark.parametrize("B,H,Hkv,L,D,shape,causal", CASES,
                         ids=[f"B{c[0]}-T{c[3]}-H{c[1]}/{c[2]}-D{c[4]}-{'x'.join(map(str, c[5]))}-{causal_mode(c[6])}-fp32" for c in CASES])
def test_kernel_matches_reference(B, H, Hkv, L, D, shape, causal):
    q, k, v = (t.requires_grad_() for t in rand(B, H, Hkv, L, D, seed=L, device=DEV))
    do = torch.randn(B, H, L, D, generator=torch.Generator().manual_seed(9)).to(DEV)
    o = tensorized_attention(q, k, v, shape, causal, backend="triton")
    gq, gk, gv = torch.autograd.grad(o, (q, k, v), do)
    o_ref = tensorized_attention_ref(q, k, v, shape, causal)
    rq, rk, rv = torch.autograd.grad(o_ref, (q, k, v), do)
    for got, want in [(o, o_ref), (gq, rq), (gk, rk), (gv, rv)]:
        assert got.isfinite().all()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_fused_backward_tile_choice():
    "The one-pass backward takes fibres whose key tile (next power of two, at least 16) is at most FUSED_BWD_MAX_BLOCK rows."
    import longctx_nb.tensorized as T
    assert [(T._fused_bwd_blocks(n, 128) or (None, None))[1] for n in (1, 16, 17, 33, 64, 65, 512)] == [16, 16, 32, 64, 64, None, None]
    for n in (1, 17, 64):
        for d in (64, 128):
            for streams in (1, 2):
                bm, bn, warps = T._fused_bwd_blocks(n, d, streams)
                assert 16 <= bm <= bn and bn >= n and warps in (4, 8)


TWO_PASS_CASES = ([c for c in CASES if c[6] != "complete"][:4] + [(1, 4, 2, 70, 16, (7, 10), True)]
                  + [c for c in CASES if c[6] == "complete"][:2] + [(1, 4, 2, 70, 16, (7, 10), "complete")])


@pytest.mark.parametrize("B,H,Hkv,L,D,shape,causal", TWO_PASS_CASES, ids=[f"T{c[3]}-H{c[1]}/{c[2]}-{'x'.join(map(str, c[5]))}-{causal_mode(c[6])}" for c in TWO_PASS_CASES])
def test_one_pass_and_two_pass_backward_agree(B, H, Hkv, L, D, shape, causal, monkeypatch):
    "The same gradients from the one-pass kernels (short fibres) and, with them switched off, from the two-kernel backward; both vs the reference."
    import longctx_nb.tensorized as T
    q, k, v = (t.requires_grad_() for t in rand(B, H, Hkv, L, D, seed=L + 1, device=DEV))
    do = torch.randn(B, H, L, D, generator=torch.Generator().manual_seed(3)).to(DEV)
    assert any(T._fused_bwd_blocks(n, 16) for n in shape)            # the case does take the one-pass kernel somewhere
    one = torch.autograd.grad(tensorized_attention(q, k, v, shape, causal, backend="triton"), (q, k, v), do)
    monkeypatch.setattr(T, "FUSED_BWD_MAX_BLOCK", 0)
    assert not any(T._fused_bwd_blocks(n, 16) for n in shape)
    two = torch.autograd.grad(tensorized_attention(q, k, v, shape, causal, backend="triton"), (q, k, v), do)
    ref = torch.autograd.grad(tensorized_attention_ref(q, k, v, shape, causal), (q, k, v), do)
    for a, b, r in zip(one, two, ref):
        assert a.dtype == b.dtype == q.dtype and a.isfinite().all() and b.isfinite().all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("causal", ["dominance", "complete"])
def test_kernel_inference_path_and_noncontiguous(causal):
    "Without grad the forward drops intermediates; inputs may be non-contiguous views ([B, L, H, D] transposed)."
    B, H, L, D = 1, 2, 30, 16
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(B, L, H, D, generator=g).to(DEV).transpose(1, 2) for _ in range(3))
    with torch.no_grad(): o = tensorized_attention(q, k, v, (5, 6), causal, backend="triton")
    torch.testing.assert_close(o, tensorized_attention_ref(q, k, v, (5, 6), causal), rtol=1e-5, atol=1e-5)


def test_default_shape_and_scale():
    q, k, v = rand(1, 2, 2, 40, 16, seed=5, device=DEV)
    torch.testing.assert_close(tensorized_attention(q, k, v, backend="triton", scale=0.1),
                               tensorized_attention_ref(q, k, v, choose_factorization(40), scale=0.1), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- bad inputs
def _qkv(**kw):
    d = dict(B=1, H=2, Hkv=2, L=8, D=4); d.update(kw)
    return rand(d["B"], d["H"], d["Hkv"], d["L"], d["D"])


@pytest.mark.parametrize("make,kw,exc,match", [
    (lambda: _qkv(H=2, Hkv=3), {}, ValueError, "multiple of key/value heads"),
    (lambda: _qkv(), dict(shape=(2, 3)), ValueError, "fewer than the sequence length"),
    (lambda: _qkv(), dict(shape=(2, 0, 4)), ValueError, "positive ints"),
    (lambda: _qkv(), dict(shape="abc"), ValueError, "positive ints|int"),
    (lambda: [t[0] for t in _qkv()], {}, ValueError, "4-D"),
    (lambda: [_qkv()[0], _qkv()[1].long(), _qkv()[2]], {}, TypeError, "floating"),
    (lambda: [_qkv()[0], _qkv()[1].double(), _qkv()[2]], {}, TypeError, "share a dtype"),
    (lambda: [_qkv()[0], _qkv(L=9)[1], _qkv()[2]], {}, ValueError, "same shape|must be"),
    (lambda: _qkv(), dict(backend="flash"), ValueError, "backend must be one of"),
    (lambda: _qkv(), dict(causal="lower"), ValueError, r"causal must be one of \('dominance', 'complete', 'none'\)"),
    (lambda: _qkv(), dict(causal="lower", backend="triton"), ValueError, "causal must be one of"),
    (lambda: _qkv(), dict(causal=1), TypeError, "causal must be a bool or one of"),
], ids=["gqa-ratio", "shape-too-small", "zero-factor", "shape-string", "3d", "int-dtype", "mixed-dtype", "length-mismatch", "backend",
        "causal-unknown", "causal-unknown-triton", "causal-int"])
def test_bad_inputs(make, kw, exc, match):
    with pytest.raises(exc, match=match): tensorized_attention(*make(), **kw)


@needs_interpreter
def test_interpreter_rejects_low_precision():
    q, k, v = (t.bfloat16() for t in _qkv())
    with pytest.raises(TypeError, match="float32 only"): tensorized_attention(q, k, v, backend="triton")
    assert tensorized_attention(q, k, v, backend="torch").dtype == torch.bfloat16   # the reference takes any float dtype


def test_cpu_tensors_without_interpreter_are_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")   # as on a CUDA machine: the kernel is compiled, CPU tensors cannot reach it
    with pytest.raises(RuntimeError, match="needs CUDA tensors"): tensorized_attention(*_qkv(), backend="triton")


@pytest.mark.gpu
def test_kernel_bf16_on_cuda_matches_fp32_reference():
    from longctx_nb.tensorized import correctness_sweep
    sweep = correctness_sweep([dict(B=1, H=4, Hkv=2, L=1000, D=64, shape=(10, 10, 10), causal=True),
                               dict(B=2, H=2, Hkv=2, L=777, D=128, shape=(777,), causal=True),
                               dict(B=1, H=4, Hkv=2, L=1000, D=64, shape=(10, 10, 10), causal="complete"),
                               dict(B=1, H=8, Hkv=2, L=4099, D=128, shape=(17, 16, 16), causal="complete"),
                               dict(B=1, H=4, Hkv=1, L=3000, D=128, shape=(60, 50), causal="complete"),
                               dict(B=1, H=4, Hkv=4, L=16384, D=128, shape=(128, 128), causal="complete"),
                               dict(B=2, H=2, Hkv=2, L=777, D=128, shape=(777,), causal="complete")], dtype=torch.bfloat16, device="cuda")
    assert not sweep.nan.any() and (sweep[["o", "dq", "dk", "dv"]].max(axis=None) < 3e-2), sweep
    assert (sweep.causal == "complete").sum() == 5


# ---------------------------------------------------------------- the complete mode (the Kronecker-sum causal mask)
def test_causal_mode():
    assert [causal_mode(c) for c in (True, False, "dominance", "complete", "none")] == ["dominance", "none", "dominance", "complete", "none"]
    with pytest.raises(ValueError, match="causal must be one of"): causal_mode("full")
    with pytest.raises(TypeError, match="bool or one of"): causal_mode(None)


@pytest.mark.parametrize("shape", [(4, 4, 4), (3, 5), (2, 3, 2, 2), (6,)], ids=lambda s: "x".join(map(str, s)))
def test_masks_are_the_kronecker_product_and_sum(shape):
    N = math.prod(shape)
    tri = [torch.ones(n, n, dtype=torch.float64).tril() for n in shape]
    prod = tri[0]
    for t in tri[1:]: prod = torch.kron(prod, t)
    assert torch.equal(tensorized_mask(shape), prod) and torch.equal(tensorized_mask(shape, "none"), torch.ones(N, N, dtype=torch.float64))
    assert torch.equal(tensorized_mask(shape, "complete"), torch.ones(N, N, dtype=torch.float64).tril())   # 0/1: the terms are disjoint


@pytest.mark.parametrize("B,H,Hkv,L,shape", [(1, 1, 1, 64, (4, 4, 4)), (2, 4, 2, 50, (4, 4, 4)), (1, 2, 1, 30, (5, 6)), (1, 1, 1, 37, (2, 5, 2, 2))],
                         ids=["4x4x4", "pad-GQA-4x4x4", "5x6", "pad-2x5x2x2"])
def test_complete_dense_operator_is_the_lower_triangle(B, H, Hkv, L, shape):
    "The reference is A @ V for the dense operator; every real row reaches exactly its real predecessors, with weights summing to 1."
    q, k, v = rand(B, H, Hkv, L, 8, seed=L, dtype=torch.float64)
    A = tensorized_attention_matrix(q, k, shape, "complete")
    vp = F.pad(v.repeat_interleave(H // Hkv, 1), (0, 0, 0, math.prod(shape) - L))
    torch.testing.assert_close(tensorized_attention_ref(q, k, v, shape, "complete"), (A @ vp)[:, :, :L], rtol=1e-12, atol=1e-12)
    N = math.prod(shape); real = torch.arange(N) < L
    want = torch.ones(L, N, dtype=torch.bool).tril() & real[None, :]
    assert ((A[:, :, :L] != 0) == want).all()                   # every head: no later token, no padding, every earlier token
    torch.testing.assert_close(A[:, :, :L].sum(-1), torch.ones(B, H, L, dtype=torch.float64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(3, 4, 2), (4, 3), (2, 2, 3, 2)], ids=lambda s: "x".join(map(str, s)))
def test_complete_equals_kronecker_sum_on_per_dimension_scores(shape):
    "Per-dimension q, k: the dense operator is the Kronecker-sum mask with per-dimension attentions in its blocks."
    d, m, g = 4, len(shape), torch.Generator().manual_seed(7)
    qb = [torch.randn(n, d, generator=g, dtype=torch.float64) for n in shape]
    kb = [torch.randn(n, d, generator=g, dtype=torch.float64) for n in shape]
    idx = torch.stack(torch.unravel_index(torch.arange(math.prod(shape)), shape), -1)
    q = torch.cat([qb[j][idx[:, j]] for j in range(m)], -1)[None, None]
    k = torch.cat([kb[j][idx[:, j]] for j in range(m)], -1)[None, None]
    A = tensorized_attention_matrix(q, k, shape, "complete", scale=0.3)[0, 0]
    s = [qb[j] @ kb[j].T * 0.3 for j in range(m)]
    causal = [torch.softmax(s[j].masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf")), -1) for j, n in enumerate(shape)]
    full = [torch.softmax(x, -1) for x in s]

    def kron(*ms):
        out = ms[0]
        for x in ms[1:]: out = torch.kron(out, x)
        return out
    diag = [torch.diag(torch.diagonal(c)) for c in causal]
    want = sum((kron(*diag[:j], causal[j].tril(-1), *full[j + 1:]) for j in range(m - 1)), kron(*diag[:-1], causal[-1]))
    torch.testing.assert_close(A, want, rtol=1e-12, atol=1e-12)


def test_complete_causality_reference_exact_zero_and_every_earlier_token():
    L = 26
    q, k, v = (t.requires_grad_() for t in rand(1, 2, 1, L, 16, seed=1))
    o = tensorized_attention_ref(q, k, v, (3, 3, 3), "complete")
    for p in range(L):
        gq, gk, gv = torch.autograd.grad(o[:, :, p].sum(), (q, k, v), retain_graph=True)
        assert all((g_[:, :, p + 1:] == 0).all() for g_ in (gq, gk, gv))
        assert (gv[:, :, :p + 1] != 0).any(-1).all()            # every earlier token reaches p (dominance misses most)


def test_complete_causality_kernel_exact_zero():
    assert _future_grad(lambda q, k, v, s: tensorized_attention(q, k, v, s, "complete", backend="triton"), points=(0, 8, 9, 17, 25),
                        device=DEV) == 0.0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_complete_one_dim_is_causal_attention(backend):
    q, k, v = rand(1, 4, 2, 29, 16, seed=3, device=DEV if backend == "triton" else "cpu")
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    torch.testing.assert_close(tensorized_attention(q, k, v, shape=1, causal="complete", backend=backend), want, rtol=1e-5, atol=1e-5)


def test_causal_coverage():
    dom, comp = causal_coverage((64, 32)), causal_coverage((64, 32), "complete")
    assert round(dom["pair_share"], 2) == 0.52 and dom["tokens_missing_previous"] == 63       # the first token of each row but the first
    assert comp["pair_share"] == comp["mean_token_share"] == 1.0 and comp["tokens_missing_previous"] == 0
    for shape in [(4, 4, 4), (3, 5)]:                         # the closed forms against the composed masks
        N = math.prod(shape); tri = torch.ones(N, N, dtype=torch.float64).tril()
        for mode in ("dominance", "complete"):
            M = tensorized_mask(shape, mode)
            assert causal_coverage(shape, mode)["pair_share"] == pytest.approx((M * tri).sum().item() / tri.sum().item(), abs=1e-12)
    with pytest.raises(ValueError, match="every token"): causal_coverage((4, 4), "none")
    with pytest.raises(ValueError, match="L must be in"): causal_coverage((4, 4), True, L=17)


def test_cost_modes():
    dom, comp, none = (tensorized_cost(131072, 32, 8, 128, (64, 64, 32), c, True) for c in ("dominance", "complete", False))
    assert comp[0] > dom[0] and comp[1] > dom[1] and comp[2] > dom[2] and none[0] > dom[0]
    assert tensorized_cost(4096, 4, 4, 64, (4096,), "complete") == tensorized_cost(4096, 4, 4, 64, (4096,), True)
    with pytest.raises(ValueError, match="causal must be one of"): tensorized_cost(64, 1, 1, 8, (8, 8), "lower")


def test_benchmark_takes_several_causal_modes():
    "One row per (L, pass, mask mode), SDPA measured once per (L, pass), in fp32 on either device (the reference on CPU, Triton on CUDA)."
    bench = benchmark_vs_sdpa([64, 100], H=2, D=16, dtype=torch.float32, modes=("fwd",), reps=1, warmup=0, causal=("dominance", "complete"),
                              shape_for=lambda L: choose_factorization(L, 2), log=lambda s: None)
    assert list(zip(bench.L, bench.causal)) == [(64, "dominance"), (64, "complete"), (100, "dominance"), (100, "complete")]
    assert (bench.ours_ms > 0).all() and (bench.ours_floor_ms > 0).all() and bench.groupby("L").sdpa_ms.nunique().eq(1).all()
    # fp32: flash has no kernel for it, so CUDA times the memory-efficient backend (and says so); CPU the math one
    assert set(bench.sdpa_backend) == {"efficient_attention" if torch.cuda.is_available() else "math"}
    assert bench.query("causal == 'complete'").ours_floor_ms.gt(bench.query("causal == 'dominance'").ours_floor_ms.to_numpy()).all()


# ---------------------------------------------------------------- one complete-mode hop as an op (for models whose q, k change per hop)
@pytest.mark.parametrize("one_pass", [True, False], ids=["one-pass", "two-pass"])
@pytest.mark.parametrize("need_a", [True, False], ids=["with-A", "C-only"])
def test_complete_hop_kernel_matches_reference(need_a, one_pass, monkeypatch):
    import longctx_nb.tensorized as T
    if not one_pass: monkeypatch.setattr(T, "FUSED_BWD_MAX_BLOCK", 0)
    assert bool(T._fused_bwd_blocks(21, 16, streams=2)) == one_pass
    g = torch.Generator().manual_seed(11)
    q, k, a, c = (torch.randn(3, h, 21, 16, generator=g).to(DEV).requires_grad_() for h in (2, 1, 2, 2))   # GQA 2:1, odd fibre
    outs = [o for o in tensorized_complete_hop(q, k, a, c, need_a=need_a, backend="triton") if o is not None]
    refs = [o for o in tensorized_complete_hop(q, k, a, c, need_a=need_a, backend="torch") if o is not None]
    assert len(outs) == len(refs) == (2 if need_a else 1)
    w = [torch.randn(o.shape, generator=g).to(DEV) for o in refs]
    got = torch.autograd.grad(sum((o * w_).sum() for o, w_ in zip(outs, w)), (q, k, a, c))
    want = torch.autograd.grad(sum((o * w_).sum() for o, w_ in zip(refs, w)), (q, k, a, c))
    for x, y in [*zip(outs, refs), *zip(got, want)]:
        assert x.isfinite().all()
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


def test_complete_hops_compose_to_the_complete_mode():
    "Hops over fibre batches, innermost first (A = C = V at the first), give tensorized_attention_ref(causal='complete')."
    q, k, v = rand(2, 4, 2, 24, 8, seed=6, dtype=torch.float64)
    shape, (B, H, L, D) = (4, 3, 2), q.shape
    qf, kf = fold(q, shape), fold(k, shape); a = c = fold(v.repeat_interleave(2, 1), shape)
    for j, dim in enumerate(hop_order(3)):
        fib = lambda t: t.movedim(2 + dim, -2).movedim(1, -3).reshape(-1, t.shape[1], shape[dim], D)
        back = lambda t: t.reshape(B, *[n for i, n in enumerate(shape) if i != dim], H, shape[dim], D).movedim(-3, 1).movedim(-2, 2 + dim)
        co, ao = tensorized_complete_hop(fib(qf), fib(kf), fib(a), fib(c), need_a=j < 2)
        c, a = back(co), (back(ao) if j < 2 else None)
        assert (ao is None) == (j == 2)
    torch.testing.assert_close(unfold(c, L), tensorized_attention_ref(q, k, v, shape, "complete"), rtol=1e-12, atol=1e-12)


def test_complete_hop_bad_inputs():
    q, k, v = rand(2, 2, 1, 8, 4)
    with pytest.raises(ValueError, match="a must be a tensor like q"): tensorized_complete_hop(q, k, v, q)
    with pytest.raises(ValueError, match="multiple of key/value heads"): tensorized_complete_hop(q, rand(2, 3, 3, 8, 4)[1], q, q)
    with pytest.raises(ValueError, match="backend must be one of"): tensorized_complete_hop(q, k, q, q, backend="flash")
