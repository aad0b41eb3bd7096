"Bad inputs and behaviour of the shared mechanics (core, data, models)."
import json, os, time
from pathlib import Path
from dataclasses import dataclass
import numpy as np
import pandas as pd
import pytest
import torch

from longctx_nb.core import Preset, choose_preset, resolve_config, save_report, paper_vs_ours, build_reports_index, run_meta, list_notebooks, find_repo_root
from longctx_nb.data import load_corpus, token_windows, packed_batches, Document, split_of
from longctx_nb.models import (load_causal_lm, resolve_model_path, set_attention_hook, attention_hook, eager_attention,
                               attention_modules, token_nll, train_lm, attention_mask_to_additive, head_dim, rotate_half,
                               apply_rope, rope_tables, set_rope_scaling)


@dataclass(frozen=True)
class P(Preset):
    n: int = 1

PRESETS = [P("smoke", n=1), P("full", needs_gpu=True, n=2)]


def test_auto_preset_follows_the_hardware():
    assert choose_preset(PRESETS, "auto").name == ("full" if torch.cuda.is_available() else "smoke")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_gpu_preset_without_gpu_says_what_to_do(monkeypatch):
    monkeypatch.delenv("LONGCTX_ALLOW_CPU_FULL", raising=False)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU.*config='smoke'"):
        choose_preset(PRESETS, "full")
    monkeypatch.setenv("LONGCTX_ALLOW_CPU_FULL", "1")
    assert choose_preset(PRESETS, "full").n == 2


def test_unknown_config_is_a_value_error():
    with pytest.raises(ValueError, match="config must be one of"):
        resolve_config("medium")
    with pytest.raises(ValueError, match="unknown preset"):
        choose_preset(PRESETS, "medium")


def test_save_report_is_atomic(tmp_path):
    out = tmp_path / "nb" / "smoke"
    save_report(out, tables={"t": pd.DataFrame({"x": [1.0]})}, meta={"a": 1})
    with pytest.raises(TypeError, match="must be a pandas DataFrame"):
        save_report(out, tables={"t": pd.DataFrame({"x": [2.0]}), "bad": [1, 2]}, meta={"a": 2})
    assert json.loads((out / "meta.json").read_text()) == {"a": 1}          # the good report survived
    assert pd.read_csv(out / "t.csv").x.tolist() == [1.0]
    assert sorted(p.name for p in (tmp_path / "nb").iterdir()) == ["smoke"]  # no temp folders left behind
    assert save_report(None, tables={"t": pd.DataFrame()}) is None


def test_paper_vs_ours_needs_every_column(tmp_path):
    with pytest.raises(ValueError, match="lacks"):
        paper_vs_ours([dict(claim="x", paper=1)])
    claims = paper_vs_ours([dict(claim="speedup", paper=11, ours=3.2, setting_difference="H100 vs A100")])
    save_report(tmp_path / "10_x" / "full", claims=claims, meta=run_meta(P("full"), 1.0))
    index = build_reports_index(tmp_path).read_text()
    assert "10_x/full" in index and "H100 vs A100" in index


def test_list_notebooks_rejects_unknown_names():
    with pytest.raises(ValueError, match="no notebook matches"):
        list_notebooks(find_repo_root() / "nbs", ["99_missing"])


def test_unknown_corpus_lists_known_ones():
    with pytest.raises(ValueError, match="offline corpora.*austen"):
        load_corpus("wikitext")
    with pytest.raises(ValueError, match="split must be one of"):
        load_corpus("austen", "dev")


def test_hub_corpus_offline_names_the_default(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match=r"offline default load_corpus\('austen'\)"):
        load_corpus("pg19")
    with pytest.raises(RuntimeError, match="aclsum"):
        load_corpus("ccdv/arxiv-summarization")


def test_corpus_package_missing_says_how_to_install(monkeypatch):
    import builtins, importlib
    real = importlib.import_module
    def fake(name, *a, **k):
        if name == "aclsum": raise ImportError("no aclsum")
        return real(name, *a, **k)
    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(ImportError, match="requirements-assets.txt"):
        load_corpus("aclsum", "test")


def test_splits_are_disjoint_and_deterministic():
    a = {d.id for d in load_corpus("austen", "train")}; b = {d.id for d in load_corpus("austen", "test")}
    assert a and b and not a & b
    assert split_of("os.py") == split_of("os.py")
    tr = {d.id for d in load_corpus("stdlib", "train")}; te = {d.id for d in load_corpus("stdlib", "test")}
    assert tr and te and not tr & te


