"Checks on what the 20_retrieval_heads smoke run wrote."
import json
import numpy as np
import pandas as pd
from conftest import report_dir

NB = "20_retrieval_heads"
TASKS = ["mdqa", "musique", "summhay"]


def test_meta_and_files(smoke_reports):
    d = report_dir(smoke_reports, NB)
    meta = json.loads((d / "meta.json").read_text())
    assert meta["preset"]["name"] == "smoke" and meta["wall_s"] > 0 and meta["tokens_per_variant"] > 0
    for fig in ("head_scores_base", "niah_masking", "train_loss", "head_scores_variants", "similarity_vs_f1", "task_masking", "patching"):
        assert (d / f"{fig}.png").stat().st_size > 1000, fig


def test_head_score_json_has_every_head_in_the_original_format(smoke_reports):
    d = report_dir(smoke_reports, NB)
    scores = json.loads((d / "head_scores_base.json").read_text())
    assert len(scores) == 30 * 9 and set(scores) == {f"{l}-{h}" for l in range(30) for h in range(9)}
    lengths = {len(v) for v in scores.values()}
    assert len(lengths) == 1  # one entry per counted trial, for every head
    assert all(0.0 <= x <= 1.0 + 1e-9 for v in scores.values() for x in v)
    top = pd.read_csv(d / "top_heads.csv")
    assert len(top) == 20 and top.score.is_monotonic_decreasing and (top.layer.between(0, 29)).all()
    if lengths != {0}:
        mean = {k: np.mean(v) for k, v in scores.items()}
        assert abs(max(mean.values()) - top.score.iloc[0]) < 1e-6


def test_detection_trials_and_masking(smoke_reports):
    d = report_dir(smoke_reports, NB)
    trials = pd.read_csv(d / "niah_trials.csv")
    assert len(trials) >= 1 and trials.recall.between(0, 1).all() and set(trials.haystack) <= {"austen", "aclsum"}
    assert (trials.prompt_tokens == trials.context_len).mean() > 0.5
    m = pd.read_csv(d / "niah_masking.csv")
    assert set(m.mask_mode) == {"none", "uniform", "zero"} and set(m.heads) == {"none", "top", "random"}
    assert m.recall.between(0, 1).all()


def test_tables_of_the_fine_tuning_experiment(smoke_reports):
    d = report_dir(smoke_reports, NB)
    f1 = pd.read_csv(d / "f1.csv")
    assert f1.variant.iloc[0] == "base" and "real" in set(f1.variant) and len(f1) >= 3
    assert ((f1[TASKS] >= 0) & (f1[TASKS] <= 1)).all().all() and np.isfinite(f1[TASKS].to_numpy()).all()
    heads = pd.read_csv(d / "heads_per_variant.csv")
    assert list(heads.variant) == list(f1.variant)
    real = heads.set_index("variant").loc["real"]
    assert real.recall_of_real_heads == 1.0 or real.retrieval_heads == 0
    assert heads.retrieval_heads.between(0, 270).all() and heads.common_with_real.le(heads.retrieval_heads).all()
    log = pd.read_csv(d / "train_log.csv")
    assert set(log.variant) == set(f1.variant) - {"base"} and np.isfinite(log.last_loss).all() and (log.last_loss > 0).all()
    data = pd.read_csv(d / "data.csv")
    assert set(data.task) == set(TASKS) and (data.mean_answer_tokens > 0).all()
    tm = pd.read_csv(d / "task_masking.csv")
    assert set(tm.heads) == {"none", "top", "random"} and ((tm[TASKS] >= 0) & (tm[TASKS] <= 1)).all().all()
    patch = pd.read_csv(d / "patching.csv")
    assert len(patch) >= 1 and (patch.intersection_heads >= 0).all()
    corr = pd.read_csv(d / "correlations.csv")
    assert set(corr.similarity) == {"cosine_with_real", "recall_of_real_heads"}
    assert corr.pearson_r.dropna().between(-1 - 1e-9, 1 + 1e-9).all()


def test_paper_vs_ours(smoke_reports):
    pvo = pd.read_csv(report_dir(smoke_reports, NB) / "paper_vs_ours.csv")
    assert len(pvo) == 7 and pvo.ours.notna().all() and pvo.setting_difference.str.len().gt(10).all()
    assert pvo.paper.str.contains("0.83").any() and pvo.paper.str.contains("0.81").any()
