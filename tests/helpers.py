"""What tests (and the kernel lab in kernels/) share: the named comparison, tiny model configs, kernel input factories, skip marks.

Fixtures live in conftest.py; this module is plain functions, imported as `helpers` by the tests and loaded by path by
kernels/_lab.py (as `kernels._lab.test_helpers`)."""
import os
from pathlib import Path
import pytest
import torch
from longctx_nb.core import assert_close, TOLERANCES  # noqa: F401  (re-exported: tests compare with helpers.assert_close)

__all__ = ["assert_close", "TOLERANCES", "tiny_llama_config", "tiny_llama", "report_dir", "shape_id", "needs_interpreter",
           "tensorized_inputs", "shadow_keys_inputs", "slots_and_counts", "gather_inputs"]

# ---------------------------------------------------------------- marks
needs_interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="runs the Triton interpreter on CPU tensors, which is off here (CUDA is visible, so triton compiles); "
           "the gpu-marked tests check the compiled kernel on this machine")


def shape_id(names: str, shape, dtype=None) -> str:
    "A parametrize id like `B1-Sc4-R16-fp32` from names 'B Sc R' and a shape tuple (fla-org's style)."
    parts = [f"{n}{v}" for n, v in zip(names.split(), shape)]
    if dtype is not None: parts.append({torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}.get(dtype, str(dtype)))
    return "-".join(parts)


# ---------------------------------------------------------------- tiny models (no weights to download)
def tiny_llama_config(**kw):
    "A 2-layer Llama config with GQA (4 q heads, 2 kv heads, head dim 16), vocab 128; `kw` overrides any field."
    from transformers import LlamaConfig
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=True)
    base.update(kw)
    return LlamaConfig(**base)


def tiny_llama(seed: int = 0, **kw):
    "A random-weight float32 LlamaForCausalLM in eval mode from `tiny_llama_config(**kw)`."
    from transformers import LlamaForCausalLM
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**kw)).eval()


# ---------------------------------------------------------------- reports written by the smoke run
def report_dir(root: Path, notebook: str, config: str = "smoke") -> Path:
    "reports/<notebook>/<config>, checked to hold the meta.json a finished run writes."
    d = Path(root) / notebook / config
    assert (d / "meta.json").exists(), f"{d} has no meta.json: did the {notebook} {config} run fail?"
    return d


# ---------------------------------------------------------------- kernel inputs
def tensorized_inputs(B, H, Hkv, L, D, seed=0, dtype=torch.float32, device="cpu", grad=False, with_do=False):
    "q [B, H, L, D], k and v [B, Hkv, L, D] (standard normal, drawn in `dtype` on CPU, then moved); `with_do` adds an output grad."
    g = torch.Generator().manual_seed(seed)
    ts = [torch.randn(B, h, L, D, generator=g, dtype=dtype).to(device) for h in (H, Hkv, Hkv)]
    if grad: ts = [t.requires_grad_() for t in ts]
    if with_do: ts.append(torch.randn(B, H, L, D, generator=g, dtype=dtype).to(device))
    return ts


def shadow_keys_inputs(B, S_chunks, R, Hkv, D, C, n, dtype=torch.float32, seed=0, device="cpu", real_rope=False):
    """(U, SV, cos, sin, pos, ids) for `shadowkv.shadow_keys`: U [B, S, R], SV [B, Hkv, R, D] (both `dtype`), RoPE tables
    [P, D] (random values, or `real_rope`: cos/sin of random angles), positions [B, S] < P, n distinct chunk ids per (b, h)."""
    g = torch.Generator().manual_seed(seed)
    S = S_chunks * C
    if real_rope:
        U = torch.randn(B, S, R, generator=g).to(dtype)
        SV = (torch.randn(B, Hkv, R, D, generator=g) / R ** 0.5).to(dtype)
        pos = torch.randint(0, 2 * S, (B, S), generator=g)
        ang = torch.rand(2 * S, D // 2, generator=g) * 6.28
        cos, sin = torch.cat([ang.cos()] * 2, 1), torch.cat([ang.sin()] * 2, 1)
    else:
        U = torch.randn(B, S, R, generator=g, dtype=dtype)
        SV = torch.randn(B, Hkv, R, D, generator=g, dtype=dtype) / R ** 0.5
        pos = torch.randint(0, 3 * S, (B, S), generator=g)
        cos, sin = torch.randn(3 * S, D, generator=g), torch.randn(3 * S, D, generator=g)
    ids = torch.stack([torch.randperm(S_chunks, generator=g)[:n] for _ in range(B * Hkv)]).view(B, Hkv, n)
    return tuple(t.to(device) for t in (U, SV, cos, sin, pos, ids))


def slots_and_counts(B, Hkv, n, seed=2, device="cpu"):
    "A slot permutation of the n selected chunks per (b, h) and a miss count in [0, n] per (b, h)."
    g = torch.Generator().manual_seed(seed)
    slots = torch.stack([torch.randperm(n, generator=g) for _ in range(B * Hkv)]).view(B, Hkv, n)
    counts = torch.randint(0, n + 1, (B, Hkv), generator=g)
    return slots.to(device), counts.to(device)


def gather_inputs(B, Hkv, N, C, D, k, seed=0, fp8=False, device="cpu"):
    """(v, src, scale, ids, slots, counts) for `shadowkv.gather_chunks`: chunked values v [B, Hkv, N, C*D] of varied magnitude,
    their stored form `src` (fp8 with per-chunk `scale` when `fp8`), k chunk ids, slots and miss counts per (b, h), on `device`."""
    from longctx_nb.shadowkv import quantize_chunks_fp8
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(B, Hkv, N, C * D, generator=g) * torch.rand(B, Hkv, N, 1, generator=g) * 10
    src, scale = quantize_chunks_fp8(v) if fp8 else (v, None)
    ids = torch.stack([torch.randperm(N, generator=g)[:k] for _ in range(B * Hkv)]).view(B, Hkv, k)
    slots = torch.stack([torch.randperm(k, generator=g) for _ in range(B * Hkv)]).view(B, Hkv, k)
    counts = torch.randint(0, k + 1, (B, Hkv), generator=g)
    return tuple(None if t is None else t.to(device) for t in (v, src, scale, ids, slots, counts))


def assert_dropped_caches_are_freed(model, make_caches, input_ids, **generate_kw):
    """Each cache that `make_caches` yields, used by `model.generate` and detached, is freed when its last reference goes, with the
    garbage collector off: no reference cycle keeps GPU buffers or pinned host memory alive (evaluation builds dozens of caches)."""
    import gc, weakref
    gc.disable()
    try:
        with torch.no_grad():
            for make in make_caches:
                cache = make()
                model.generate(input_ids, **generate_kw, past_key_values=cache)
                cache.detach()
                ref, name = weakref.ref(cache), type(cache).__name__
                del cache
                assert ref() is None, f"a dropped {name} outlived its last reference"
    finally:
        gc.enable()
