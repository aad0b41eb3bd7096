"Checks on what the ShadowKV throughput notebook's smoke run wrote."
import json
import numpy as np
import pandas as pd
from conftest import report_dir

NB = "51_shadowkv_throughput"


def test_meta_and_files(smoke_reports):
    d = report_dir(smoke_reports, NB)
    meta = json.loads((d / "meta.json").read_text())
    assert meta["preset"]["name"] == "smoke" and meta["wall_s"] > 0
    for name in ("bandwidths", "memory_model", "pinned_rounding", "throughput", "headline", "fp8_accuracy", "paper_vs_ours"):
        assert (d / f"{name}.csv").exists() and (d / f"{name}.md").exists(), name
    assert (d / "throughput_vs_batch.png").stat().st_size > 5000
    assert 0 <= meta["fp8_same_predictions"] <= 1


def test_throughput_rows(smoke_reports):
    d = report_dir(smoke_reports, NB)
    meta = json.loads((d / "meta.json").read_text())
    t = pd.read_csv(d / "throughput.csv")
    ok = t[t.status == "ok"]
    assert set(ok.context) == set(meta["preset"]["contexts"])
    assert {"full", "ShadowKV", "ShadowKV fp8"} <= set(ok.method)
    assert np.isfinite(ok.tok_s).all() and (ok.tok_s > 0).all() and (ok.ms_per_step > 0).all()
    skv = ok[ok.method.str.startswith("ShadowKV")]
    assert skv.hit_rate.between(0, 1).all()
    # fp8 values hold half the host bytes of bf16/fp32 ones at the same context (1 byte per value vs 2 or 4)
    for S, g in skv.groupby("context"):
        bf, f8 = g[g.method == "ShadowKV"].host_GB_per_seq.iloc[0], g[g.method == "ShadowKV fp8"].host_GB_per_seq.iloc[0]
        assert f8 < bf and f8 > 0
    assert set(ok.inputs) == {"random", "repeat"}


def test_memory_model_and_caps(smoke_reports):
    d = report_dir(smoke_reports, NB)
    m = pd.read_csv(d / "memory_model.csv")
    assert (m.cap <= m.gpu_cap).all() and (m.cap <= m.host_cap).all() and (m.cap >= 0).all()
    full = m[m.method == "full attention"].set_index("context")
    skv = m[m.method == "ShadowKV"].set_index("context")
    assert (skv.gpu_GB_per_seq < full.gpu_GB_per_seq).all()          # the point of ShadowKV: less GPU memory per sequence
    r = pd.read_csv(d / "pinned_rounding.csv")
    assert (r.host_cap_pow2_rounded <= r.host_cap_exact).all()


def test_fp8_accuracy_table(smoke_reports):
    d = report_dir(smoke_reports, NB)
    acc = pd.read_csv(d / "fp8_accuracy.csv")
    assert set(acc.method) == {"full", "ShadowKV", "ShadowKV fp8"}
    assert acc.average.between(0, 100).all()
    pvo = pd.read_csv(d / "paper_vs_ours.csv")
    assert list(pvo.columns) == ["claim", "paper", "ours", "setting_difference"] and len(pvo) >= 5
