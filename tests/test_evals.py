"04_evals: the moved tasks, scorers and decode loop reproduce what the code at 721d4b8 produced (tests/fixtures/), plus bad inputs."
import copy, hashlib, json, math
from pathlib import Path
import numpy as np
import pytest
import torch

from longctx_nb.evals import (RULER_TASKS, DEFAULT_NEEDLES, RulerTasks, TaskSample, accuracy_table, bootstrap_ci, build_niah_prompt,
                              chat_prompt, citation_f1, evaluate, fit_length, greedy_generate, insert_at_sentences, left_pad,
                              line_retrieval_prompts, niah_prompts, normalize_answer, parse_citations, pearson, rouge, sample_window,
                              score, spearman, stop_token_ids, string_match_all, token_f1)

FIX = Path(__file__).parent / "fixtures"


def fixture(name): return json.loads((FIX / name).read_text())
def sha(ids): return hashlib.sha256(json.dumps([int(i) for i in ids]).encode()).hexdigest()


@pytest.fixture(scope="module")
def tok():
    from longctx_nb.models import load_tokenizer
    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="module")
def smollm():
    from longctx_nb.models import load_causal_lm
    return load_causal_lm("smollm2-135m", dtype=torch.float32, device="cpu")[0]


@pytest.fixture(scope="module")
def ruler(tok): return RulerTasks(tok, seed=0)


def test_ruler_tasks_reproduce_the_recorded_prompts(ruler):
    fx = fixture("ruler_tasks.json")
    assert {r["task"] for r in fx["samples"]} == set(RULER_TASKS)
    for r in fx["samples"]:
        s = ruler.sample(r["task"], r["length"], r["index"])
        where = f"{r['task']} L={r['length']} i={r['index']}"
        assert len(s.input_ids) == r["n"] == r["length"], where
        assert sha(s.input_ids) == r["sha"], where
        assert (s.answers, s.max_new_tokens, s.chance, s.meta) == (r["answers"], r["max_new_tokens"], r["chance"], r["meta"]), where


def test_chat_template_gives_the_hard_coded_smollm2_markup(tok):
    sys_ = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    hard = f"<|im_start|>system\n{sys_}<|im_end|>\n<|im_start|>user\nI\n\nB\n\nQ<|im_end|>\n<|im_start|>assistant\nA"
    assert chat_prompt(tok, None, "I\n\nB\n\nQ", "A") == chat_prompt(tok, sys_, "I\n\nB\n\nQ", "A") == hard


def test_plain_prompt_without_a_template_and_explicit_system(tok):
    class Plain: chat_template = None
    assert chat_prompt(Plain(), None, "q") == "q\nAnswer:"
    assert chat_prompt(Plain(), "S", "q", "The answer is") == "S\n\nq\nThe answer is"
    assert chat_prompt(Plain(), None, "q", answer="x") == "q\nAnswer: x\n"
    with pytest.raises(ValueError, match="not both"): chat_prompt(tok, None, "q", "A", answer="x")
    assert "<|im_start|>system\nBe brief.<|im_end|>" in chat_prompt(tok, "Be brief.", "q")


def _haystacks(tok, chars):
    from longctx_nb.data import load_corpus
    return {n: np.asarray(tok("\n\n".join(d.text for d in load_corpus(n, "test"))[:chars], add_special_tokens=False)["input_ids"])
            for n in ("austen", "aclsum")}


def test_niah_probes_reproduce_the_recorded_prompts(tok):
    fx = fixture("niah_probes.json")
    hay = _haystacks(tok, fx["haystack_chars"])
    probes = niah_prompts(tok, hay, fx["lengths"], fx["depths"], DEFAULT_NEEDLES[:fx["n_needles"]], seed=fx["seed"])
    assert len(probes) == len(fx["probes"])
    for p, r in zip(probes, fx["probes"]):
        assert (len(p.ids), sha(p.ids), list(p.span), p.answer, p.meta) == (r["n"], r["sha"], r["span"], r["answer"], r["meta"])
    for r in fx["build_niah_prompt"]:
        p = build_niah_prompt(tok, hay["austen"], DEFAULT_NEEDLES[2], 300, r["depth"], offset=123, meta=dict(x=1))
        assert (len(p.ids), sha(p.ids), list(p.span), p.meta) == (r["n"], r["sha"], r["span"], r["meta"])
    text = fx["insert_at_depth"]["text"]
    for r in fx["insert_at_depth"]["results"]:
        new, (at,) = insert_at_sentences(text, ["NEEDLE."], [r["depth"]], snap="before")
        assert (new, at) == (r["text"], r["at"]), r["depth"]


