"""Kernel lab for tensorized attention (longctx_nb.tensorized), one command on one GPU:

    python -m kernels.tensorized_bench [--out reports/kernels/tensorized_bench] [--ab COMMIT] [--causal dominance,complete]

1. correctness sweep: the Triton kernel in bfloat16 against the float32 reference (same rounded inputs), odd and non-power-of-two
   lengths, m = 1..3, GQA, every mask mode (dominance, complete, none), forward and the three gradients, kernel-written buffers
   poisoned with NaN;
2. benchmark against torch SDPA (flash backend), causal, B=1, H=32, D=128, bf16, at L = 8k, 32k, 128k, 512k, 1M, forward and
   forward+backward, in each causal mode of `--causal` (the dominance mode, the paper's reading; the complete mode, the exact
   causal mask, our extension): median ms, speedup, TFLOP/s, GB/s, fraction of the roofline floor (`tensorized_cost` in that mode),
   peak memory. SDPA is measured once per (L, pass) and runs while its predicted time fits the budget; beyond, its time is
   extrapolated from its measured quadratic trend and labelled so;
3. the bar: each causal mode's forward speedup over SDPA at 128k against MIN_SPEEDUP_128K (reported in `bar`; a speed target, not
   a check: the exit status follows the correctness sweep).
Roofline floors use this GPU's row of `longctx_nb.core.PEAKS`. Exit status 1 when the sweep fails (bf16 error above BF16_TOL or a NaN).
Budget: about 4-6 minutes on an H100 or H200 (most of it SDPA at 128k-512k and kernel compilation; the complete mode adds about a
minute: its kernels' compilation, the sweep's complete cases and its timings).
"""
import inspect, sys
from kernels._lab import lab_main, Measured, peaks_for
import pandas as pd
import torch

NAME = "tensorized_bench"
GPU_CASES = (
    dict(B=1, H=8, Hkv=2, L=4099, D=128, shape=(17, 16, 16), causal=True),    # m=3, GQA 4:1, padded, odd fibre
    dict(B=2, H=4, Hkv=4, L=8192, D=64, shape=None, causal=True),             # default factorization (128 x 64), batch 2
    dict(B=1, H=4, Hkv=1, L=3000, D=128, shape=(60, 50), causal=True),        # m=2, non-power-of-two fibres, MQA
    dict(B=1, H=4, Hkv=2, L=1000, D=96, shape=(10, 10, 10), causal=False),    # non-causal, D=96
    dict(B=1, H=2, Hkv=2, L=777, D=128, shape=(777,), causal=True),           # m=1: plain causal attention, long fibre
    dict(B=1, H=4, Hkv=4, L=16384, D=128, shape=(128, 128), causal=True),
    dict(B=1, H=4, Hkv=4, L=65536, D=128, shape=(512, 128), causal=True),     # the 512-long fibres of the 128k benchmark shape
    # the complete mode: two value streams per hop
    dict(B=1, H=8, Hkv=2, L=4099, D=128, shape=(17, 16, 16), causal="complete"),   # m=3 (a middle hop with both streams), GQA, padded
    dict(B=2, H=4, Hkv=4, L=8192, D=64, shape=None, causal="complete"),            # default factorization, batch 2, D=64
    dict(B=1, H=4, Hkv=1, L=3000, D=96, shape=(60, 50), causal="complete"),        # m=2, MQA, D=96
    dict(B=1, H=2, Hkv=2, L=777, D=128, shape=(777,), causal="complete"),          # m=1: one causal pass
    dict(B=1, H=4, Hkv=4, L=65536, D=128, shape=(512, 128), causal="complete"),    # long fibres: several blocks on both sides of the diagonal
)
BF16_TOL = 3e-2
MIN_SPEEDUP_128K = 30.0


def summarize(bench: pd.DataFrame) -> pd.DataFrame:
    "One row per (L, causal mode): the tensor shape, ms and speedup per pass, our roofline fraction, and where SDPA's number comes from."
    bench = bench if "causal" in bench else bench.assign(causal="dominance")      # an older commit's table has one (causal) mode
    rows = []
    for (L, causal), grp in bench.groupby(["L", "causal"], sort=True):
        row = dict(L=L, causal=causal, shape=grp["shape"].iloc[0])
        for r in grp.itertuples():
            row.update({f"ours_ms_{r.mode}": r.ours_ms, f"sdpa_ms_{r.mode}": r.sdpa_ms, f"speedup_{r.mode}": r.speedup,
                        f"ours_roofline_frac_{r.mode}": r.ours_roofline_frac, f"sdpa_{r.mode}": r.sdpa_note})
        rows.append(row)
    return pd.DataFrame(rows)


