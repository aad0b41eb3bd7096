"""GPU correctness sweep of ShadowKV's gather + GEMM + RoPE kernel (`longctx_nb.shadowkv.shadow_keys`) against its PyTorch reference.

    python kernels/shadowkv_keys_check.py [--out reports/kernels/shadowkv_keys]

Shapes: odd and non-power-of-two ranks, head dims, chunk sizes and chunk counts; SmolLM2-135M's and Llama-3-8B's real shapes;
float32 (IEEE dot) and bfloat16; with and without cache-hit slots/counts; outputs poisoned with NaN before each call (rows the kernel
must not write stay NaN, the others must not). Also the median time of kernel and reference at the real shapes (information only;
the throughput benchmark belongs to the next notebook). On a machine without CUDA it runs the small shapes in Triton's interpreter.
"""
import argparse, sys, time
import longctx_nb.core  # noqa: F401  (sets TRITON_INTERPRET=1 without CUDA, before triton is imported)
from longctx_nb.core import Timer, benchmark, run_meta, save_report, Preset
import pandas as pd
import torch
from longctx_nb.shadowkv import shadow_keys, shadow_keys_ref


def case(B, S_chunks, R, Hkv, D, C, n, dtype, slots, device, seed=0, time_it=False):
    g = torch.Generator(device="cpu").manual_seed(seed)
    S = S_chunks * C
    U = torch.randn(B, S, R, generator=g).to(device, dtype)
    SV = (torch.randn(B, Hkv, R, D, generator=g) / R ** 0.5).to(device, dtype)
    pos = torch.randint(0, 2 * S, (B, S), generator=g).to(device)
    ang = torch.rand(2 * S, D // 2, generator=g) * 6.28
    cos, sin = torch.cat([ang.cos()] * 2, 1).to(device), torch.cat([ang.sin()] * 2, 1).to(device)
    ids = torch.stack([torch.randperm(S_chunks, generator=g)[:n] for _ in range(B * Hkv)]).view(B, Hkv, n).to(device)
    sl = torch.stack([torch.randperm(n, generator=g) for _ in range(B * Hkv)]).view(B, Hkv, n).to(device) if slots else None
    cnt = torch.randint(0, n + 1, (B, Hkv), generator=g).to(device) if slots else None
    ref = torch.full((B, Hkv, n * C, D), float("nan"), device=device, dtype=dtype)
    out = ref.clone()
    shadow_keys_ref(U, SV, cos, sin, pos, ids, C, sl, cnt, ref)
    shadow_keys(U, SV, cos, sin, pos, ids, C, sl, cnt, out)
    a, b = ref.float().nan_to_num(), out.float().nan_to_num()
    row = dict(case=f"B{B}-S{S}-R{R}-H{Hkv}-D{D}-C{C}-n{n}-{str(dtype)[6:]}{'-slots' if slots else ''}",
               same_nan=bool(torch.equal(ref.isnan(), out.isnan())), max_abs=(a - b).abs().max().item(),
               max_rel=((a - b).abs().max() / b.abs().max().clamp_min(1e-9)).item())
    row["tol"] = 1e-5 if dtype == torch.float32 else 2e-2
    row["ok"] = row["same_nan"] and row["max_rel"] <= row["tol"]
    if time_it:
        kt = benchmark(lambda: shadow_keys(U, SV, cos, sin, pos, ids, C, out=out), warmup=10, reps=50)["median_ms"]
        rt = benchmark(lambda: shadow_keys_ref(U, SV, cos, sin, pos, ids, C, out=ref), warmup=3, reps=10)["median_ms"]
        moved = (B * Hkv * n * C * (R + D) + B * Hkv * R * D) * U.element_size() + B * Hkv * n * C * D * 4 * 2  # U rows, SV, out, cos/sin
        row.update(kernel_ms=kt, reference_ms=rt, kernel_gb_s=moved / kt / 1e6)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="reports/kernels/shadowkv_keys")
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    small = [(1, 4, 16, 1, 32, 8, 2), (2, 9, 23, 3, 64, 8, 5), (1, 7, 48, 2, 48, 5, 7), (3, 5, 17, 3, 64, 3, 4), (2, 13, 70, 2, 128, 8, 11)]
    real = [(8, 1024, 80, 3, 64, 8, 16), (8, 1024, 80, 3, 64, 8, 64),          # SmolLM2-135M at 8k: 1.56% and 6.25%
            (4, 4096, 160, 8, 128, 8, 128), (1, 16384, 160, 8, 128, 8, 256)]  # Llama-3-8B: 32k at 3.1%, 128k at 1.56% (the paper's)
    dtypes = [torch.float32, torch.bfloat16] if cuda else [torch.float32]
    rows = []
    with Timer() as wall:
        for shape in small + (real if cuda else []):
            for dt in dtypes:
                for sl in (False, True):
                    rows.append(case(*shape, dtype=dt, slots=sl, device=dev, time_it=cuda and shape in real and not sl))
    df = pd.DataFrame(rows)
    print(df.to_string(index=False))
    meta = run_meta(Preset("gpu" if cuda else "cpu-interpreter", needs_gpu=cuda), wall.elapsed, script="kernels/shadowkv_keys_check.py")
    save_report(a.out, tables={"check": df}, meta=meta)
    bad = df[~df.ok]
    if len(bad): print(f"{len(bad)} cases FAILED", file=sys.stderr); return 1
    print(f"all {len(df)} cases ok in {wall.elapsed:.1f} s -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
