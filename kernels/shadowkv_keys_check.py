"""GPU correctness sweep of ShadowKV's gather + GEMM + RoPE kernel (`longctx_nb.shadowkv.shadow_keys`) against its PyTorch reference.

    python -m kernels.shadowkv_keys_check [--out reports/kernels/shadowkv_keys_check] [--ab COMMIT]

Shapes: odd and non-power-of-two ranks, head dims, chunk sizes and chunk counts; SmolLM2-135M's and Llama-3-8B's real shapes;
float32 (IEEE dot) and bfloat16; with and without cache-hit slots/counts; outputs poisoned with NaN before each call (rows the kernel
must not write stay NaN, the others must not). Also the median time of kernel and reference at the real shapes (information only;
the throughput benchmark belongs to the next notebook). On a machine without CUDA it runs the small shapes in Triton's interpreter.
Exit status 1 when a case fails.
"""
import sys
from kernels._lab import lab_main, Measured, test_helpers
import pandas as pd
import torch

NAME = "shadowkv_keys_check"
SMALL = [(1, 4, 16, 1, 32, 8, 2), (2, 9, 23, 3, 64, 8, 5), (1, 7, 48, 2, 48, 5, 7), (3, 5, 17, 3, 64, 3, 4), (2, 13, 70, 2, 128, 8, 11)]
REAL = [(8, 1024, 80, 3, 64, 8, 16), (8, 1024, 80, 3, 64, 8, 64),          # SmolLM2-135M at 8k: 1.56% and 6.25%
        (4, 4096, 160, 8, 128, 8, 128), (1, 16384, 160, 8, 128, 8, 256)]  # Llama-3-8B: 32k at 3.1%, 128k at 1.56% (the paper's)


def case(lib, B, S_chunks, R, Hkv, D, C, n, dtype, slots, device, seed=0, time_it=False):
    shadow_keys, shadow_keys_ref = lib.get("shadow_keys", "shadowkv"), lib.get("shadow_keys_ref", "shadowkv")
    U, SV, cos, sin, pos, ids = test_helpers.shadow_keys_inputs(B, S_chunks, R, Hkv, D, C, n, dtype=dtype, seed=seed, device=device, real_rope=True)
    sl, cnt = test_helpers.slots_and_counts(B, Hkv, n, seed=seed + 1, device=device) if slots else (None, None)
    ref = torch.full((B, Hkv, n * C, D), float("nan"), device=device, dtype=dtype)
    out = ref.clone()
    shadow_keys_ref(U, SV, cos, sin, pos, ids, C, sl, cnt, ref)
    shadow_keys(U, SV, cos, sin, pos, ids, C, sl, cnt, out)
    a, b = ref.float().nan_to_num(), out.float().nan_to_num()
    row = dict(case=f"B{B}-S{S_chunks * C}-R{R}-H{Hkv}-D{D}-C{C}-n{n}-{str(dtype)[6:]}{'-slots' if slots else ''}",
               same_nan=bool(torch.equal(ref.isnan(), out.isnan())), max_abs=(a - b).abs().max().item(),
               max_rel=((a - b).abs().max() / b.abs().max().clamp_min(1e-9)).item())
    row["tol"] = 1e-5 if dtype == torch.float32 else 2e-2
    row["ok"] = row["same_nan"] and row["max_rel"] <= row["tol"]
    if time_it:
        kt = lib.core.benchmark(lambda: shadow_keys(U, SV, cos, sin, pos, ids, C, out=out), warmup=10, reps=50)["median_ms"]
        rt = lib.core.benchmark(lambda: shadow_keys_ref(U, SV, cos, sin, pos, ids, C, out=ref), warmup=3, reps=10)["median_ms"]
        moved = (B * Hkv * n * C * (R + D) + B * Hkv * R * D) * U.element_size() + B * Hkv * n * C * D * 4 * 2  # U rows, SV, out, cos/sin
        row.update(kernel_ms=kt, reference_ms=rt, kernel_gb_s=moved / kt / 1e6)
    return row


def add_args(ap):
    ap.add_argument("--small-only", action="store_true", help="only the small shapes (what runs on CPU)")


def measure(lib, a) -> Measured:
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    dtypes = [torch.float32, torch.bfloat16] if cuda else [torch.float32]
    shapes = SMALL + ([] if a.small_only or not cuda else REAL)
    rows = []
    with lib.core.Timer() as wall:
        for shape in shapes:
            for dt in dtypes:
                for sl in (False, True):
                    rows.append(case(lib, *shape, dtype=dt, slots=sl, device=dev, time_it=cuda and shape in REAL and not sl))
    df = pd.DataFrame(rows)
    print(df.to_string(index=False))
    bad = df[~df.ok]
    if len(bad): print(f"{len(bad)} cases FAILED", file=sys.stderr)
    else: print(f"all {len(df)} cases ok in {wall.elapsed:.1f} s")
    return Measured({"check": df}, ok=len(bad) == 0, meta=dict(mode="gpu" if cuda else "cpu-interpreter"))


def main(argv=None) -> int:
    return lab_main(NAME, __doc__, measure, add_args, argv, needs_cuda=False)


if __name__ == "__main__":
    sys.exit(main())