def bar(bench: pd.DataFrame, L: int = 131072) -> pd.DataFrame:
    "Each causal mode's forward speedup at length L against MIN_SPEEDUP_128K (empty when L or the forward pass was not run)."
    fwd = bench[(bench["mode"] == "fwd") & (bench.L == L)]
    if "causal" not in fwd: fwd = fwd.assign(causal="dominance")
    return pd.DataFrame([dict(L=L, causal=r.causal, shape=r.shape, ours_ms=r.ours_ms, sdpa_ms=r.sdpa_ms, sdpa_note=r.sdpa_note,
                              speedup=r.speedup, required=MIN_SPEEDUP_128K, meets=bool(r.speedup >= MIN_SPEEDUP_128K)) for r in fwd.itertuples()])


def add_args(ap):
    ap.add_argument("--lengths", default="8192,32768,131072,524288,1048576")
    ap.add_argument("--modes", default="fwd,fwd+bwd")
    ap.add_argument("--causal", default="dominance,complete", help="causal mask modes to time (comma-separated; default: %(default)s)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--sdpa-budget-s", type=float, default=15.0, help="max seconds of SDPA timing per (L, mode)")
    ap.add_argument("--m", type=int, default=None, help="force the number of tensor dims (default: choose_factorization)")
    ap.add_argument("--no-sweep", action="store_true")


def measure(lib, a) -> Measured:
    T, core = lib.tensorized, lib.core
    lengths = [int(x) for x in a.lengths.split(",")]
    has_modes = hasattr(T, "causal_mode")            # an older commit (before the complete mode) takes causal=True/False only
    tables, ok = {}, True
    if not a.no_sweep:
        cases = GPU_CASES if has_modes else [c for c in GPU_CASES if isinstance(c["causal"], bool)]
        with core.Timer() as ts: sweep = T.correctness_sweep(cases, dtype=torch.bfloat16)
        sweep["pass"] = (sweep[["o", "dq", "dk", "dv"]].max(axis=1) < BF16_TOL) & ~sweep.nan
        print(sweep.to_string(index=False), f"\n[sweep] {ts.elapsed:.1f} s", flush=True)
        tables["correctness_sweep"] = sweep; ok = bool(sweep["pass"].all())
    # roofline floors at this GPU's row of core.PEAKS (or --peaks); an older commit's benchmark may not take them, or causal modes
    params = inspect.signature(T.benchmark_vs_sdpa).parameters
    kw = dict(peaks=peaks_for(a)) if "peaks" in params else {}
    if "causal" in params: kw["causal"] = a.causal.split(",")
    bench = T.benchmark_vs_sdpa(lengths, B=1, H=32, D=128, dtype=torch.bfloat16, modes=a.modes.split(","), reps=a.reps,
                                sdpa_budget_s=a.sdpa_budget_s, shape_for=(lambda L: T.choose_factorization(L, a.m)) if a.m else None,
                                log=lambda s: print(s, flush=True), **kw)
    tables["benchmark"] = bench
    try:
        tables["summary"] = summarize(bench); print(tables["summary"].to_string(index=False), flush=True)
        tables["bar"] = bar(bench)
        if len(tables["bar"]): print(tables["bar"].to_string(index=False), flush=True)
    except Exception as e: print(f"[tensorized_bench] summary failed ({e!r}); the full table is still written", flush=True)
    import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    b = bench if "causal" in bench else bench.assign(causal="dominance")
    for (mode, causal), grp in b.groupby(["mode", "causal"]):
        ax[0].loglog(grp.L, grp.ours_ms, "o-" if causal == "dominance" else "^-", label=f"tensorized {mode}, {causal}")
        ax[1].semilogx(grp.L, grp.speedup, "o-" if causal == "dominance" else "^-", label=f"{mode}, {causal}")
    for mode, grp in b[b.causal == b.causal.iloc[0]].groupby("mode"):        # SDPA: one measurement per (L, pass)
        meas = grp[grp.sdpa_note.str.startswith("measured")]; ext = grp[~grp.sdpa_note.str.startswith("measured")]
        ax[0].loglog(meas.L, meas.sdpa_ms, "s--", label=f"SDPA flash {mode}")
        if len(ext): ax[0].loglog(ext.L, ext.sdpa_ms, "x:", label=f"SDPA {mode} (extrapolated)")
    ax[0].set_xlabel("L"); ax[0].set_ylabel("median ms"); ax[0].legend(fontsize=7)
    ax[1].axhline(11, color="gray", ls=":", label="paper: 11x at 128k"); ax[1].axhline(MIN_SPEEDUP_128K, color="red", ls=":", label="required at 128k")
    ax[1].set_xlabel("L"); ax[1].set_ylabel("speedup over SDPA"); ax[1].legend(fontsize=7)
    fig.suptitle(f"{core.device_name()}: tensorized attention vs SDPA flash (B=1, H=32, D=128, bf16, causal)")
    plt.close(fig)
    return Measured(tables, figures={"benchmark": fig}, ok=ok,
                    meta=dict(roofline=bench.attrs.get("roofline"), bf16_tolerance=BF16_TOL, lengths=lengths,
                              causal=a.causal.split(",") if "causal" in params else ["dominance"], min_speedup_128k=MIN_SPEEDUP_128K))


def main(argv=None) -> int:
    return lab_main(NAME, __doc__, measure, add_args, argv)


if __name__ == "__main__":
    sys.exit(main())
