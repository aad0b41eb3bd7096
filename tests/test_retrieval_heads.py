import contextlib
"Retrieval heads (20_retrieval_heads): metrics, token alignment, the hook, detection backends, masking, patching, data, training."
import json
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import longctx_nb.core  # noqa: F401  (TRITON_INTERPRET before anything imports triton)
from longctx_nb.data import Document
from longctx_nb.models import attention_hook, eager_attention, load_tokenizer
from longctx_nb.evals import (Needle, Prompt, TaskSample, build_niah_prompt, first_line, line_stop_ids, score, chat_prompt, citation_f1, insert_at_sentences, pearson, rouge,
                              token_f1, token_span)
from longctx_nb.retrieval_heads import (
    HeadHook, TASKS, VARIANTS, answer_loss, attention_only, attention_state, cosine, decode_batch, detect_retrieval_heads,
    encode_example, encode_examples, finetune_attention, evaluate_heads, head_set_relations, last_query_argmax, load_attention_state,
    make_examples, probe_samples, random_heads, rank_heads, retrieval_heads, sentence_pool, subsequence_span, task_batches, task_probe, top_heads)
from conftest import tiny_llama_config


class TinyTok:
    "A stand-in tokenizer for the random tiny Llama: token i reads 't<i>', token 1 ends a turn, token 0 pads."
    eos_token_id, pad_token_id = 1, 0
    def get_vocab(self): return {f"t{i}": i for i in range(128)}
    def convert_tokens_to_ids(self, t): return self.get_vocab().get(t)
    def decode(self, ids, skip_special_tokens=False): return " ".join(f"t{int(i)}" for i in ids)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("smollm2-135m")


def random_prompts(n, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        L = lengths[i % len(lengths)]
        ids = torch.randint(2, 128, (L,), generator=g).tolist()
        out.append(Prompt(ids, (1, L - 1), "t5", dict(i=i)))
    return out


# ---------------------------------------------------------------- metrics

@pytest.mark.parametrize("ref,pred", [
    ("ride the old yellow tram up to the castle at sunset", "The best thing is to ride the old yellow tram up to the castle at sunset."),
    ("a spoonful of smoked paprika", "smoked paprika, smoked!"), ("at sunset", "<|im_end|>"), ("The the THE cat", "the cat the"),
    ("Espresso in the evening", "espresso-in-the-evening 2024"), ("", "anything")])
def test_detection_recall_is_rouge_score_without_stemming(ref, pred):
    from rouge_score import rouge_scorer
    want = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False).score(ref, pred)["rouge1"].recall
    assert rouge(ref, pred) == pytest.approx(want, abs=1e-12)


def test_f1_metrics():
    assert token_f1("The copper lanterns.", "copper lanterns") == 1.0
    assert token_f1("copper", ["glass bells", "copper lanterns"]) == pytest.approx(2 / 3)
    assert token_f1("", "x") == 0.0
    assert citation_f1("[2] [5]", [2, 5, 7]) == pytest.approx(0.8)
    assert citation_f1("none", [1]) == 0.0 and citation_f1("Documents [3], [1]", [1, 3]) == 1.0


# ---------------------------------------------------------------- prompts and token alignment

def test_needle_answer_must_be_a_span():
    with pytest.raises(ValueError, match="must be a span"):
        Needle("The sky is green.", "What colour is the sky?", "blue")


def test_needle_split_differently_in_context_is_aligned_by_offsets(tok):
    needle = Needle("The museum guard hides the spare keys in the copper lanterns by the gate.", "Where?", "copper lanterns by the gate")
    hay = tok(("It was a quiet morning in the village. " * 40), add_special_tokens=False)["input_ids"]
    for depth in (0.0, 0.5, 1.0):
        p = build_niah_prompt(tok, hay, needle, context_len=200, depth=depth)
        assert tok.decode(p.ids[p.span[0]:p.span[1]]).strip() == needle.answer
        alone = tok(needle.answer, add_special_tokens=False)["input_ids"]
        assert subsequence_span(p.ids, alone) == (-1, -1)  # the naive alignment misses it: 'cop' 'per' vs 'Ġcopper'
        assert abs(len(p.ids) - 200) < 12


