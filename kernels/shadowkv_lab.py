"""Kernel lab of ShadowKV's decode step at Llama-3-8B's shapes: one layer, a batch of sequences at a long context, every piece of
the step timed against its roofline floor (bytes it must move / bandwidth), and the sparse attention against SDPA over the whole
context (what full attention does per layer and step).

    python -m kernels.shadowkv_lab [--out reports/kernels/shadowkv_lab] [--batch 8] [--context 122880] [--budget 2048] [--ab COMMIT]

Pieces: selection (landmark scores + top-k), the gather-GEMM-RoPE key kernel (every selected chunk a miss), the zero-copy value
fetch (`gather_chunks` reading page-locked host memory; every chunk a miss) and the staged fetch it replaced, SDPA over the attended
keys/values (selected + outliers + local + decode rows), and SDPA over the full context. Floors: HBM at this GPU's datasheet bandwidth
(its row of `longctx_nb.core.PEAKS`, or `--peaks`); PCIe at the host-to-device DMA bandwidth measured here. The measured HBM copy
bandwidth is reported beside them. Needs CUDA. Exit status 1 when a piece gives no finite time.
"""
import math, sys
from kernels._lab import lab_main, Measured, peaks_for
import pandas as pd
import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend

NAME = "shadowkv_lab"


def add_args(ap):
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=122880)
    ap.add_argument("--budget", type=int, default=2048)


