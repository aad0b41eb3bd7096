"Checks on what the smoke reproduction wrote for the foundation notebooks."
import json
import numpy as np
import pandas as pd
from conftest import report_dir


def test_every_report_has_meta(smoke_reports):
    for nb in ("00_core", "01_data", "02_models"):
        meta = json.loads((report_dir(smoke_reports, nb) / "meta.json").read_text())
        assert meta["versions"]["torch"] and meta["device"] and meta["preset"]["name"] == "smoke" and meta["wall_s"] is not None
    assert "02_models/smoke" in (smoke_reports / "README.md").read_text()


def test_corpora_table(smoke_reports):
    t = pd.read_csv(report_dir(smoke_reports, "01_data") / "corpora.csv")
    assert set(t.corpus) == {"austen", "aclsum", "stdlib"} and len(t) == 9
    assert (t.docs > 0).all() and (t.tokens > 1000).all()
    assert t.set_index(["corpus", "split"]).loc[("aclsum", "train"), "docs"] == 100


def test_ppl_by_position_is_sane(smoke_reports):
    d = report_dir(smoke_reports, "02_models")
    t = pd.read_csv(d / "ppl_by_position.csv")
    assert t.positions.tolist() == ["0k-1k", "1k-2k", "2k-4k", "4k-8k"]
    assert np.isfinite(t.ppl).all() and (t.ppl > 2).all() and (t.ppl < 200).all()
    assert (d / "ppl_by_position.png").stat().st_size > 1000
    hook = pd.read_csv(d / "attention_hook_check.csv")
    assert (hook.max_abs_diff < 1e-4).all()