def test_token_span_and_needle_insertion():
    offsets = [(0, 3), (3, 7), (7, 8), (0, 0), (8, 12)]
    assert token_span(offsets, 4, 9) == (1, 5) and token_span(offsets, 0, 1) == (0, 1)
    with pytest.raises(ValueError, match="no token covers"):
        token_span(offsets, 20, 25)
    text = "One. Two two. Three three three."
    ins = lambda d: insert_at_sentences(text, ["N."], [d], snap="before")
    assert ins(0.0)[0].startswith("N. One.") and ins(1.0)[0].endswith("three. N. ")
    new, (at,) = ins(0.5)
    assert new[at:].startswith("N. Two") or new[at:].startswith("N. Three")
    with pytest.raises(ValueError, match="depths must be in"):
        ins(1.5)


def test_haystack_too_short_or_context_too_small(tok):
    n = Needle("A b c.", "Q?", "b c")
    with pytest.raises(ValueError, match="haystack has"):
        build_niah_prompt(tok, list(range(100, 150)), n, context_len=300, depth=0.5)
    with pytest.raises(ValueError, match="leaves"):
        build_niah_prompt(tok, list(range(100, 900)), n, context_len=40, depth=0.5)


# ---------------------------------------------------------------- the hook

class _Mod(torch.nn.Module):
    def __init__(self, layer_idx=0, groups=2):
        super().__init__(); self.layer_idx, self.num_key_value_groups, self.is_causal = layer_idx, groups, True


