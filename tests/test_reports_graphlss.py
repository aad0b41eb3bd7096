"Checks on what the GraphLSS smoke run wrote (reports/30_graphlss/smoke or the CI run's LONGCTX_REPORTS)."
import json
import numpy as np
import pandas as pd
from conftest import report_dir

NB = "30_graphlss"
EDGE_TYPES = ("order", "similarity", "word_in_sentence", "word_similarity")


def test_rouge_table(smoke_reports):
    t = pd.read_csv(report_dir(smoke_reports, NB) / "rouge.csv").set_index("method")
    assert list(t.index) == ["Oracle", "Lead", "TextRank", "MLP (no graph)", "GraphLSS"]
    cols = [f"{k}_{m}" for k in ("rouge1", "rouge2", "rougeLsum") for m in "prf"]
    v = t[cols].to_numpy(dtype=float)
    assert np.isfinite(v).all() and (v >= 0).all() and (v <= 100).all()
    assert (t.rouge1_f >= t.rouge2_f).all() and (t.rougeLsum_f <= t.rouge1_f + 1e-6).all()
    assert t.loc["Oracle", "rouge1_f"] == t.rouge1_f.max() and t.loc["Oracle", "rouge1_f"] > 40
    assert t.loc["GraphLSS", "seeds"] >= 2 and t.loc["Lead", "seeds"] == 1 and (t[[c for c in t.columns if c.endswith("_sd")]] >= 0).all().all()


def test_ablations_and_per_seed(smoke_reports):
    d = report_dir(smoke_reports, NB)
    a = pd.read_csv(d / "ablations.csv")
    assert a.method.tolist() == ["GraphLSS"] + [f"GraphLSS - {e}" for e in EDGE_TYPES]
    assert a.delta_rouge1_f.iloc[0] == 0 and np.isfinite(a[["rouge1_f", "rouge2_f", "rougeLsum_f"]].to_numpy()).all()
    pr = pd.read_csv(d / "paired_differences.csv")
    assert pr.comparison.tolist() == ["GraphLSS minus MLP (no graph)"] + [f"GraphLSS - {e} minus GraphLSS" for e in EDGE_TYPES]
    assert (pr.seeds >= 2).all() and ((pr.seeds_where_positive >= 0) & (pr.seeds_where_positive <= pr.seeds)).all()
    s = pd.read_csv(d / "rouge_per_seed.csv")
    assert set(s.method) == {"Oracle", "Lead", "TextRank", "MLP (no graph)", "GraphLSS", *[f"GraphLSS - {e}" for e in EDGE_TYPES]}


def test_class_weight_history_and_figure(smoke_reports):
    d = report_dir(smoke_reports, NB)
    h = pd.read_csv(d / "class_weight_history.csv")
    for (m, seed), g in h.groupby(["method", "seed"]):
        assert g.epoch.tolist() == list(range(1, len(g) + 1))
        assert g.class_weight.is_monotonic_decreasing and (g.class_weight >= 1).all()
        assert ((g.tau >= 0) & (g.tau <= 1)).all() and np.isfinite(g.train_loss).all()
    assert (d / "class_weight.png").stat().st_size > 5000


def test_graphs_speed_meta_claims(smoke_reports):
    d = report_dir(smoke_reports, NB)
    g = pd.read_csv(d / "graphs.csv")
    assert g.split.tolist() == ["train", "validation", "test"] and (g.n_sentences > 5).all() and (g.e_order > 0).all() and (g.n_words > 0).all()
    sp = pd.read_csv(d / "speed.csv")
    assert sp.what.str.startswith("graph construction").any() and sp.what.str.contains("training per epoch, GraphLSS").any()
    assert (sp["mean"] > 0).all() and np.isfinite(sp[["mean", "median", "max"]].to_numpy()).all()
    meta = json.loads((d / "meta.json").read_text())
    assert meta["preset"]["name"] == "smoke" and meta["graph_settings"]["sim_threshold"] == 0.7 and meta["corpus"] == "aclsum"
    c = pd.read_csv(d / "paper_vs_ours.csv")
    assert len(c) == 7 and set(c.paper.iloc[:6].astype(float)) == {63.57, 36.91, 55.32, 55.14, 23.0, 50.83}
    assert np.isfinite(c.ours.astype(float)).all()
