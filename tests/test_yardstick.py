"60_yardstick: the registry, bad inputs, the cached teacher-forced NLL, kept positions, skipped rows, the statistics, the merge of parts."
import json
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from longctx_nb.core import save_report, run_meta
from longctx_nb.evals import TaskSample, evaluate
from longctx_nb.kvcache import FullKV, SnapKV, StreamingLLM, QuestPages, H2O, record_prefill, record_window
from longctx_nb.models import token_nll
from longctx_nb.shadowkv import ShadowKV
from longctx_nb.yardstick import (part_files, FAMILIES, Built, Env, Part, Skip, Variant, VariantArrays, BatchMetrics, Workload, budget_label,
                                  cached_nll, check_runnable, correlation_table, expected_rows, first_step_attention, head_scores_from_json,
                                  kept_mask, kept_mass, kept_positions, load_parts, longce_vs_ce, merge_parts, multilevel_bootstrap,
                                  paper_variants, plain_tail_nll, register, score_variants, tail_nll, variant_arrays, variant_summary)
from helpers import assert_close


@pytest.fixture(scope="module")
def tok():
    from longctx_nb.models import load_tokenizer
    t = load_tokenizer("smollm2-135m")
    if t.pad_token is None: t.pad_token = t.eos_token
    return t


def _ids(B, L, seed=0, vocab=128):
    return torch.randint(3, vocab, (B, L), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- registry
def test_paper_registry_has_every_method_once():
    vs = paper_variants()
    names = [v.name for v in vs]
    assert len(names) == len(set(names)) == 1 + 6 * 5 + 3 + 4 + 6 + 5 + 3
    fam = pd.Series([v.family for v in vs]).value_counts().to_dict()
    assert fam == dict(kv=31, finetune=11, rope=4, context=3, tensorized=3) and set(fam) == set(FAMILIES)
    assert {"shadowkv@1.56%", "quest@25%", "snapkv@2048t", "h2o@12.5%", "streaming@3.12%", "context 1024", "PI x4", "YaRN x2",
            "LongCE s2", "attn-ft symbolic-high", "CPT tensorized (complete)"} <= set(names)
    assert budget_label(1 / 64) == "1.56%" and budget_label(2048) == "2048t" and budget_label(0.25) == "25%"
    reg = {}
    for v in vs: register(v, reg)
    with pytest.raises(ValueError, match="already registered"): register(vs[0], reg)
    with pytest.raises(TypeError, match="takes a Variant"): register("full", reg)
    with pytest.raises(ValueError, match="family must be one of"): Variant("x", "pruning", "s", build=lambda env: None)
    with pytest.raises(TypeError, match="needs a builder"): Variant("x", "kv", "s")
    with pytest.raises(ValueError, match="non-empty name"): Variant("", "kv", "s", build=lambda env: None)


def test_kv_builders_match_the_baselines_to_shadowkv(tiny_llama, tok):
    class HP: shadow_rank, shadow_min_prefill = 16, 32
    env = Env(tiny_llama, tok, HP(), fp32=lambda: tiny_llama)
    reg = {v.name: v for v in paper_variants(budgets=(0.25, 64))}
    sk, q = reg["shadowkv@25%"].build(env).method, reg["quest@25%"].build(env).method
    assert isinstance(sk, ShadowKV) and (sk.rank, sk.min_prefill, sk.budget) == (16, 32, 0.25)
    assert isinstance(q, QuestPages) and q.budget == sk and q.attended_tokens(400) == sk.attended_tokens(400)
    assert reg["streaming@64t"].build(env).method.budget.budget == 64
    ctx = reg["context 2048"].build(env)
    assert ctx.context == 2048 and ctx.model is tiny_llama and isinstance(ctx.method, FullKV)
    rope = reg["YaRN x2"].build(env).model
    assert rope is not tiny_llama and rope.config.max_position_embeddings == 2 * tiny_llama.config.max_position_embeddings


def test_a_method_that_cannot_run_on_a_model_names_what_it_needs(tiny_llama):
    v = paper_variants(budgets=(0.25,))[0]
    class Tensorized(nn.Module): tensorized = "layout"
    with pytest.raises(TypeError, match="needs an attention the KV framework can hook.*tensorized"): check_runnable(v, Built(Tensorized(), FullKV()))
    with pytest.raises(TypeError, match="supported attention layout"): check_runnable(v, Built(nn.Linear(2, 2), FullKV()))
    check_runnable(v, Built(tiny_llama, FullKV()))
    check_runnable(v, Built(Tensorized(), None))          # no KV method: scored by its own attention


def test_bad_inputs(tiny_llama, tmp_path):
    ids = _ids(2, 40)
    with pytest.raises(ValueError, match="tail must be in"): tail_nll(tiny_llama, {"f": FullKV()}, ids, 39)
    with pytest.raises(ValueError, match="no methods"): tail_nll(tiny_llama, {}, ids, 8)
    with pytest.raises(ValueError, match="tail must be in"): plain_tail_nll(tiny_llama, ids, 40)
    with pytest.raises(ValueError, match="at least 4"): plain_tail_nll(tiny_llama, ids, 8, context=2)
    with pytest.raises(ValueError, match="positive counts"): multilevel_bootstrap(lambda v: 0.0, (3, 0))
    with pytest.raises(ValueError, match="level"): multilevel_bootstrap(lambda v: 0.0, (3,), level=1.5)
    f = tmp_path / "heads.json"
    f.write_text(json.dumps({f"{l}-{h}": [0.2] for l in range(2) for h in range(4)}))
    assert head_scores_from_json(f, 2, 4).shape == (2, 4)
    with pytest.raises(ValueError, match="outside a model"): head_scores_from_json(f, 2, 3)
    with pytest.raises(ValueError, match="scores 8 heads"): head_scores_from_json(f, 3, 4)
    arr = VariantArrays(["a"], ["kv"], np.zeros((1, 2)), np.zeros((1, 2)), np.zeros((1, 2)), np.zeros((1, 2)), np.zeros((1, 1)),
                        np.zeros((1, 1)), np.ones(1), np.ones(1))
    with pytest.raises(ValueError, match="unknown metric"): arr.metric("bleu")


# ---------------------------------------------------------------- teacher-forced NLL through a cache
@pytest.mark.parametrize("block", [1, 5, 32])
def test_cached_nll_of_full_attention_is_the_plain_forward(tiny_llama, block):
    ids = _ids(3, 90, seed=block)
    plain = token_nll(tiny_llama, ids)[:, -25:]
    got = tail_nll(tiny_llama, {"full": FullKV(), "exact snapkv": SnapKV(budget=0.25, min_prefill=1000)}, ids, 25, block=block)
    assert_close("full attention's cache", plain, got["full"], tol=dict(atol=1e-4))
    assert_close("a method that stayed exact", plain, got["exact snapkv"], tol=dict(atol=1e-4))
    assert_close("plain_tail_nll", plain, plain_tail_nll(tiny_llama, ids, 25), tol=dict(atol=1e-5))


def test_cached_nll_of_a_compressed_cache_decodes_like_generation(tiny_llama):
    "Query-dependent methods are fed one token per forward: their NLL equals the one of a cache fed the same tokens step by step."
    ids = _ids(2, 80, seed=3)
    logits, recs = record_prefill(tiny_llama, ids[:, :64], window=None)
    for m in (QuestPages(budget=0.25), ShadowKV(budget=0.25, rank=16, min_prefill=16, chunk_size=4, local_chunks=2), H2O(budget=0.25)):
        got = cached_nll(tiny_llama, m, recs, logits, ids[:, 64:], block=8)
        cache = m.make_cache(tiny_llama, 64).load_prefill(recs)
        ref = [torch.nn.functional.cross_entropy(logits, ids[:, 64], reduction="none")]
        with torch.no_grad():
            for t in range(64, 79):
                out = tiny_llama(input_ids=ids[:, t:t + 1], position_ids=torch.full((2, 1), t), past_key_values=cache, use_cache=True).logits[:, -1]
                ref.append(torch.nn.functional.cross_entropy(out, ids[:, t + 1], reduction="none"))
        cache.detach()
        assert_close(type(m).__name__, torch.stack(ref, 1), got, tol=dict(atol=1e-4))
    padded = ids[:, 64:].clone(); padded[0, 10:] = -100                 # a shorter target row: NaN after its end, the rest unchanged
    got = cached_nll(tiny_llama, FullKV(), recs, logits, padded)
    assert torch.isnan(got[0, 10:]).all() and torch.isfinite(got[0, :10]).all() and torch.isfinite(got[1]).all()


# ---------------------------------------------------------------- kept positions and mass
def test_kept_positions_of_every_method(tiny_llama):
    ids = _ids(2, 96, seed=4)
    S = ids.shape[1]
    methods = dict(full=FullKV(), streaming=StreamingLLM(budget=24), snapkv=SnapKV(budget=0.25), h2o=H2O(budget=0.25),
                   quest=QuestPages(budget=0.25), shadowkv=ShadowKV(budget=0.25, rank=16, min_prefill=16, chunk_size=4, local_chunks=2),
                   exact=SnapKV(budget=0.25, min_prefill=1000))
    logits, recs = record_prefill(tiny_llama, ids, window=record_window(list(methods.values())))
    q, p = first_step_attention(tiny_llama, recs, logits)
    assert len(q) == len(p) == 2 and q[0].shape == (2, 4, 1, 16) and torch.allclose(p[0].sum(-1), torch.ones(2, 4))
    sc = [m.self_attn.scaling for m in tiny_llama.model.layers]
    for name, m in methods.items():
        c = m.make_cache(tiny_llama, S).load_prefill(recs); c.detach()
        keep = kept_mask(c.layers[1], recs[1], q[1], sc[1])
        reads = c.layers[1].n_select * m.page_size + c.layers[1].tail if name == "quest" else m.attended_tokens(S)   # whole pages
        assert keep.shape == (2, 2, S) and (keep.sum(-1) == reads).all(), name
        mass, n = kept_mass(c, recs, q, p, sc)
        assert mass.shape == (2, 2, 4) and ((mass >= 0) & (mass <= 1 + 1e-5)).all() and (n[:, 1] == keep.sum(-1)).all()
        if name in ("full", "exact"): assert torch.allclose(mass, torch.ones_like(mass))
        if name == "streaming": assert keep[:, :, :4].all() and keep[:, :, S - 20:].all()
    with pytest.raises(TypeError, match="no kept_positions rule"): kept_positions(object(), recs[0], q[0], 1.0)


def test_batch_metrics_through_evaluate(tiny_llama, tok):
    samples = [TaskSample("niah_single", _ids(1, 40, seed=i)[0].tolist(), ["7"], 3) for i in range(3)]
    answers = [[11, 12, 13], [14], [15, 16]]
    heads = [(0, 1), (1, 3)]
    df = evaluate({"full": FullKV(), "snap": SnapKV(budget=0.5)}, samples, tiny_llama, tok, batch_size=2,
                  on_batch=BatchMetrics(tiny_llama, answers, heads))
    full = df[df.setting == "full"].reset_index(drop=True)
    for i, s in enumerate(samples):
        ref = token_nll(tiny_llama, torch.tensor([s.input_ids + answers[i]]))[0, 39:].mean()
        assert abs(full.answer_nll[i] - float(ref)) < 1e-4
    assert np.allclose(full.mass_all, 1, atol=1e-5) and np.allclose(full.mass_retrieval, 1, atol=1e-5)
    snap = df[df.setting == "snap"]
    assert (snap.mass_all < 1).all() and (snap.gpu_mb_per_seq.to_numpy() < full.gpu_mb_per_seq.to_numpy()).all()
    assert all(g.sort_values("sample").answer_tokens.tolist() == [3, 1, 2] for _, g in df.groupby("setting")) and (df.decode_tok_s > 0).all()
    with pytest.raises(ValueError, match="on_batch returned"):
        evaluate([FullKV()], samples, tiny_llama, tok, batch_size=2, on_batch=lambda d: [{}])


# ---------------------------------------------------------------- skipped rows
def test_skipped_rows_keep_their_reason(tiny_llama, tok):
    model = tiny_llama
    model.config.max_position_embeddings = 48
    keys = [("niah_single", 40, 0), ("niah_single", 60, 0)]
    samples = [TaskSample("niah_single", _ids(1, L, seed=L)[0].tolist(), ["7"], 3) for _, L, _ in keys]
    def missing(env): raise Skip("no weights here")
    vs = [Variant("full", "kv", "full", build=lambda env: Built(env.base, FullKV())),
          Variant("cut 16", "context", "last 16", build=lambda env: Built(env.base, FullKV(), context=16)),
          Variant("absent", "tensorized", "none", build=missing)]
    class HP: pass
    out = score_variants(vs, Env(model, tok, HP(), fp32=lambda: model), Workload(samples, keys, [[5, 6], [7]], batch_size=2, max_new_tokens=3),
                         log=lambda *a: None)
    s = out["scores"].set_index(["variant", "length"])
    assert s.loc[("full", 40), "status"] == "ok" and "exceeds the model's window of 48" in s.loc[("full", 60), "status"]
    assert (s.loc["cut 16"].status == "ok").all() and (s.loc["cut 16"].prompt_tokens == 16).all()     # a cut reads 16 tokens of any prompt
    assert (s.loc["absent"].status == "skipped: no weights here").all() and np.isnan(s.loc["absent"].score).all()
    assert out["variants"].set_index("variant").status.to_dict() == {"full": "ok", "cut 16": "ok", "absent": "skipped: no weights here"}
    reg = {v.name: v for v in vs}
    table = variant_summary(out["scores"], pd.DataFrame(columns=["variant", "status", "n_key", "nll_sum", "n_tokens", "key_nll_sum"]), reg, n_boot=50)
    assert table.set_index("variant").loc["absent", "status"] == "skipped: no weights here" and table.samples.tolist() == [1, 2, 0]


# ---------------------------------------------------------------- statistics
def _arrays(x, p, N=300, M=6, seed=0):
    rng = np.random.default_rng(seed)
    V = len(x)
    nll = np.repeat(np.asarray(x, float)[:, None], M, 1) * 50
    return VariantArrays([f"v{i}" for i in range(V)], ["kv"] * V, (rng.random((V, N)) < np.asarray(p)[:, None]).astype(float),
                         np.zeros((V, N)), np.repeat(np.asarray(p)[:, None], N, 1), np.repeat(np.asarray(x)[:, None], N, 1),
                         nll, nll, np.full(M, 50.0), np.full(M, 50.0))


def test_correlation_intervals_on_synthetic_variants():
    rng = np.random.default_rng(1)
    x = np.linspace(0, 2, 30)
    arr = _arrays(x, 0.9 - 0.35 * x + 0.03 * rng.normal(size=30))        # accuracy falls with log-perplexity x
    ct = correlation_table(arr, {"all": np.ones(30, bool)}, {"all": ["ppl", "longppl", "mass_all", "mass_retrieval"]}, n_boot=200)
    r = ct.set_index("predictor")
    assert r.loc["ppl", "pearson_hi"] < -0.8 and r.loc["ppl", "spearman_hi"] < -0.8 and r.loc["ppl", "pearson_lo"] >= -1
    assert r.loc["mass_all", "pearson_lo"] > 0.9                         # mass_all is the accuracy itself, up to sampling noise
    assert r.loc["mass_retrieval - mass_all", "pearson"] < 0           # and predicts it better than mass_retrieval (= -x)
    flat = _arrays(x, np.full(30, 0.5))                                 # one accuracy for everyone: no correlation to find
    assert abs(correlation_table(flat, {"all": np.ones(30, bool)}, {"all": ["ppl"]}, n_boot=100).pearson.iloc[0]) < 0.5
    assert correlation_table(arr, {"two": np.arange(30) < 2}, {"two": ["ppl"]}).empty        # fewer than 3 variants: no row
    pt, lo, hi = multilevel_bootstrap(lambda v, s: float(np.mean(v) + np.mean(s)), (10, 10), n_boot=300)
    assert pt == 9.0 and lo < 9 < hi


def test_variant_arrays_keep_only_fully_scored_variants():
    keys = [("t", 8, i) for i in range(4)]
    scores = pd.DataFrame([dict(variant=v, family="kv", task=t, length=L, index=i, score=float(v == "a"), answer_nll=1.0, status="ok")
                           for v in "abc" for t, L, i in keys])
    scores.loc[(scores.variant == "c") & (scores["index"] == 3), "status"] = "skipped: window"
    texts = pd.DataFrame([dict(variant=v, family="kv", text=j, corpus="x", n_tokens=10, n_key=2, nll_sum=10.0 * (1 + (v == "b")),
                               key_nll_sum=3.0, status="ok") for v in "abc" for j in range(2)])
    arr, left = variant_arrays(scores, texts)
    assert arr.names == ["a", "b"] and left == ["c: 3/4 samples, 2/2 texts scored"]
    assert np.allclose(arr.metric("accuracy"), [1, 0]) and np.allclose(arr.metric("ppl"), [np.e, np.e ** 2])
    assert np.allclose(arr.metric("longppl"), np.exp(1.5)) and np.isnan(arr.metric("mass_all")).all()


def test_longce_vs_ce_picks_cells_off_the_floor():
    rows = []
    for seed in (0, 1, 2):
        for loss, bonus in (("CE", 0.0), ("LongCE", 0.2)):
            for L, base in ((2048, 20), (4096, 0)):                       # 4096 sits at the floor: not picked
                for i in range(50):
                    rows.append(dict(variant=f"{loss} s{seed}", task="niah", length=L, index=i, status="ok",
                                     score=float(i < (base + 50 * bonus if base else 0))))
    rows.append(dict(variant="full", task="niah", length=2048, index=0, status="ok", score=1.0))
    t = longce_vs_ce(pd.DataFrame(rows), (0.1, 0.9), n_boot=200)
    assert t.task.tolist() == ["niah", "pooled"] and t.length.tolist() == [2048, -1] and (t.seeds == 3).all()
    assert np.allclose(t.longce_minus_ce, 20.0) and (t.lo <= 20).all() and (t.hi >= 20).all()
    assert longce_vs_ce(pd.DataFrame(rows), (0.95, 1.0)).empty


# ---------------------------------------------------------------- parts
def test_merge_of_parts(tmp_path):
    reg = {n: Variant(n, fam, "s", build=lambda env: None) for n, fam in (("full", "kv"), ("snapkv@25%", "kv"), ("PI x2", "rope"))}
    keys = [("t", L, i) for L in (2048, 4096) for i in range(2)]
    parts = [Part("kv-2k", families=("kv",), lengths=(2048,), ppl=True), Part("kv-4k", families=("kv",), lengths=(4096,), ppl=False),
             Part("models", families=("rope",))]
    exp = expected_rows(parts, reg, keys, n_texts=2)
    assert len(exp["scores"]) == 2 * 2 + 2 * 2 + 4 and len(exp["texts"]) == 2 * 2 + 2
    def rows(p, vs, lengths, texts):
        s = pd.DataFrame([dict(variant=v, family=reg[v].family, task=t, length=L, index=i, score=1.0, status="ok") for v in vs for t, L, i in keys if L in lengths])
        x = pd.DataFrame([dict(variant=v, family=reg[v].family, text=j, nll_sum=1.0, status="ok") for v in vs for j in range(2)] if texts else [],
                         columns=["variant", "family", "text", "nll_sum", "status"])
        save_report(tmp_path / p, tables=dict(scores=s, texts=x, variants=pd.DataFrame([dict(variant=v, status="ok") for v in vs])),
                    meta=run_meta(None, 1.0, part=p))
    rows("kv-2k", ["full", "snapkv@25%"], (2048,), True)
    rows("models", ["PI x2"], (2048, 4096), True)
    found = load_parts(tmp_path)
    assert sorted(found) == ["kv-2k", "models"] and found["kv-2k"]["meta"]["part"] == "kv-2k"
    assert sorted(load_parts(tmp_path, names=["models", "kv-8k-a"])) == ["models"]
    with pytest.raises(FileNotFoundError, match="no parts of kv-8k-a under"): load_parts(tmp_path, names=["kv-8k-a"], require=True)
    with pytest.raises(FileNotFoundError, match="no parts under"): load_parts(tmp_path / "elsewhere", require=True)
    assert load_parts(tmp_path / "elsewhere") == {}
    m = merge_parts(found, exp)
    s = m["scores"]
    assert len(s) == len(exp["scores"]) and (s[s.length == 4096].query("family == 'kv'").status == "not run: part kv-4k").all()
    assert (s[s.variant == "PI x2"].status == "ok").all() and (m["texts"].status == "ok").all() and len(m["texts"]) == 6
    rows("kv-4k", ["full"], (2048,), False)                               # a part that writes rows another part wrote
    with pytest.raises(ValueError, match="more than one part"): merge_parts(load_parts(tmp_path), exp)


def test_cpt_variants_skip_with_the_reason(tiny_llama, tok, tmp_path):
    reg = {v.name: v for v in paper_variants()}
    class HP: pass
    with pytest.raises(Skip, match="no cpt_dir given"): reg["CPT full attention"].build(Env(tiny_llama, tok, HP(), fp32=lambda: tiny_llama))
    with pytest.raises(Skip, match="load_cpt|has no full.pt"):
        reg["CPT full attention"].build(Env(tiny_llama, tok, HP(), fp32=lambda: tiny_llama, cpt_dir=str(tmp_path)))


def test_parts_that_overlap_are_refused():
    reg = {n: Variant(n, "kv", "s", build=lambda env: None) for n in ("full", "snapkv@25%")}
    with pytest.raises(ValueError, match="parts overlap"):
        expected_rows([Part("a", families=("kv",)), Part("b", names=("full",), ppl=False)], reg, [("t", 8, 0)], 1)
    assert Part("x", names=("full",), prefixes=("snap",)).select({**reg, "full attention CPT": Variant("full attention CPT", "tensorized", "s",
                                                                                                         build=lambda e: None)}) == list(reg.values())


def test_a_merge_without_parts_marks_every_row_not_run():
    reg = {"full": Variant("full", "kv", "s", build=lambda env: None)}
    m = merge_parts({}, expected_rows([Part("kv", families=("kv",))], reg, [("t", 8, 0), ("t", 8, 1)], 2))
    assert (m["scores"].status == "not run: part kv").all() and len(m["scores"]) == 2 and m["scores"].score.isna().all()
    assert len(m["texts"]) == 2 and m["texts"].nll_sum.isna().all()
    table = variant_summary(m["scores"], m["texts"], reg, n_boot=10)
    assert table.status.tolist() == ["not run: part kv"] and np.isnan(table.accuracy.iloc[0])
    # a variant that needs an input says what, so a table row not run names what would run it
    reg = {"CPT": Variant("CPT", "tensorized", "s", ("cpt_dir with 11's full.pt",), build=lambda env: None)}
    m = merge_parts({}, expected_rows([Part("tensorized", families=("tensorized",))], reg, [("t", 8, 0)], 1))
    assert m["scores"].status.tolist() == m["texts"].status.tolist() == ["not run: part tensorized (needs cpt_dir with 11's full.pt)"]
    assert "needs" not in m["scores"] and "needs" not in m["texts"]


def test_a_text_only_part_loads_and_merges(tmp_path):
    "A part with lengths=() scores texts only: its scores table is empty and column-less, which loads as an empty table (gzipped parts, as the notebook writes them)."
    reg = {"full": Variant("full", "kv", "s", build=lambda env: None)}
    keys = [("t", 2048, 0)]
    parts = [Part("kv-ppl", names=("full",), lengths=()), Part("kv-2k", names=("full",), ppl=False, lengths=(2048,))]
    texts = pd.DataFrame([dict(variant="full", family="kv", text=j, nll_sum=1.0, n_tokens=4, status="ok") for j in range(2)])
    save_report(tmp_path / "kv-ppl", files=part_files(dict(scores=pd.DataFrame(), texts=texts, variants=pd.DataFrame([dict(variant="full", status="ok")]))),
                meta=run_meta(None, 1.0, part="kv-ppl"))
    assert sorted(f.name for f in (tmp_path / "kv-ppl").iterdir()) == ["meta.json", "scores.csv.gz", "texts.csv.gz", "variants.csv.gz"]
    found = load_parts(tmp_path)
    assert found["kv-ppl"]["scores"].empty and len(found["kv-ppl"]["texts"]) == 2
    m = merge_parts(found, expected_rows(parts, reg, keys, n_texts=2))
    assert (m["texts"].status == "ok").all() and m["scores"].status.tolist() == ["not run: part kv-2k"]