@pytest.mark.parametrize("B,H,Hkv,S,D", [(2, 4, 2, 37, 16), (1, 6, 3, 5, 8), (3, 4, 4, 64, 32)])
def test_last_query_argmax_matches_eager_weights_with_padding(B, H, Hkv, S, D):
    g = torch.Generator().manual_seed(B * S)
    q, k = torch.randn(B, H, 3, D, generator=g), torch.randn(B, Hkv, S, D, generator=g)
    mask = torch.ones(B, 1, 3, S, dtype=torch.bool)
    mask[0, :, :, : S // 3] = False  # left padding of row 0
    v = torch.randn(B, Hkv, S, D, generator=g)
    _, w = eager_attention(_Mod(groups=H // Hkv), q, k, v, mask, scaling=D ** -0.5)
    got = last_query_argmax(q, k, mask)
    assert torch.equal(got, w[:, :, -1].float().argmax(-1))
    assert (got[0] >= S // 3).all()  # never a padded position
    assert torch.equal(last_query_argmax(q, k, None), (q[:, :, -1:] @ torch.repeat_interleave(k, H // Hkv, 1).transpose(2, 3))[:, :, 0].argmax(-1))


def test_masking_semantics_and_patching_in_the_hook():
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, S, D = 2, 4, 2, 9, 8
    q, k, v = torch.randn(B, H, 1, D, generator=g), torch.randn(B, Hkv, S, D, generator=g), torch.randn(B, Hkv, S, D, generator=g)
    mod = _Mod(layer_idx=3, groups=2)
    plain, _ = HeadHook()(mod, q, k, v, None, scaling=D ** -0.5)
    uni, _ = HeadHook(mask=[(3, 1)], mask_mode="uniform")(mod, q, k, v, None, scaling=D ** -0.5)
    zero, _ = HeadHook(mask=[(3, 1)], mask_mode="zero")(mod, q, k, v, None, scaling=D ** -0.5)
    other_layer, _ = HeadHook(mask=[(2, 1)], mask_mode="zero")(mod, q, k, v, None, scaling=D ** -0.5)
    # head 1 uses kv head 0 (GQA, 2 query heads per kv head): uniform attention = mean of its values
    torch.testing.assert_close(uni[:, 0, 1], v[:, 0].mean(1), rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(zero[:, :, 1]) == 0 and torch.equal(other_layer, plain)
    keep = [0, 2, 3]
    torch.testing.assert_close(uni[:, :, keep], plain[:, :, keep]); torch.testing.assert_close(zero[:, :, keep], plain[:, :, keep])
    prefill = HeadHook(mask=[(3, 1)], mask_mode="zero"); prefill.phase = "prefill"
    q3 = torch.randn(B, H, 3, D, generator=g); full, _ = HeadHook()(mod, q3, k, v, None, scaling=D ** -0.5)
    pre, _ = prefill(mod, q3, k, v, None, scaling=D ** -0.5)      # a prefill masks only its last query (it predicts the answer)
    assert torch.equal(pre[:, :2], full[:, :2]) and torch.count_nonzero(pre[:, 2, 1]) == 0 and torch.equal(pre[:, 2, keep], full[:, 2, keep])
    donor = HeadHook(capture=[(3, 2)]); donor(mod, q, k, v, None, scaling=D ** -0.5)
    q2 = torch.randn(B, H, 1, D, generator=g)
    rec, _ = HeadHook(patch=[(3, 2)], patch_source=donor)(mod, q2, k, v, None, scaling=D ** -0.5)
    torch.testing.assert_close(rec[:, :, 2], plain[:, :, 2])
    with pytest.raises(ValueError, match="mask_mode must be one of"):
        HeadHook(mask_mode="drop")
    with pytest.raises(ValueError, match="patch_source"):
        HeadHook(patch=[(0, 0)])


# ---------------------------------------------------------------- decoding and detection on a tiny Llama

def test_left_padded_batch_decodes_like_single_prompts(tiny_llama):
    ps = random_prompts(3, [7, 12, 19])
    tt = TinyTok()
    batched = decode_batch(tiny_llama, tt, [p.ids for p in ps], 6)
    alone = [decode_batch(tiny_llama, tt, [p.ids], 6)[0] for p in ps]
    assert batched == alone
    ref = tiny_llama.generate(torch.tensor([ps[2].ids]), max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=1)
    assert alone[2] == ref[0, len(ps[2].ids):].tolist()[:len(alone[2])]
    with pytest.raises(ValueError, match="at least 2 tokens"):
        decode_batch(tiny_llama, tt, [[5]], 3)


def test_detection_backends_agree_and_match_a_loop(tiny_llama):
    tt = TinyTok()
    ps = random_prompts(4, [9, 16])
    det_hook = detect_retrieval_heads(tiny_llama, tt, ps, batch_size=3, max_new_tokens=8)
    tiny_llama.set_attn_implementation("eager")
    det_attn = detect_retrieval_heads(tiny_llama, tt, ps, batch_size=2, max_new_tokens=8, backend="attentions")
    np.testing.assert_allclose(det_hook.scores, det_attn.scores, atol=1e-12)
    assert det_hook.responses == det_attn.responses and det_hook.scores.sum() > 0  # random weights still copy sometimes
    # the same score by an explicit loop over steps, layers and heads, from the eager weights of each decode step
    p = ps[1]; steps = []
    def on_step(step, nxt, alive, argmax): steps.append((int(nxt[0]), bool(alive[0]), {l: a[0].clone() for l, a in argmax.items()}))
    decode_batch(tiny_llama, tt, [p.ids], 8, backend="attentions", on_step=on_step)
    want = np.zeros((2, 4)); s, e = p.span
    for token, alive, am in steps:
        for l in range(2):
            for h in range(4):
                i = int(am[l][h])
                if alive and s <= i < e and p.ids[i] == token: want[l, h] += 1 / (e - s)
    np.testing.assert_allclose(det_hook.scores[1], want, atol=1e-12)


def test_attention_weights_backend_needs_eager(tiny_llama):
    tiny_llama.set_attn_implementation("sdpa")
    with pytest.raises(RuntimeError, match="attn_implementation='eager'"):
        detect_retrieval_heads(tiny_llama, TinyTok(), random_prompts(1, [8]), max_new_tokens=2, backend="attentions")
    with pytest.raises(TypeError, match="backend='attentions'"):
        detect_retrieval_heads(torch.nn.Linear(2, 2), TinyTok(), random_prompts(1, [8]))


def test_detection_counts_only_retrieved_trials_and_writes_the_original_json():
    from longctx_nb.retrieval_heads import Detection
    scores = np.zeros((3, 2, 2)); scores[0, 1, 1], scores[1, 1, 1], scores[2, 0, 0] = 1.0, 0.5, 0.9
    d = Detection(scores, np.array([0.9, 0.6, 0.2]), ["a", "b", "c"], [{}, {}, {}])
    np.testing.assert_allclose(d.head_scores(), [[0, 0], [0, 0.75]])
    assert json.loads(d.to_json()) == {"0-0": [0.0, 0.0], "0-1": [0.0, 0.0], "1-0": [0.0, 0.0], "1-1": [1.0, 0.5]}
    assert retrieval_heads(d.head_scores()) == [(1, 1)]


class _DecodeMaskOnly(HeadHook):
    "The hook as it was at 721d4b8: no masking in a prefill (greedy_generate prefills all but the last prompt token, then decodes it)."
    def __call__(self, *args, **kwargs):
        if self.phase == "decode": return super().__call__(*args, **kwargs)
        mask, self.mask = self.mask, {}
        try: return super().__call__(*args, **kwargs)
        finally: self.mask = mask


def _old_path(model, tok, prompts, n, mask=(), mask_mode="uniform", donor=None, patch=()):
    "generate_answers before the suite: one padded batch through decode_batch with the old HeadHook as the model's attention."
    donor_hook = HeadHook(capture=patch) if patch else None
    hook = _DecodeMaskOnly(mask=mask, mask_mode=mask_mode, patch=patch, patch_source=donor_hook)
    with attention_hook(model, hook), (attention_hook(donor, donor_hook) if patch else contextlib.nullcontext()):
        return [first_line(tok, g) for g in decode_batch(model, tok, [p.ids for p in prompts], n, hook, donor=(donor, donor_hook) if patch else None)]


def test_masking_and_patching_through_evaluate_equal_the_old_path(tiny_llama):
    "evaluate decodes from full attention's cache; the heads' hook wrapped around the cache's attention must give the old answers."
    import copy
    tt = TinyTok(); ps = random_prompts(3, [10, 14, 12]); all_heads = [(l, h) for l in range(2) for h in range(4)]
    other = copy.deepcopy(tiny_llama)              # larger attention weights: heads that move the answers
    with torch.no_grad():
        for n, p_ in other.named_parameters():
            if attention_only(n): p_.add_(torch.randn_like(p_) * 0.5)
    def new(model, **kw): return evaluate_heads(model, tt, probe_samples(ps, 5), batch_size=3, **kw).sort_values("sample").prediction.tolist()
    for model in (tiny_llama, other):
        assert new(model) == _old_path(model, tt, ps, 5)
        assert new(model, mask=[], mask_mode="zero") == new(model) == new(model, donor=copy.deepcopy(model), patch=all_heads)
    for mode in ("uniform", "zero"):
        masked = new(other, mask=all_heads[:6], mask_mode=mode)
        assert masked == _old_path(other, tt, ps, 5, mask=all_heads[:6], mask_mode=mode) and masked != new(other), mode
    with pytest.raises(ValueError, match="different module"):
        new(tiny_llama, donor=tiny_llama, patch=all_heads)
    patched = new(tiny_llama, donor=other, patch=all_heads[:5])
    assert patched != new(tiny_llama) and patched == _old_path(tiny_llama, tt, ps, 5, donor=other, patch=all_heads[:5])


# ---------------------------------------------------------------- choosing heads

def test_head_choice_errors_and_random_heads_outside_the_top():
    s = np.arange(30, dtype=float).reshape(6, 5) / 30
    assert top_heads(s, 2) == [(5, 4), (5, 3)] and len(rank_heads(s)) == 30
    with pytest.raises(ValueError, match="K=31 heads asked for, but the model has 30 heads"):
        top_heads(s, 31)
    with pytest.raises(ValueError, match="K=-2"):
        random_heads(s, -2)
    with pytest.raises(TypeError, match="K must be an int"):
        top_heads(s, 2.5)
    excl = set(rank_heads(s)[:max(3, len(retrieval_heads(s)))])
    for seed in range(5):
        r = random_heads(s, 3, seed=seed)
        assert len(set(r)) == 3 and not set(r) & excl
    with pytest.raises(ValueError, match="outside the top"):
        random_heads(s, 5)  # 27 of 30 heads score > 0.1: only 3 lie outside


def test_similarity_helpers():
    rel = head_set_relations([(0, 1)], [(0, 1), (2, 2)])
    assert rel["is_subset"] and rel["recall"] == 0.5 and rel["subset_fraction"] == 1.0
    assert cosine([1, 0], [0, 0]) != cosine([1, 0], [0, 0])  # nan for a zero vector
    assert pearson([1, 2], [1, 2]) != pearson([1, 2], [1, 2]) and pearson([1, 2, 3], [2, 4, 7]) > 0.9


# ---------------------------------------------------------------- synthetic data

@pytest.fixture(scope="module")
def pools(tok):
    rng = np.random.default_rng(0)
    words = "model data task results training language method corpus evaluation baseline attention parser".split()
    def doc(i, opener):
        sents = [f"{opener} " + " ".join(rng.choice(words, 9)) + "."] + \
                [" ".join(["Sentence"] + list(rng.choice(words, 12))) + "." for _ in range(30)]
        return Document(id=f"d{i}", title=f"Paper {i}", text=" ".join(sents))
    real = [doc(i, "We apply the" if i % 2 else "In this paper") for i in range(12)]
    high = [Document(id=f"h{i}", title="", text=" ".join(f"Filler sentence number {j} of text {i} goes on." for j in range(60))) for i in range(4)]
    return dict(high=sentence_pool(high, tok), real=sentence_pool(real, tok))


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_examples_fit_contain_needles_and_are_deterministic(tok, pools, task, variant):
    a = make_examples(task, variant, 2, tok, 420, 4, pools, seed=5)
    b = make_examples(task, variant, 2, tok, 420, 4, pools, seed=5)
    assert [x.user_text() for x in a] == [x.user_text() for x in b]
    for ex in a:
        prompt, full = encode_example(tok, ex)
        assert len(full) <= 420 and len(prompt) < len(full)
        assert all(s in ex.user_text() for s in ex.needles) and ex.needles
        assert (ex.titles is not None) == (variant == "real")
        if task == "summhay": assert set(ex.gold) == {d + 1 for d in ex.needle_docs} and 2 <= len(ex.gold) <= 3
        else: assert score(ex.task, ex.answer, ex.answers) == 1.0
        if variant.endswith("-low"): assert any("Nothing else of note" in s or "week" in s or "quiet" in s or "business" in s or "closed early" in s
                                                for d in ex.documents for s in d) or task == "summhay"
        if variant.startswith("symbolic"): assert "->" in ex.user_text() or "Signal" in ex.user_text()


def test_batched_encoding_equals_separate_tokenization_and_probes_find_the_answer(tok, pools):
    exs = make_examples("musique", "real", 2, tok, 420, 4, pools, seed=2) + make_examples("mdqa", "realistic-low", 2, tok, 420, 4, pools, seed=2)
    for ex, (prompt, full) in zip(exs, encode_examples(tok, exs)):
        assert prompt == tok(chat_prompt(tok, None, ex.user_text()), add_special_tokens=False)["input_ids"]
        assert full == tok(chat_prompt(tok, None, ex.user_text(), answer=ex.answer), add_special_tokens=False)["input_ids"]
        probe = task_probe(tok, ex)
        assert probe.ids == prompt and tok.decode(probe.ids[probe.span[0]:probe.span[1]]).strip() == ex.answer
    with pytest.raises(ValueError, match="document numbers"):
        task_probe(tok, make_examples("summhay", "real", 1, tok, 420, 4, pools)[0])


def test_low_diversity_examples_at_4k_do_not_exhaust_entities(tok, pools):
    for task in TASKS:
        ex = make_examples(task, "templated-low", 1, tok, 4096, 10, pools, seed=0)[0]
        assert len(encode_example(tok, ex)[1]) <= 4096 and sum(len(d) for d in ex.documents) > 150


def test_example_errors(tok, pools):
    with pytest.raises(ValueError, match="variant must be one of"):
        make_examples("mdqa", "fancy-high", 1, tok, 400, 4, pools)
    with pytest.raises(ValueError, match="task must be one of"):
        make_examples("qa", "real", 1, tok, 400, 4, pools)
    with pytest.raises(ValueError, match="too short"):
        make_examples("mdqa", "templated-low", 1, tok, 200, 8, pools)


# ---------------------------------------------------------------- attention-only training

def test_batches_label_only_the_answer(tok, pools):
    exs = make_examples("mdqa", "templated-high", 3, tok, 400, 3, pools, seed=1)
    enc = [encode_example(tok, e) for e in exs]
    batch = next(task_batches(enc, 400, 3, tok.eos_token_id, seed=0))
    with pytest.raises(TypeError, match="pad_id must be a token id"):
        next(task_batches(enc, 400, 3, None))
    answers = {e.answer for e in exs}
    for row, lab in zip(batch["input_ids"], batch["labels"]):
        text = tok.decode(row[lab != -100])
        assert any(text.startswith(a) for a in answers) and (lab != -100).sum() < 20
    with pytest.raises(ValueError, match="exceed seq_len"):
        next(task_batches(enc, 100, 2, 0))
    with pytest.raises(ValueError, match="fewer than one batch"):
        next(task_batches(enc, 400, 5, 0))


def test_answer_loss_and_attention_only_step(tiny_llama):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 128, (2, 12), generator=g); labels = torch.full_like(ids, -100); labels[:, 8:10] = ids[:, 8:10]
    batch = dict(input_ids=ids, labels=labels)
    logits = tiny_llama(ids).logits
    want = F.cross_entropy(logits[:, 7:9].reshape(-1, 128), ids[:, 8:10].reshape(-1))
    torch.testing.assert_close(answer_loss(tiny_llama, batch), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no answer tokens"):
        answer_loss(tiny_llama, dict(input_ids=ids, labels=torch.full_like(ids, -100)))
    before = {n: p.detach().clone() for n, p in tiny_llama.named_parameters()}
    enc = [(ids[i, :8].tolist(), ids[i, :10].tolist()) for i in range(2)]
    hist = finetune_attention(tiny_llama, enc, seq_len=12, steps=2, batch_size=2, lr=1e-2, pad_id=0)
    changed = {n for n, p in tiny_llama.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert len(hist) == 2 and changed and all(attention_only(n) for n in changed)
    assert {n.rsplit(".", 2)[-2] for n in changed} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    state = attention_state(tiny_llama)
    load_attention_state(tiny_llama, {n: before[n] for n in state})
    assert all(torch.equal(p, before[n]) for n, p in tiny_llama.named_parameters())
    with pytest.raises(ValueError, match="does not match"):
        load_attention_state(tiny_llama, {"model.nope.weight": torch.zeros(1)})


def test_answers_stop_at_the_end_of_turn_or_a_newline(tok):
    "evals.line_stop_ids, which 20's answers use (the original stops at a newline)."
    stops = line_stop_ids(tok)
    assert {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")} <= stops
    assert all(i in stops for i in tok("a\nb\n\n", add_special_tokens=False)["input_ids"] if "\n" in tok.decode([i]))
    assert tok("Lisbon", add_special_tokens=False)["input_ids"][0] not in stops
