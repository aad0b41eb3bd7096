"Checks on what the ShadowKV notebook's smoke run wrote."
import json
import numpy as np
import pandas as pd
from conftest import report_dir

NB = "50_shadowkv"


def test_meta_and_files(smoke_reports):
    d = report_dir(smoke_reports, NB)
    meta = json.loads((d / "meta.json").read_text())
    assert meta["preset"]["name"] == "smoke" and meta["wall_s"] > 0
    assert 8 <= meta["rank"] <= meta["key_width"] == 192
    assert meta["exact_logit_diff"] < 1e-3
    for name in ("accuracy", "accuracy_by_context", "layouts", "rank_error", "attention_mass", "kernel_check", "paper_vs_ours"):
        assert (d / f"{name}.csv").exists() and (d / f"{name}.md").exists(), name
    for fig in ("accuracy_vs_budget", "rank_error"):
        assert (d / f"{fig}.png").stat().st_size > 5000, fig
    assert (d / "generations.csv").exists()


def test_accuracy_table(smoke_reports):
    d = report_dir(smoke_reports, NB)
    meta = json.loads((d / "meta.json").read_text())
    acc = pd.read_csv(d / "accuracy.csv")
    tasks = ["niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "qa"]
    assert list(acc.columns) == ["method", "budget_pct", *tasks, "average"]
    expected = {("full", 100.0)} | {("shadowkv", round(100 * b, 2)) for b in meta["preset"]["budgets"]} | {
        (m, round(100 * b, 2)) for b in meta["preset"]["baseline_budgets"] for m in ("streaming", "quest", "snapkv")}
    assert set(zip(acc.method, acc.budget_pct)) == expected
    vals = acc[tasks + ["average"]].to_numpy()
    assert np.isfinite(vals).all() and (vals >= 0).all() and (vals <= 100).all()
    # the needle tasks are within reach of full attention at the smoke length
    full = acc[acc.method == "full"].iloc[0]
    assert full[["niah_single", "niah_multikey"]].mean() > 0
    gens = pd.read_csv(d / "generations.csv")
    assert len(gens) == len(expected) * len(tasks) * meta["preset"]["samples_per_task"] * len(meta["preset"]["contexts"])
    sk = gens[gens.method == "shadowkv"]
    assert ((sk.hit_rate >= 0) & (sk.hit_rate <= 1)).all() and (sk.attended_tokens < sk.context).all()


def test_rank_kernel_and_selection_evidence(smoke_reports):
    d = report_dir(smoke_reports, NB)
    r = pd.read_csv(d / "rank_error.csv")
    pre = r["pre-RoPE keys (mean)"].to_numpy()
    assert (np.diff(pre) <= 1e-6).all() and pre[-1] < 1e-5 and pre[0] > 0.05
    assert (r["pre-RoPE keys (mean)"] <= r["post-RoPE keys (mean)"] + 1e-6).all()
    k = pd.read_csv(d / "kernel_check.csv")
    assert k.same_nan.all() and (k.max_rel < 1e-4).all()
    m = pd.read_csv(d / "attention_mass.csv")
    assert len(m) == 30 and (m.shadowkv <= 1 + 1e-6).all() and m.shadowkv.mean() > m.attended.mean()
    claims = pd.read_csv(d / "paper_vs_ours.csv")
    assert len(claims) == 4 and claims.setting_difference.notna().all()
