"""Where a ShadowKV decode step's time goes at 8B scale: host (Python, launches) or GPU. Profiles a few decode steps of the
Llama-3-8B-shaped random model (notebook 51's setup) for ShadowKV and for full attention, and reports per step: wall time, the
GPU's busy time (sum of its kernel and copy times), and the ops with the most host (self CPU) time and the most GPU time.

    python kernels/shadowkv_decode_profile.py [--context 122880] [--batch 13] [--full-batch 3] [--out reports/kernels/shadowkv_decode_profile]
    python kernels/shadowkv_decode_profile.py --tiny      # a toy model on CPU: checks the script, measures nothing of interest
"""
import argparse, time
import longctx_nb.core  # noqa: F401  (sets TRITON_INTERPRET=1 without CUDA, before triton is imported)
from longctx_nb.core import run_meta, save_report, Preset
import pandas as pd
import torch
from torch.profiler import profile, ProfilerActivity
from torch.autograd import DeviceType
from longctx_nb.shadowkv import ShadowKVConfig
from longctx_nb.shadowkv_throughput import llama_config, random_llama, synthetic_prefill, build_cache, decode_speed


def profile_steps(model, cache, batch, steps):
    "Decode `steps` tokens under the profiler; per-step wall ms, GPU busy ms, and the op tables."
    dev = next(model.parameters()).device
    cuda = dev.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    toks = torch.randint(model.config.vocab_size, (steps, batch, 1)).to(dev)
    with profile(activities=acts) as prof:
        t = time.perf_counter()
        for i in range(steps):
            pos = torch.full((batch, 1), cache.get_seq_length(), device=dev)
            model(input_ids=toks[i], position_ids=pos, past_key_values=cache, use_cache=True, logits_to_keep=1)
        if cuda: torch.cuda.synchronize()
        wall = (time.perf_counter() - t) * 1e3 / steps
    ev = prof.key_averages()
    dev_time = lambda e: getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0))
    # GPU busy time: the device events themselves (kernels, copies); CPU ops also carry their kernels' time, so summing every
    # row would count it twice
    gpu_busy = sum(dev_time(e) for e in ev if e.device_type != DeviceType.CPU) / 1e3 / steps
    rows = [dict(op=e.key, calls_per_step=e.count / steps, host_self_ms_per_step=e.self_cpu_time_total / 1e3 / steps,
                 gpu_ms_per_step=dev_time(e) / 1e3 / steps) for e in ev]
    ops = pd.DataFrame(rows)
    return wall, gpu_busy, ops


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=122880)
    ap.add_argument("--batch", type=int, default=13)
    ap.add_argument("--full-batch", type=int, default=3)
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", default="reports/kernels/shadowkv_decode_profile")
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not a.tiny
    dev = torch.device("cuda" if cuda else "cpu")
    over = dict(vocab_size=256, hidden_size=128, intermediate_size=128, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=2, head_dim=16) if a.tiny else {}
    if a.tiny: a.context, a.batch, a.full_batch, a.budget = 2048, 2, 2, 64
    model = random_llama(llama_config(**over), dev, torch.bfloat16 if cuda else torch.float32)
    rank = 16 if a.tiny else 160
    rec = synthetic_prefill(model, a.context, rank)
    summary, tables = [], {}
    for name, method, batch, st in [("ShadowKV", "shadowkv", a.batch,
                                     ShadowKVConfig(budget=a.budget, rank=rank, min_prefill=1024, reserve_tokens=64)),
                                    ("full attention", "full", a.full_batch, None)]:
        cache = build_cache(model, rec, batch, method, st, reserve_tokens=64)
        try:
            ctx = torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION) if cuda else __import__("contextlib").nullcontext()
            with ctx:
                plain = decode_speed(model, cache, batch, a.context, a.steps, warmup=3)
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
    save_report(a.out, tables=tables, meta=run_meta(Preset("gpu" if cuda else "tiny", needs_gpu=cuda), None,
                                                     script="kernels/shadowkv_decode_profile.py", **vars(a)))


if __name__ == "__main__":
    main()
