"Checks on what the 11_tensorized_models smoke run wrote."
import json
import numpy as np
import pandas as pd
from conftest import report_dir

MODELS = ["SmolLM2 (untouched)", "SmolLM2 + PI x4", "SmolLM2 + YaRN x4", "full attention, CPT", "tensorized, zero-shot", "tensorized, CPT"]


def test_tensorized_models_smoke_reports(smoke_reports):
    d = report_dir(smoke_reports, "11_tensorized_models")
    meta = json.loads((d / "meta.json").read_text())
    assert meta["preset"]["name"] == "smoke" and meta["wall_s"] > 0 and meta["layout"]["grow"] == "outer"
    lengths = meta["preset"]["eval_lengths"]
    for name in ("perplexity", "forward_ms"):
        t = pd.read_csv(d / f"{name}.csv").set_index("model")
        assert list(t.index) == MODELS and [int(c) for c in t.columns] == lengths
        vals = t.to_numpy(dtype=float)
        assert np.isfinite(vals).all() and (vals > (1 if name == "perplexity" else 0)).all()
    ppl = pd.read_csv(d / "perplexity.csv").set_index("model")
    assert (ppl.to_numpy() < 1e5).all()                                   # a broken model gives ~vocab size (49152) or inf
    res = pd.read_csv(d / "results.csv")
    assert len(res) == len(MODELS) * len(lengths) and (res.tokens > 0).all()
    train = pd.read_csv(d / "training.csv")
    assert list(train.model) == ["full attention, CPT", "tensorized, CPT"] and np.isfinite(train[["first_loss", "last_loss"]].to_numpy()).all()
    assert (pd.read_csv(d / "rope_checks.csv").max_abs_err < 1e-10).all()
    integ = pd.read_csv(d / "integration_checks.csv").set_index("check").value
    assert integ.iloc[0] < 1e-3 and integ.iloc[1] == 0 and integ.iloc[2] < 1e-4 and integ.iloc[3] == 1
    pvo = pd.read_csv(d / "paper_vs_ours.csv")
    assert list(pvo.columns) == ["claim", "paper", "ours", "setting_difference"] and len(pvo) == 4
    assert pvo.paper.iloc[0] == 4 and pvo.paper.iloc[2] == 11 and np.isfinite(pvo.ours.to_numpy(dtype=float)).all()
    assert (pvo.ours.iloc[:2] >= 1).all() and (d / "perplexity_vs_length.png").stat().st_size > 1000
