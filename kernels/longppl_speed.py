"""Key-token discovery speed: ours (longctx_nb.longppl.find_key_tokens, batched short windows, LM head on scored positions only)
against the official implementation (PyPI longppl==0.3.0, `find_key_token`: one forward pass per window, full logits), on one GPU:

    python -m kernels.longppl_speed [--out reports/kernels/longppl_speed] [--ab COMMIT]

Same model object (SmolLM2-135M, bf16, SDPA), same text (held-out Persuasion), same settings, in the same process:
1. SmolLM2 scale: an 8192-token text, trunc_len 1024, window 512 (the notebook's SMOLLM2 defaults), RoPE as released;
2. official scale: a 32768-token text, trunc_len 4096, window 1024 (the paper's defaults), SmolLM2 with YaRN x4.
Each is timed end to end (tokenization, full pass, short windows, intervals): median wall time of `--reps` runs after one warm-up,
CUDA synchronized. Ours runs at several `window_batch` sizes. The key tokens of both are compared (Jaccard of key positions): in bf16 the
official code takes the cross-entropy of bf16 logits while ours upcasts to float32 first, so tokens on a threshold can flip; a float32
run of case 1 checks exact agreement. Needs the `longppl` wheel (pure Python: `pip install --no-deps longppl==0.3.0`).
Budget: about 1-2 minutes on an H100, most of it model loading and the official code at 32k. Exit status 1 when the float32 run's
key-token intervals differ from the official ones.
"""
import statistics, sys
from kernels._lab import lab_main, Measured
import numpy as np
import pandas as pd
import torch

NAME = "longppl_speed"
CASES = (dict(name="SmolLM2 scale", length=8192, settings="SMOLLM2", rope=("default", 1.0)),
         dict(name="official scale", length=32768, settings="OFFICIAL", rope=("yarn", 4.0)))


def timed(core, fn, reps: int) -> tuple[float, object]:
    "Median seconds of `fn()` over `reps` runs after one warm-up, and its last result."
    out = fn(); times = []
    for _ in range(reps):
        with core.Timer() as t: out = fn()
        times.append(t.elapsed)
    return statistics.median(times), out


def key_positions_official(lib, text, tok, intervals) -> set:
    "Evaluator-token positions inside the official intervals (the official code keeps only intervals; same rule as ours)."
    token_offsets, tokens_in_intervals = lib.longppl.token_offsets, lib.longppl.tokens_in_intervals
    ids, off = token_offsets(tok, text, add_special_tokens=True)
    return set(np.nonzero(tokens_in_intervals(off, np.asarray(intervals).reshape(-1, 2)))[0].tolist())


def add_args(ap):
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--window-batches", default="4,8,16")


def measure(lib, a) -> Measured:
    try:
        from longppl import longppl as official
    except ImportError:
        raise SystemExit("the official package is needed: pip install --no-deps longppl==0.3.0")
    core, L = lib.core, lib.longppl
    load_corpus, tokenize_docs, token_windows = lib.data.load_corpus, lib.data.tokenize_docs, lib.data.token_windows
    set_rope_scaling = lib.get("set_rope_scaling", "models", "longppl")
    model, tok = lib.models.load_causal_lm("smollm2-135m")  # bf16 on CUDA, SDPA
    docs = load_corpus("austen", "test"); ids = tokenize_docs(docs, tok)
    rows, agree = [], []
    for case in CASES:
        st = getattr(L, case["settings"])
        text = tok.decode(token_windows(docs, tok, case["length"], 1, seed=7, token_ids=ids)[0])
        set_rope_scaling(model, *case["rope"])
        with torch.no_grad():
            t_off, iv_off = timed(core, lambda: official.find_key_token(text, model, tok, st.trunc_len, st.sliding_window, alpha=st.alpha, beta=st.beta), a.reps)
        theirs = key_positions_official(lib, text, tok, iv_off.numpy())
        base = dict(case=case["name"], text_tokens=len(tok(text)["input_ids"]), trunc_len=st.trunc_len, sliding_window=st.sliding_window,
                    rope=lib.get("rope_name", "longppl", "models")(model), dtype="bfloat16")
        rows.append(dict(base, impl="official longppl 0.3.0", window_batch=1, seconds=t_off, speedup=1.0, key_tokens=len(theirs), jaccard=1.0))
        for wb in [int(x) for x in a.window_batches.split(",")]:
            t_ours, kt = timed(core, lambda: L.find_key_tokens(text, model, tok, st, window_batch=wb), a.reps)
            ours = set(kt.positions.tolist())
            rows.append(dict(base, impl="ours", window_batch=wb, seconds=t_ours, speedup=t_off / t_ours, key_tokens=len(ours),
                             jaccard=len(ours & theirs) / len(ours | theirs) if ours | theirs else 1.0))
        print(pd.DataFrame(rows).tail(1 + len(a.window_batches.split(","))).to_string(index=False), flush=True)
    # exact agreement in float32 (case 1)
    model32, _ = lib.models.load_causal_lm("smollm2-135m", dtype=torch.float32)
    case = CASES[0]; st = getattr(L, case["settings"])
    text = tok.decode(token_windows(docs, tok, case["length"], 1, seed=7, token_ids=ids)[0])
    with torch.no_grad(): iv_off = official.find_key_token(text, model32, tok, st.trunc_len, st.sliding_window, alpha=st.alpha, beta=st.beta)
    kt = L.find_key_tokens(text, model32, tok, st)
    agree.append(dict(case=case["name"], dtype="float32", official_key_tokens=len(key_positions_official(lib, text, tok, iv_off.numpy())),
                      ours_key_tokens=kt.n_key, intervals_identical=bool(np.array_equal(iv_off.numpy(), kt.intervals))))
    speed, agreement = pd.DataFrame(rows), pd.DataFrame(agree)
    print(agreement.to_string(index=False))
    best = speed[speed.impl == "ours"].groupby("case").speedup.max()
    claims = core.paper_vs_ours([dict(claim=f"key-token discovery speedup over the official code ({c})", paper="(target: >= 2x)",
                                      ours=round(float(s), 2), setting_difference=f"SmolLM2-135M bf16 on {core.device_name()}, best window_batch")
                                 for c, s in best.items()])
    return Measured({"speed": speed, "agreement_fp32": agreement}, ok=bool(agreement.intervals_identical.all()), claims=claims,
                    meta=dict(reps=a.reps, window_batches=a.window_batches, cases=[dict(c) for c in CASES], model="smollm2-135m",
                              official="longppl==0.3.0"))


def main(argv=None) -> int:
    return lab_main(NAME, __doc__, measure, add_args, argv)


if __name__ == "__main__":
    sys.exit(main())