def test_line_retrieval_prompts_reproduce_the_recorded_prompts(tok):
    from longctx_nb.data import load_corpus, tokenize_docs
    docs = load_corpus("austen", "test"); ids = tokenize_docs(docs, tok)
    fx = fixture("line_retrieval.json")["prompts"]
    for L, n, n_lines, seed in sorted({(r["length"], r["n"], r["n_lines"], r["seed"]) for r in fx}):
        got = line_retrieval_prompts(tok, docs, length=L, n=n, n_lines=n_lines, seed=seed, token_ids=ids)
        want = [r for r in fx if (r["length"], r["seed"]) == (L, seed)]
        assert len(got) == len(want)
        for p, r in zip(got, want):
            assert (len(p.input_ids), sha(p.input_ids), p.answer_ids, p.key, p.value) == (r["n_ids"], r["sha"], r["answer_ids"], r["key"], r["value"])
            assert p.depth == pytest.approx(r["depth"], abs=1e-12)
            assert len(p.input_ids) + len(p.answer_ids) == L


def test_scorers_reproduce_the_recorded_scores():
    fx = fixture("scorers.json")
    for r in fx["pairs"]:
        pred, ans = r["prediction"], r["answers"]
        if r["string_match_all"] is not None: assert string_match_all(pred, ans) == r["string_match_all"], r
        assert token_f1(pred, ans) == r["token_f1"] and token_f1(pred, ans[0]) == r["token_f1_first"], r
        assert rouge(ans[0], pred) == pytest.approx(r["rouge1_recall"], abs=1e-12), r
        assert normalize_answer(pred) == r["normalize"]
    for r in fx["citations"]:
        assert citation_f1(r["prediction"], r["gold"]) == r["citation_f1"] and sorted(parse_citations(r["prediction"])) == r["parsed"]
    for r in fx["pearson"]:
        want, got = r["pearson_r"], pearson(r["x"], r["y"])
        assert (math.isnan(want) and math.isnan(got)) or got == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("ref,pred", [("The cats are running", "cat runs"), ("Dogs barked loudly!", "the dog barks"), ("", "x")])
def test_rouge_stemming_is_an_argument(ref, pred):
    from rouge_score import rouge_scorer
    for stem in (False, True):
        s = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=stem).score(ref, pred)
        assert rouge(ref, pred, stemmer=stem) == s["rouge1"].recall
        assert rouge(ref, pred, "rougeL", "fmeasure", stemmer=stem) == s["rougeL"].fmeasure
    with pytest.raises(ValueError, match="stat must be one of"): rouge(ref, pred, stat="f1")


def test_spearman_and_bootstrap():
    import scipy.stats
    x, y = [3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8, 1, 8]
    assert spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y).statistic, abs=1e-12)
    assert math.isnan(spearman([1, 2], [1, 2])) and math.isnan(pearson([1, 1, 1], [1, 2, 3]))
    lo, hi = bootstrap_ci([0.0, 1.0] * 30, n_boot=400, seed=1)
    assert lo < 0.5 < hi and bootstrap_ci([0.0, 1.0] * 30, n_boot=400, seed=1) == (lo, hi)
    lo, hi = bootstrap_ci(x, y, stat=pearson, n_boot=200)
    assert -1 <= lo <= pearson(x, y) <= hi <= 1
    with pytest.raises(ValueError, match="equal length"): bootstrap_ci([1, 2], [1])
    with pytest.raises(ValueError, match="level"): bootstrap_ci([1, 2], level=95)