class CharTok:
    "A tokenizer over characters (enough for the window helpers)."
    eos_token_id = 0
    def __call__(self, text, add_special_tokens=False): return {"input_ids": [ord(c) % 100 + 1 for c in text]}


def test_token_windows_stay_inside_one_document():
    docs = [Document("a", "x" * 50), Document("b", "y" * 500)]
    w = token_windows(docs, CharTok(), seq_len=100, n=5, seed=1)
    assert w.shape == (5, 100) and (w == ord("y") % 100 + 1).all()
    with pytest.raises(ValueError, match="no document has 1000 tokens"):
        token_windows(docs, CharTok(), seq_len=1000, n=1)
    b = next(packed_batches(docs, CharTok(), seq_len=64, batch_size=3))
    assert b.shape == (3, 64)


def test_unknown_model_and_offline_hub_id(monkeypatch):
    with pytest.raises(ValueError, match="not an embedded name"):
        resolve_model_path("gpt-17")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="offline.*smollm2-135m"):
        resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_hook_with_reference_attention_matches_eager(tiny_llama):
    ids = torch.randint(0, 128, (2, 37)); am = torch.ones_like(ids); am[1, :5] = 0
    tiny_llama.set_attn_implementation("eager")
    with torch.no_grad(): ref = tiny_llama(ids, attention_mask=am).logits
    with attention_hook(tiny_llama, eager_attention), torch.no_grad(): got = tiny_llama(ids, attention_mask=am).logits
    assert tiny_llama.config._attn_implementation == "eager"              # restored
    assert all(getattr(m, "longctx_attention", None) is None for m in attention_modules(tiny_llama))
    torch.testing.assert_close(got[am.bool()], ref[am.bool()], atol=1e-5, rtol=1e-5)


def test_hook_only_on_chosen_layers(tiny_llama):
    calls = []
    def spy(module, *a, **k):
        calls.append(module.layer_idx); return eager_attention(module, *a, **k)
    with attention_hook(tiny_llama, spy, layers=[1]), torch.no_grad(): tiny_llama(torch.randint(0, 128, (1, 9)))
    assert calls == [1]
    with pytest.raises(ValueError, match="out of range"):
        set_attention_hook(tiny_llama, spy, layers=[5])


def test_capturable_mask_equals_sdpa_mask_eagerly_and_stays_implicit_while_capturing(tiny_llama, monkeypatch):
    """The 'longctx' mask function is transformers' `sdpa_mask` wherever no graph is captured; while one is (transformers' is_tracing),
    `sdpa_mask` materializes the plain causal mask and ours keeps it None (SDPA's is_causal), but still builds every padded mask."""
    import transformers.masking_utils as mu
    from longctx_nb.models import capturable_sdpa_mask
    pad = torch.ones(2, 6, dtype=torch.bool); pad[1, :2] = False
    cases = [dict(q_length=6, kv_length=6), dict(q_length=1, kv_length=9, q_offset=8), dict(q_length=3, kv_length=9, q_offset=6),
             dict(q_length=6, kv_length=6, attention_mask=pad), dict(q_length=6, kv_length=6, allow_is_causal_skip=False)]
    def same(a, b): return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
    for c in cases:
        assert same(capturable_sdpa_mask(batch_size=2, **c), mu.sdpa_mask(batch_size=2, **c)), c
    monkeypatch.setattr(mu, "is_tracing", lambda *a, **k: True)        # what transformers sees while a CUDA graph is captured
    assert mu.sdpa_mask(batch_size=2, q_length=6, kv_length=6) is not None
    assert capturable_sdpa_mask(batch_size=2, q_length=6, kv_length=6) is None
    assert capturable_sdpa_mask(batch_size=2, q_length=1, kv_length=9, q_offset=8) is None
    for c in cases[2:]:                                                 # a chunk after a cache, padding, no skip asked: built as before
        got = capturable_sdpa_mask(batch_size=2, **c)
        assert got is not None and same(got, mu.sdpa_mask(batch_size=2, **c)), c
    from longctx_nb.models import rows_unpacked
    def masks(**kw):                                                    # through a model, every layer's hook, under "capture"
        seen = []
        def spy(module, q, k, v, mask, **a):
            seen.append(mask); return eager_attention(module, q, k, v, mask, **a)
        with attention_hook(tiny_llama, spy), torch.no_grad(): tiny_llama(torch.randint(0, 128, (1, 7)), **kw)
        assert len(seen) == tiny_llama.config.num_hidden_layers; return seen
    assert all(m is None for m in masks())                              # with a cache: no packing to guess
    assert all(m is not None for m in masks(use_cache=False))           # without: transformers assumes packed rows, a full mask
    with rows_unpacked(): assert all(m is None for m in masks(use_cache=False))
    assert all(m is not None for m in masks(use_cache=False))           # restored on exit


