"Checks on what the 10_tensorized_attention smoke run wrote."
import json
import numpy as np
import pandas as pd
from conftest import report_dir


def test_tensorized_smoke_reports(smoke_reports):
    d = report_dir(smoke_reports, "10_tensorized_attention")
    meta = json.loads((d / "meta.json").read_text())
    assert meta["preset"]["name"] == "smoke" and meta["wall_s"] > 0
    sweep = pd.read_csv(d / "correctness_sweep.csv")
    assert len(sweep) == 4 and not sweep.nan.any()
    errs = sweep[["o", "dq", "dk", "dv"]].to_numpy()
    assert np.isfinite(errs).all() and (errs < 1e-4).all()
    checks = pd.read_csv(d / "formulation_checks.csv").set_index("check")
    assert (checks.max_abs_err < 1e-5).all() and checks.loc["causality: max |grad| to future positions", "max_abs_err"] == 0.0
    bench = pd.read_csv(d / "benchmark.csv")
    assert len(bench) >= 2 and np.isfinite(bench[["ours_ms", "sdpa_ms", "speedup"]].to_numpy()).all() and (bench.ours_ms > 0).all()
    pvo = pd.read_csv(d / "paper_vs_ours.csv")
    assert list(pvo.columns) == ["claim", "paper", "ours", "setting_difference"] and len(pvo) == 2 and pvo.paper.iloc[0] == 11
    assert (d / "benchmark.png").stat().st_size > 1000 and (d / "support_4x4x4.png").stat().st_size > 1000