def test_window_insert_and_fit_bad_inputs():
    with pytest.raises(ValueError, match="no document holds"): sample_window(np.random.default_rng(0), [np.arange(3)], 4)
    assert sample_window(np.random.default_rng(0), [np.arange(4)], 4) == (0, 0)
    with pytest.raises(ValueError, match="depths must be in"): insert_at_sentences([1, 2, 3], [[9]], [-0.1])
    with pytest.raises(ValueError, match="either depths or"): insert_at_sentences([1, 2, 3], [[9]])
    with pytest.raises(ValueError, match="nondecreasing"): insert_at_sentences([1, 2, 3], [[8], [9]], at=[2, 1])
    out, starts = insert_at_sentences([1, 2, 3, 4], [[8], [9]], at=[0, 4])
    assert out == [8, 1, 2, 3, 4, 9] and starts == [0, 5]
    out, starts = insert_at_sentences([1, 2, 3, 4, 5, 6], [[9]], [0.5], boundaries=[1, 5])
    assert out == [1, 9, 2, 3, 4, 5, 6] or out == [1, 2, 3, 4, 5, 9, 6]
    calls = []
    got = fit_length(lambda n: calls.append(n) or list(range(n + (1 if n > 10 else 0))), 12, 10)
    assert len(got) == 12 and calls == [10, 12, 11]