@pytest.mark.gpu
def test_captured_forward_on_the_longctx_implementation_sees_no_mask_and_equals_eager(tiny_llama):
    "On CUDA: a CUDA graph of a plain causal forward on 'longctx' inside rows_unpacked gets the mask None (as eagerly); its replay equals eager."
    from longctx_nb.core import capture_graph
    from longctx_nb.models import rows_unpacked
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    m = tiny_llama.cuda(); ids = torch.randint(0, 128, (2, 37), device="cuda"); seen, out = [], {}
    def spy(module, q, k, v, mask, **kw):
        seen.append(mask is None and torch.cuda.is_current_stream_capturing()); return sdpa_attention_forward(module, q, k, v, mask, **kw)
    with attention_hook(m, spy), torch.no_grad():
        eager = m.model(input_ids=ids, use_cache=False).last_hidden_state.clone()
        step = lambda: out.__setitem__("h", m.model(input_ids=ids, use_cache=False).last_hidden_state)
        with rows_unpacked(): graph = capture_graph(step, "cuda", warmup=2)
        graph.replay(); torch.cuda.synchronize()
    assert seen.count(True) == m.config.num_hidden_layers             # every layer of the captured forward: no mask tensor
    torch.testing.assert_close(out["h"], eager)


def test_unsupported_model_layout_is_named():
    with pytest.raises(TypeError, match="supported attention layout"):
        set_attention_hook(torch.nn.Linear(2, 2), eager_attention)


def test_none_mask_means_causal():
    m = attention_mask_to_additive(None, 3, 5)
    assert m.shape == (1, 1, 3, 5) and (m[0, 0, 0, :3] == 0).all() and m[0, 0, 0, 3] < -1e30 and (m[0, 0, 2] == 0).all()


def test_token_nll_matches_model_loss(tiny_llama):
    ids = torch.randint(0, 128, (2, 50))
    nll = token_nll(tiny_llama, ids, chunk=7)
    with torch.no_grad(): loss = tiny_llama(ids, labels=ids).loss
    assert nll.shape == (2, 49) and abs(nll.mean().item() - loss.item()) < 1e-4
    with pytest.raises(ValueError, match="length>=2"):
        token_nll(tiny_llama, ids[:, :1])


# ------------------------------------------------------------------ RoPE
def test_head_dim_from_config(tiny_llama):
    from types import SimpleNamespace
    assert head_dim(tiny_llama.config) == 16 and head_dim(SimpleNamespace(head_dim=32, hidden_size=64, num_attention_heads=4)) == 32
    assert head_dim(SimpleNamespace(hidden_size=64, num_attention_heads=4)) == 16
    with pytest.raises(TypeError, match="num_attention_heads"):
        head_dim(object())


def test_apply_rope_matches_transformers(tiny_llama):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    x = torch.randn(2, 4, 13, 16)
    assert torch.equal(rotate_half(rotate_half(x)), -x)
    cos, sin = rope_tables(tiny_llama.model.rotary_emb, 13, "cpu")
    assert cos.shape == (13, 16) and cos.dtype == torch.float32 and torch.equal(cos[0], torch.ones(16))
    q_hf, k_hf = apply_rotary_pos_emb(x, x.flip(1), cos[None], sin[None])
    torch.testing.assert_close(apply_rope(x, cos, sin), q_hf)
    torch.testing.assert_close(apply_rope(x.flip(1), cos, sin), k_hf)


def test_set_rope_scaling_in_place_round_trip(tiny_llama):
    ids = torch.randint(0, 128, (1, 30)); base = tiny_llama.model.rotary_emb.inv_freq.clone(); ref = token_nll(tiny_llama, ids)
    assert set_rope_scaling(tiny_llama, "linear", 2.0) is tiny_llama
    assert torch.allclose(tiny_llama.model.rotary_emb.inv_freq, base / 2) and tiny_llama.config.max_position_embeddings == 1024
    set_rope_scaling(tiny_llama, "yarn", 4.0)   # the pretrained window is remembered: x4 of 512, not of 1024
    assert tiny_llama.config.max_position_embeddings == 2048 and tiny_llama.config.rope_parameters["original_max_position_embeddings"] == 512
    assert tiny_llama.model.rotary_emb.attention_scaling > 1 and not torch.allclose(token_nll(tiny_llama, ids), ref)
    set_rope_scaling(tiny_llama, "default")
    assert torch.equal(tiny_llama.model.rotary_emb.inv_freq, base) and torch.allclose(token_nll(tiny_llama, ids), ref, atol=1e-6)