def measure(lib, a) -> Measured:
    skv, thr, core = lib.shadowkv, lib.shadowkv_throughput, lib.core
    host_empty = lib.get("host_empty", "kvcache", "shadowkv")
    peaks = peaks_for(a); HBM = peaks.bytes_s
    dev, bf = torch.device("cuda"), torch.bfloat16
    B, H, Hkv, D, r, C, S = a.batch, 32, 8, 128, 160, 8, a.context
    lay = skv.shadowkv_layout(S, skv.ShadowKVConfig(budget=a.budget, rank=r))
    k, n_lm, T = lay.selected_chunks, lay.landmark_chunks, lay.ctx_chunks * C
    N_att = lay.attended_tokens + 100                                    # + 100 generated tokens
    g = torch.Generator(device=dev).manual_seed(0)
    rnd = lambda *s, dtype=bf: torch.randn(*s, generator=g, device=dev).to(dtype)
    hbm, h2d = thr.hbm_bandwidth(dev), thr.h2d_bandwidth(dev)
    print(f"B={B} S={S} budget={a.budget} -> {k} chunks of {C}, {n_lm} landmarks; HBM copy {hbm:.0f} GB/s, H2D {h2d:.1f} GB/s; "
          f"floors at {peaks.name} {peaks.hbm_gb_s:.0f} GB/s")
    rows = []

    def record(piece, fn, nbytes, floor_bw, note=""):
        ms = core.benchmark(fn, warmup=5, reps=30)["median_ms"]
        rows.append(dict(piece=piece, ms=ms, MB=nbytes / 1e6, GB_s=nbytes / ms / 1e6, floor_ms=nbytes / floor_bw * 1e3,
                         pct_of_floor=100 * (nbytes / floor_bw * 1e3) / ms, note=note))
        print(rows[-1])

    q = rnd(B, H, 1, D)
    landmarks, lm_chunk = rnd(B, Hkv, n_lm, D), torch.arange(n_lm, device=dev).expand(B, Hkv, n_lm).contiguous()
    sel = lambda: lm_chunk.gather(-1, skv.landmark_scores(q, landmarks, D ** -0.5).topk(k, dim=-1).indices)
    record("select: landmark scores + top-k", sel, landmarks.numel() * 2, HBM, "reads the landmarks")
    ids = sel()
    U, SV = rnd(B, T, r), rnd(B, Hkv, r, D) / r ** 0.5
    pos = torch.arange(T, device=dev).expand(B, T).contiguous()
    ang = torch.rand(S + 256, D // 2, generator=g, device=dev) * 6.28
    cos, sin = torch.cat([ang.cos()] * 2, 1).contiguous(), torch.cat([ang.sin()] * 2, 1).contiguous()
    out_k = torch.empty(B, Hkv, k * C, D, dtype=bf, device=dev)
    key_bytes = B * Hkv * k * C * (r * 2 + 8 + 2 * D * 4 + D * 2) + B * Hkv * r * D * 2
    record("keys: gather-GEMM-RoPE kernel (all misses)", lambda: skv.shadow_keys(U, SV, cos, sin, pos, ids, C, out=out_k), key_bytes, HBM,
           "U rows + SV + positions + cos/sin rows + written keys")
    slots = torch.arange(k, device=dev).expand(B, Hkv, k).contiguous()
    counts = torch.full((B, Hkv), k, device=dev)
    out_v = torch.empty(B, Hkv, k * C, D, dtype=bf, device=dev)
    v_bytes = B * Hkv * k * C * D * 2
    for dtype_name in ("bf16", "fp8"):
        v = rnd(B, Hkv, lay.ctx_chunks, C * D)
        src, scale = skv.quantize_chunks_fp8(v) if dtype_name == "fp8" else (v, None)
        host = host_empty(src.shape, src.dtype, pin=True, fill=lambda t: t.copy_(src))
        del v, src
        nb = v_bytes // (2 if dtype_name == "fp8" else 1)
        record(f"values: zero-copy fetch from host ({dtype_name}, all misses)",
               lambda: skv.gather_chunks(host, scale, ids, slots, counts, out_v, C), nb, h2d * 1e9, "floor: H2D DMA bandwidth")
        if dtype_name == "bf16":
            staging = torch.empty(B * Hkv * k, C * D, dtype=bf, pin_memory=True)
            flat = host.view(-1, C * D)
            rows_idx = ((torch.arange(B)[:, None, None] * Hkv + torch.arange(Hkv)[None, :, None]) * lay.ctx_chunks + ids.cpu()).flatten()
            def staged():
                torch.index_select(flat, 0, rows_idx, out=staging)
                out_v.view(-1, C * D).copy_(staging, non_blocking=True)
            record("values: staged fetch (CPU gather + one copy, bf16)", staged, nb, h2d * 1e9, "the path zero-copy replaced")
        del host
    Kb, Vb = rnd(B, Hkv, N_att, D), rnd(B, Hkv, N_att, D)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        record("sparse attention: SDPA over attended keys/values", lambda: F.scaled_dot_product_attention(q, Kb, Vb, enable_gqa=True),
               2 * Kb.numel() * 2, HBM, f"{N_att} tokens")
    del U, Kb, Vb; torch.cuda.empty_cache()
    Kf, Vf = rnd(B, Hkv, S, D), rnd(B, Hkv, S, D)
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                record(f"full attention: SDPA ({name}) over {S} tokens", lambda: F.scaled_dot_product_attention(q, Kf, Vf, enable_gqa=True),
                       2 * Kf.numel() * 2, HBM, "what full attention reads per layer and step")
        except RuntimeError as e:
            print(f"SDPA {name}: {e}")
    lab = pd.DataFrame(rows)
    skv_ms = lab[lab.piece.str.startswith(("select", "keys", "sparse"))].ms.sum() + lab[lab.piece.str.contains("zero-copy fetch from host \\(bf16")].ms.sum()
    full = lab[lab.piece.str.startswith("full attention")].ms.min()
    summary = pd.DataFrame([dict(context=S, batch=B, budget=a.budget, shadowkv_layer_ms_all_misses=skv_ms, full_attention_layer_ms=full,
                                 speedup_per_layer=full / skv_ms, hbm_copy_GB_s=hbm, h2d_GB_s=h2d, hbm_peak_GB_s=peaks.hbm_gb_s)])
    print(lab.round(3).to_string()); print(summary.round(3).to_string())
    ok = bool(len(lab)) and all(math.isfinite(x) and x > 0 for x in lab.ms)
    return Measured(dict(lab=lab.round(4), summary=summary.round(4)), ok=ok,
                    meta=dict(batch=B, context=S, budget=a.budget, floors_at=peaks.name))


def main(argv=None) -> int:
    return lab_main(NAME, __doc__, measure, add_args, argv)


if __name__ == "__main__":
    sys.exit(main())