def test_stop_ids_from_tokenizer_template_and_generation_config(tok, smollm):
    assert set(stop_token_ids(tok)) == {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
    assert set(stop_token_ids(tok, smollm)) >= {smollm.generation_config.eos_token_id}
    class Plain: chat_template = None; eos_token_id = 7
    assert stop_token_ids(Plain()) == [7] and stop_token_ids() == []


def test_greedy_generate_and_evaluate_reproduce_the_old_decode_loops_with_head_hooks(tok, smollm):
    """retrieval_heads.greedy_decode / generate_answers / detect_retrieval_heads at 721d4b8: plain decoding and detection through
    greedy_generate; masked and patched answers through evaluate (full attention's cache, the heads' hook around its attention)."""
    from longctx_nb.retrieval_heads import HeadHook, evaluate_heads, detect_retrieval_heads, probe_samples
    fx = fixture("generation.json")
    text = "\n\n".join(d.text for d in __import__("longctx_nb.data", fromlist=["load_corpus"]).load_corpus("austen", "test"))[:30_000]
    hay = {"austen": np.asarray(tok(text, add_special_tokens=False)["input_ids"])}
    probes = niah_prompts(tok, hay, (256,), (0.25, 0.75), DEFAULT_NEEDLES[:2], seed=0)
    assert [dict(n=len(p.ids), sha=sha(p.ids)) for p in probes] == fx["probe_meta"]
    prompts = [probes[0].ids, probes[1].ids[40:], probes[2].ids[90:]]
    ids, am = left_pad(prompts, pad_id=tok.pad_token_id or 0)
    from longctx_nb.evals import line_stop_ids
    got = greedy_generate(smollm, ids, attention_mask=am, stop_ids=line_stop_ids(tok), max_new_tokens=12, hook=HeadHook())
    assert got == fx["plain"]
    samples = [TaskSample("needle_probe", list(p), [probes[0].answer], 12) for p in prompts]
    def answers(**kw):  # evaluate's rows back in sample order
        return evaluate_heads(smollm, tok, samples, **kw).sort_values("sample").prediction.tolist()
    assert answers(batch_size=3) == fx["answers"]
    mask = [(0, 0), (3, 2), (10, 5), (20, 1)]
    assert answers(batch_size=3, mask=mask) == fx["masked_uniform"]
    assert answers(batch_size=2, mask=mask, mask_mode="zero") == fx["masked_zero"]
    donor = copy.deepcopy(smollm); g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in donor.named_parameters():
            if "o_proj" in n: p.add_(torch.randn(p.shape, generator=g) * 0.02)
    assert answers(batch_size=3, donor=donor, patch=[(5, 1), (9, 3), (12, 0)]) == fx["patched"] != fx["answers"]
    det = detect_retrieval_heads(smollm, tok, probes[:3], batch_size=3, max_new_tokens=12)  # the first batch of the recorded run
    assert det.responses == fx["detection"]["responses"][:3] and det.recall.tolist() == pytest.approx(fx["detection"]["recall"][:3])
    want = [r for r in fx["detection"]["nonzero"] if r[0] < 3]
    nz = np.argwhere(det.scores > 0)
    assert [[int(a), int(b), int(c)] for a, b, c in nz] == [r[:3] for r in want]
    assert [float(det.scores[a, b, c]) for a, b, c in nz] == pytest.approx([r[3] for r in want], abs=1e-12)


def test_left_padded_batch_of_different_lengths_decodes_like_single_prompts(tiny_llama):
    torch.manual_seed(1)
    prompts = [torch.randint(3, 128, (n,)).tolist() for n in (5, 9, 2)]
    ids, am = left_pad(prompts)
    batched = greedy_generate(tiny_llama, ids, attention_mask=am, stop_ids=[], max_new_tokens=6)
    alone = [greedy_generate(tiny_llama, torch.tensor([p]), stop_ids=[], max_new_tokens=6)[0] for p in prompts]
    assert batched == alone and all(len(g) == 6 for g in batched)
    stop = batched[0][2]
    cut = greedy_generate(tiny_llama, ids, attention_mask=am, stop_ids=[stop], max_new_tokens=6)
    for row, full in zip(cut, batched):
        assert row == (full[:full.index(stop) + 1] if stop in full else full)
    with pytest.raises(ValueError, match="at least 2 tokens"): greedy_generate(tiny_llama, torch.tensor([[5]]), stop_ids=[], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"): greedy_generate(tiny_llama, ids, stop_ids=[], max_new_tokens=0)


def test_first_logits_path_equals_prefill_path(tiny_llama):
    from transformers import DynamicCache
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(2))
    ref = greedy_generate(tiny_llama, ids, stop_ids=[], max_new_tokens=5)
    cache = DynamicCache()
    logits = tiny_llama(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1]
    assert greedy_generate(tiny_llama, ids, stop_ids=[], max_new_tokens=5, cache=cache, first_logits=logits) == ref


def test_evaluate_reproduces_evaluate_methods_rows(tok, smollm, ruler):
    "shadowkv.evaluate_methods at 721d4b8 (full, streaming and snapkv at ShadowKV's attended tokens) on one batch of seven 1024-token tasks."
    kv = pytest.importorskip("longctx_nb.kvcache")
    fx = [r for r in fixture("generation.json")["evaluate_methods"]]
    samples = [ruler.sample(t, 1024, 0) for t in RULER_TASKS]
    attended = {r["method"]: r["attended_tokens"] for r in fx}
    methods = {"full": kv.FullKV(), "streaming": kv.StreamingLLM(budget=int(attended["streaming"])),
               "snapkv": kv.SnapKV(budget=int(attended["snapkv"]))}
    df = evaluate(methods, samples, smollm, tok, batch_size=7, max_new_tokens=24)
    assert list(df.columns[:6]) == ["method", "setting", "budget", "task", "length", "sample"]
    for (_, row), r in zip(df.iterrows(), fx):
        assert (row.setting, row.task, row.length, row.prediction, row.score, row.attended_tokens, row.answers) == \
               (r["method"], r["task"], r["context"], r["prediction"], r["score"], r["attended_tokens"], r["answers"])
    acc = accuracy_table(df, by=("setting",))
    assert list(acc.setting) == ["full", "streaming", "snapkv"] and "average 95% CI" in acc.columns
    with pytest.raises(ValueError, match="no column"): accuracy_table(df, by=("nope",))


def test_evaluate_bad_inputs(tok, tiny_llama):
    kv = pytest.importorskip("longctx_nb.kvcache")
    with pytest.raises(ValueError, match="no methods"): evaluate([], [TaskSample("x", [1, 2, 3], ["1"], 2)], tiny_llama, tok)
    with pytest.raises(ValueError, match="no samples"): evaluate([kv.FullKV()], [], tiny_llama, tok)


def test_line_retrieval_prompts_accept_a_dataset(tok):
    from longctx_nb.data import load_corpus, documents_to_dataset
    docs = load_corpus("austen", "test")
    a = line_retrieval_prompts(tok, docs, length=200, n=2, n_lines=3, seed=5)
    b = line_retrieval_prompts(tok, documents_to_dataset(docs), length=200, n=2, n_lines=3, seed=5)
    assert [p.input_ids for p in a] == [p.input_ids for p in b] and [p.key for p in a] == [p.key for p in b]
    with pytest.raises(TypeError, match="one Document"): line_retrieval_prompts(tok, docs[0], length=200, n=1)


def test_retrieval_heads_examples_keep_their_recorded_prompts(tok):
    "20's realism x diversity generators stay in 20; their prompts now go through evals.chat_prompt and must not change."
    import hashlib as _h
    from longctx_nb.data import load_corpus
    from longctx_nb.retrieval_heads import encode_examples, make_examples, sentence_pool, task_probe, task_samples
    fx = fixture("task_examples.json")
    pools = dict(high=sentence_pool(load_corpus("austen", "train") + load_corpus("aclsum", "train")[:20], tok, max_chars=40_000),
                 real=sentence_pool(load_corpus("aclsum", "validation"), tok))
    groups = {}
    for r in fx["examples"]: groups.setdefault((r["task"], r["variant"]), []).append(r)
    for (task, variant), rows in groups.items():
        exs = make_examples(task, variant, fx["n"], tok, seq_len=fx["seq_len"], n_docs=fx["n_docs"], pools=pools, seed=fx["seed"])
        for ex, (p, f), r in zip(exs, encode_examples(tok, exs), rows):
            assert _h.sha256(ex.user_text().encode()).hexdigest() == r["user_sha"] and (ex.answer, ex.gold) == (r["answer"], r["gold"])
            assert (len(p), sha(p), len(f), sha(f)) == (r["prompt_n"], r["prompt_sha"], r["full_n"], r["full_sha"]), (task, variant)
            assert score(ex.task, ex.answer, ex.answers) == r["score_self"]
            if "probe_sha" in r:
                pr = task_probe(tok, ex); assert (sha(pr.ids), list(pr.span)) == (r["probe_sha"], r["probe_span"])
        for smp, (p, _), r in zip(task_samples(tok, exs, 16), encode_examples(tok, exs), rows):   # the suite's samples: the same prompts
            assert (smp.task, len(smp.input_ids), sha(smp.input_ids), smp.max_new_tokens) == (task, r["prompt_n"], r["prompt_sha"], 16)


def test_evaluate_on_batch_adds_columns_from_the_same_prefill(tok, tiny_llama):
    kv = pytest.importorskip("longctx_nb.kvcache")
    from longctx_nb.evals import DecodedBatch
    samples = [TaskSample("niah_single", torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(n)).tolist(), ["7"], 3) for n in (20, 20, 24)]
    seen = []
    def on_batch(d):
        assert isinstance(d, DecodedBatch) and d.input_ids.shape == (len(d.samples), len(d.samples[0].input_ids)) and d.decode_s > 0
        assert len(d.records) == tiny_llama.config.num_hidden_layers and d.logits.shape == (len(d.samples), tiny_llama.config.vocab_size)
        seen.append((d.setting, id(d.records)))
        return [dict(extra=i, new=len(o)) for i, o in zip(d.indices, d.outputs)]
    plain = evaluate([kv.FullKV(), kv.SnapKV(budget=0.5)], samples, tiny_llama, tok, batch_size=2)
    df = evaluate([kv.FullKV(), kv.SnapKV(budget=0.5)], samples, tiny_llama, tok, batch_size=2, on_batch=on_batch)
    assert list(df.columns[:len(plain.columns)]) == list(plain.columns) and (df.extra == df["sample"]).all() and df.new.between(1, 3).all()
    assert df[plain.columns.drop("decode_s")].equals(plain[plain.columns.drop("decode_s")])
    assert len(seen) == 4 and seen[0][1] == seen[1][1] != seen[2][1]              # two methods per batch share its records
    with pytest.raises(ValueError, match="on_batch returned 0 rows"): evaluate([kv.FullKV()], samples, tiny_llama, tok, on_batch=lambda d: [])


def test_a_length_too_short_for_the_needles_is_refused(ruler):
    "A length whose context cannot hold the inserted needles is an error, never a prompt longer than asked (it was 177 tokens at 160)."
    with pytest.raises(ValueError, match="inserted pieces take"): ruler.sample("niah_multikey", 160)
    with pytest.raises(ValueError, match="inserted pieces take"): ruler.sample("niah_multiquery", 192)
    for task in ("niah_single", "niah_multikey", "vt"):
        assert len(ruler.sample(task, 192).input_ids) == 192