def test_set_rope_scaling_copy_leaves_the_model_alone(tiny_llama):
    base = tiny_llama.model.rotary_emb.inv_freq.clone()
    pi = set_rope_scaling(tiny_llama, "linear", 4.0, inplace=False)
    assert pi is not tiny_llama and torch.allclose(pi.model.rotary_emb.inv_freq, base / 4)
    assert torch.equal(tiny_llama.model.rotary_emb.inv_freq, base) and tiny_llama.config.rope_parameters["rope_type"] == "default"
    assert tiny_llama.config.max_position_embeddings == 512 and pi.config.max_position_embeddings == 2048


def test_set_rope_scaling_bad_inputs(tiny_llama):
    with pytest.raises(ValueError, match="rope_type must be one of"):
        set_rope_scaling(tiny_llama, "ntk", 2.0)
    with pytest.raises(ValueError, match="factor must be >= 1"):
        set_rope_scaling(tiny_llama, "yarn", 0.5)
    with pytest.raises(TypeError, match="rotary_emb"):
        set_rope_scaling(torch.nn.Linear(2, 2), "yarn", 2.0)


def test_train_lm_freezes_what_it_should(tiny_llama):
    batches = (torch.randint(0, 128, (2, 16)) for _ in range(10))
    before = {n: p.detach().clone() for n, p in tiny_llama.named_parameters()}
    hist = train_lm(tiny_llama, batches, steps=2, lr=1e-3, trainable=lambda n: "q_proj" in n, progress=False)
    assert len(hist) == 2 and np.isfinite([h["loss"] for h in hist]).all()
    changed = {n for n, p in tiny_llama.named_parameters() if not torch.equal(p.detach().cpu(), before[n])}   # accelerate may move it to the GPU
    assert changed and all("q_proj" in n for n in changed)
    with pytest.raises(ValueError, match="matched nothing"):
        train_lm(tiny_llama, batches, steps=1, trainable=lambda n: False, progress=False)


def test_sentence_encoder_and_spacy_load_offline():
    from longctx_nb.models import load_sentence_encoder, load_spacy
    emb = load_sentence_encoder("cpu").encode(["A cat sat on the mat.", "A cat was sitting on a mat.", "Stock prices fell."],
                                              normalize_embeddings=True)
    assert emb.shape == (3, 384) and emb[0] @ emb[1] > emb[0] @ emb[2] + 0.3
    doc = load_spacy()("Transformers attend to every token. Long contexts make this quadratic.")
    assert len(list(doc.sents)) == 2 and any(t.pos_ == "VERB" for t in doc)


def test_run_notebook_copies_the_executed_notebook_only_beside_a_report_it_wrote(tmp_path, monkeypatch):
    """A run that writes its report's meta.json gets its executed notebook beside it; a run that writes none there (one part of a
    preset split into parts) leaves the committed report's notebook as it was."""
    import papermill
    from longctx_nb import core
    nb = tmp_path / "nbs" / "77_demo.ipynb"; nb.parent.mkdir(); nb.write_text("{}")
    report = tmp_path / "reports" / "77_demo" / "full"; report.mkdir(parents=True)
    (report / "notebook.ipynb").write_text("the committed run"); (report / "meta.json").write_text("{}")
    old = time.time() - 3600; os.utime(report / "meta.json", (old, old))
    writes_report = {"on": False}
    def fake_execute(src, dst, parameters=None, **kw):
        Path(dst).write_text(f"executed with {sorted(parameters)}")
        if writes_report["on"]: (Path(parameters["out_dir"]) / "meta.json").write_text("{}")
    monkeypatch.setattr(papermill, "execute_notebook", fake_execute)
    core.run_notebook(nb, "full", tmp_path / "reports", tmp_path / "work", parameters={"part": "speed"})
    assert (report / "notebook.ipynb").read_text() == "the committed run"
    assert (tmp_path / "work" / "77_demo-full.ipynb").read_text().startswith("executed")       # kept where the run put it
    writes_report["on"] = True
    core.run_notebook(nb, "full", tmp_path / "reports", tmp_path / "work")
    assert (report / "notebook.ipynb").read_text().startswith("executed")
