"Checks on what the 40_longppl smoke run wrote (LongPPL / LongCE)."
import importlib.util, json
import numpy as np
import pandas as pd
from conftest import report_dir


def _read(name, smoke_reports):
    return pd.read_csv(report_dir(smoke_reports, "40_longppl") / f"{name}.csv")


def test_meta_and_files(smoke_reports):
    d = report_dir(smoke_reports, "40_longppl")
    meta = json.loads((d / "meta.json").read_text())
    assert meta["preset"]["name"] == "smoke" and meta["wall_s"] > 0 and "YaRN" in meta["evaluator"]
    for f in ("longce_vs_ce.png", "correlation.png"):
        assert (d / f).stat().st_size > 5000


def test_key_tokens_found_on_the_evaluation_texts(smoke_reports):
    k = _read("key_tokens", smoke_reports)
    assert (k.tokens > 0).all() and (k.key_tokens >= 1).all() and ((k.key_fraction > 0) & (k.key_fraction < 0.5)).all()
    demo = _read("demo_key_tokens", smoke_reports)
    assert len(demo) > 0 and (demo.LSD > 2).all() and (demo.nll_full < 2).all() and (demo.position >= 64).all()


def test_longce_vs_ce_table(smoke_reports):
    t = _read("longce_vs_ce", smoke_reports)
    meta = json.loads((report_dir(smoke_reports, "40_longppl") / "meta.json").read_text())
    lengths = meta["preset"]["eval_lengths"]
    assert set(t.variant) == {"YaRN x4", "CE (YaRN x4)", "LongCE (YaRN x4)"} and len(t) == 3 * len(lengths)
    assert (t[t.variant != "YaRN x4"].seeds == len(meta["preset"]["seeds"])).all()
    assert np.isfinite(t.ppl).all() and (t.ppl > 1).all() and (t.ppl < 1e4).all() and t.accuracy.between(0, 1).all()
    assert (t.longppl.dropna() >= 1).all()


def test_training_ran_both_losses_for_every_seed(smoke_reports):
    tr = _read("training", smoke_reports)
    assert sorted(tr.method.unique()) == ["CE", "LongCE"] and len(tr) == 2 * tr.seed.nunique()
    assert np.isfinite(tr.last_loss).all() and (tr.last_loss < 15).all()
    lce = tr[tr.method == "LongCE"]
    assert (lce.mean_weight >= 0).all() and (lce.mean_weight <= 5).all() and lce.frac_weight_up.between(0, 1).all()


def test_variants_and_correlation(smoke_reports):
    v = _read("variants", smoke_reports)
    assert len(v) >= 8 and v.label.is_unique and np.isfinite(v.ppl).all() and v.accuracy.between(0, 1).all()
    assert {"RoPE scaling, no training", "context cut", "fine-tuned", "as released"} <= set(v.kind)
    c = _read("correlation", smoke_reports)
    assert c.metric.tolist() == ["ppl", "longppl"] and (c.pearson_r.dropna().abs() <= 1 + 1e-9).all()
    assert c.set_index("metric").loc["ppl", "variants"] == len(v)


def test_paper_vs_ours_and_agreement(smoke_reports):
    p = _read("paper_vs_ours", smoke_reports)
    assert len(p) == 4 and p.claim.str.contains("LongPPL").any() and p.setting_difference.notna().all()
    a = _read("agreement_with_official", smoke_reports)
    if importlib.util.find_spec("longppl") is None:  # the run and this check share one environment
        assert a.quantity.tolist() == ["longppl not installed"]
    else:
        assert len(a) == 3 and (a.rel_diff < 1e-4).all()
