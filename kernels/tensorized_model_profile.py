"""Where a tensorized SmolLM2-135M spends its time, beside full attention: a forward (no cache, no LM head) at each --lengths,
batch --batch, and one training step (forward + backward, float32 weights under bf16 autocast, as train_lm runs 11's continued
pretraining) at --train-batch x --train-len. Random weights of SmolLM2-135M's shape (time does not depend on them).
Per (model, what): the plain median ms, the profiled wall ms, the GPU's busy ms (its kernels and copies), host self ms and
launches; and the ops with the most GPU time and the most host time.

    python -m kernels.tensorized_model_profile [--lengths 2048 32768] [--batch 1] [--train-len 2048] [--train-batch 8] [--out DIR]
    python -m kernels.tensorized_model_profile --tiny      # a toy model on CPU: checks the script, measures nothing of interest

Needs CUDA unless --tiny. Exit status 1 when a run gives no finite time.
"""
import contextlib, copy, math, sys
from kernels._lab import lab_main, Measured, profiled
import pandas as pd
import torch

NAME = "tensorized_model_profile"
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                    tie_word_embeddings=True)
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16)


def add_args(ap):
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 32768])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--train-len", type=int, default=2048)
    ap.add_argument("--train-batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--modes", nargs="+", default=["full", "dominance", "complete"])
    ap.add_argument("--tiny", action="store_true", help="a toy model (on CPU when there is no GPU): checks the script")


def measure(lib, a) -> Measured:
    from transformers import LlamaConfig
    tm, models = lib.tensorized_models, lib.models
    bench = lib.core.benchmark
    cuda = torch.cuda.is_available() and not a.tiny
    dev = torch.device("cuda" if cuda else "cpu")
    if a.tiny: a.lengths, a.train_len, a.train_batch, a.reps = [64, 256], 64, 2, 1
    cfg = LlamaConfig(**{**SMOLLM2_135M, **(TINY if a.tiny else {})})
    base = lib.shadowkv_throughput.random_llama(cfg, dev, torch.float32).requires_grad_(True)
    models.set_attention_hook(base, None)                            # full attention: SDPA through the 'longctx' implementation
    layout = tm.make_layout(2, length=a.train_len)
    make = {"full": lambda: base, **{m: (lambda m=m: tm.tensorize(base, layout, causal=m)) for m in ("dominance", "complete")}}
    summary, tables = [], {}
    flash = lambda: torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION) if cuda else contextlib.nullcontext()
    for mode in a.modes:
        train_model = make[mode]()
        infer = tm.cast_keep_rope(copy.deepcopy(train_model), torch.bfloat16 if cuda else torch.float32).eval()
        runs = []
        for L in a.lengths:
            ids = torch.randint(0, cfg.vocab_size, (a.batch, L), device=dev)
            def fwd(ids=ids):
                with torch.no_grad(): infer.model(input_ids=ids, use_cache=False)
            runs.append((f"forward {a.batch}x{L}", fwd))
        ids = torch.randint(0, cfg.vocab_size, (a.train_batch, a.train_len), device=dev)
        def step():
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
                loss = train_model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward(); train_model.zero_grad(set_to_none=True)
        runs.append((f"train step {a.train_batch}x{a.train_len}", step))
        with flash():
            for what, fn in runs:
                plain = bench(fn, warmup=2, reps=a.reps)["median_ms"]
                wall, busy, ops = profiled(fn, a.reps, cuda)
                row = dict(model=mode, what=what, ms=plain, profiled_ms=wall, gpu_busy_ms=busy,
                           gpu_busy_share=busy / wall if wall else float("nan"), host_self_ms=ops.host_self_ms.sum(), launches=ops.calls.sum())
                summary.append(row); print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
                key = f"{mode}_{what.split()[0]}_{what.split()[-1]}"
                tables[f"{key}_top_gpu"] = ops.sort_values("gpu_ms", ascending=False).head(20).round(4)
                tables[f"{key}_top_host"] = ops.sort_values("host_self_ms", ascending=False).head(20).round(4)
                print(tables[f"{key}_top_gpu"].head(12).to_string(), flush=True)
        del infer, train_model
        if cuda: torch.cuda.empty_cache()
    tables = {"summary": pd.DataFrame(summary).round(3), **tables}
    print(tables["summary"].to_string())
    ok = all(math.isfinite(r["ms"]) and r["ms"] > 0 for r in summary)
    return Measured(tables, ok=ok, meta=dict(mode="gpu" if cuda else "tiny", config=cfg.to_dict() if a.tiny else SMOLLM2_135M,
                                             layout=list(layout.shape), **{k: v for k, v in vars(a).items() if k not in ("out", "ab")}))


def main(argv=None) -> int:
    return lab_main(NAME, __doc__, measure, add_args, argv, needs_cuda=lambda a: not a.tiny)


if __name__ == "__main__":
    sys.exit(main())
