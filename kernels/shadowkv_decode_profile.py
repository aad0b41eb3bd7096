"""Where a ShadowKV decode step's time goes at 8B scale: host (Python, launches) or GPU. Profiles a few decode steps of the
Llama-3-8B-shaped random model (notebook 51's setup) for ShadowKV and for full attention, and reports per step: wall time, the
GPU's busy time (sum of its kernel and copy times), and the ops with the most host (self CPU) time and the most GPU time.

    python -m kernels.shadowkv_decode_profile [--context 122880] [--batch 13] [--full-batch 3] [--out DIR] [--ab COMMIT]
    python -m kernels.shadowkv_decode_profile --tiny      # a toy model on CPU: checks the script, measures nothing of interest

Needs CUDA unless --tiny. Exit status 1 when a decode gives no finite time.
"""
import contextlib, math, sys
from kernels._lab import lab_main, Measured, profiled
import pandas as pd
import torch

NAME = "shadowkv_decode_profile"


def profile_steps(model, cache, batch, steps):
    "Decode `steps` tokens under the profiler; per-step wall ms, GPU busy ms, and the op tables."
    dev = next(model.parameters()).device
    toks = iter(torch.randint(model.config.vocab_size, (steps, batch, 1)).to(dev))
    def step():
        pos = torch.full((batch, 1), cache.get_seq_length(), device=dev)
        model(input_ids=next(toks), position_ids=pos, past_key_values=cache, use_cache=True, logits_to_keep=1)
    wall, gpu_busy, ops = profiled(step, steps, dev.type == "cuda")
    ops = ops.rename(columns=dict(calls="calls_per_step", host_self_ms="host_self_ms_per_step", gpu_ms="gpu_ms_per_step"))
    return wall, gpu_busy, ops


def add_args(ap):
    ap.add_argument("--context", type=int, default=122880)
    ap.add_argument("--batch", type=int, default=13)
    ap.add_argument("--full-batch", type=int, default=3)
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--tiny", action="store_true", help="a toy model (on CPU when there is no GPU): checks the script")


def measure(lib, a) -> Measured:
    thr = lib.shadowkv_throughput
    ShadowKVConfig = lib.get("ShadowKVConfig", "shadowkv")
    # a cache of `batch` copies of the prefill (called build_cache before the KV-cache framework moved to kvcache)
    build_cache = lib.get("constructed_cache", "shadowkv_throughput", was="build_cache")
    cuda = torch.cuda.is_available() and not a.tiny
    dev = torch.device("cuda" if cuda else "cpu")
    over = dict(vocab_size=256, hidden_size=128, intermediate_size=128, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=2, head_dim=16) if a.tiny else {}
    if a.tiny: a.context, a.batch, a.full_batch, a.budget = 2048, 2, 2, 64
    model = thr.random_llama(thr.llama_config(**over), dev, torch.bfloat16 if cuda else torch.float32)
    rank = 16 if a.tiny else 160
    rec = thr.synthetic_prefill(model, a.context, rank)
    summary, tables = [], {}
    for name, method, batch, st in [("ShadowKV", "shadowkv", a.batch,
                                     ShadowKVConfig(budget=a.budget, rank=rank, min_prefill=1024, reserve_tokens=64)),
                                    ("full attention", "full", a.full_batch, None)]:
        cache = build_cache(model, rec, batch, method, st, reserve_tokens=64)
        try:
            ctx = torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION) if cuda else contextlib.nullcontext()
            with ctx:
                plain = thr.decode_speed(model, cache, batch, a.context, a.steps, warmup=3)
                wall, busy, ops = profile_steps(model, cache, batch, a.steps)
        finally:
            cache.detach(); del cache
            if cuda: torch.cuda.empty_cache()
        summary.append(dict(method=name, batch=batch, context=a.context, ms_per_step=plain["ms_per_step"], profiled_ms_per_step=wall,
                            gpu_busy_ms_per_step=busy, gpu_busy_share=busy / wall if wall else float("nan"),
                            host_self_ms_per_step=ops.host_self_ms_per_step.sum(), launches_per_step=ops.calls_per_step.sum()))
        key = name.split()[0].lower()
        tables[f"{key}_top_host"] = ops.sort_values("host_self_ms_per_step", ascending=False).head(25).round(4)
        tables[f"{key}_top_gpu"] = ops.sort_values("gpu_ms_per_step", ascending=False).head(25).round(4)
        print(summary[-1]); print(tables[f"{key}_top_host"].head(12).to_string())
    tables["summary"] = pd.DataFrame(summary).round(3)
    print(tables["summary"].to_string())
    ok = all(math.isfinite(r["ms_per_step"]) and r["ms_per_step"] > 0 for r in summary)
    return Measured(tables, ok=ok, meta=dict(mode="gpu" if cuda else "tiny", **{k: v for k, v in vars(a).items() if k not in ("out", "ab")}))


def main(argv=None) -> int:
    return lab_main(NAME, __doc__, measure, add_args, argv, needs_cuda=lambda a: not a.tiny)


if __name__ == "__main__":
    sys.exit(main())
