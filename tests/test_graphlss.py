"GraphLSS: graph construction pieces, bad inputs, the model's use of edge weights, the class-weight rule, training and evaluation."
import math
import numpy as np
import pytest
import torch
import longctx_nb.core  # noqa: F401  (TRITON_INTERPRET before anything imports triton)
from longctx_nb.data import Document
from longctx_nb.graphlss import (GraphSettings, parse_document, select_words, sentence_edges, word_similarity_edges, oracle_labels,
                                 next_class_weight, select_summary, textrank_scores, rouge_prf, FileWordVectors, to_hetero, HeteroGAT,
                                 SentenceMLP, HETERO_EDGE_TYPES, EDGE_TYPES, build_graph, build_graphs, graph_cache_path,
                                 load_sentence_encoder_for, train_summarizer, baseline_picks, evaluate_summaries, summarize_with)


# ---------------------------------------------------------------- spaCy and the encoder (loaded once)

@pytest.fixture(scope="module")
def nlp():
    from longctx_nb.models import load_spacy
    return load_spacy()


@pytest.fixture(scope="module")
def encoder():
    torch.set_num_threads(1)
    return load_sentence_encoder_for(GraphSettings())


PAPER = """Introduction

Long documents are hard to summarize because models read limited contexts. We propose a graph of sentences and words.
The graph links consecutive sentences. It also links similar sentences that are far apart.
Words are nodes too. Short one.

Method

A graph attention network classifies sentence nodes as relevant or not. The network is trained on oracle labels.
The graph links consecutive sentences."""


def test_parse_document_headings_merging_duplicates(nlp):
    p = parse_document(PAPER, nlp)
    assert "Introduction" not in p.sentences and "Method" not in p.sentences          # headings dropped
    assert any(s.endswith("Words are nodes too. Short one.") for s in p.sentences)    # short sentence merged into the previous
    assert sum(s == "The graph links consecutive sentences." for s in p.sentences) == 1  # duplicate kept once
    assert len(p.lemmas) == len(p.sentences) and all(isinstance(l, str) and pos for sent in p.lemmas for l, pos in sent)
    assert len(parse_document(PAPER, nlp, max_sentences=3).sentences) == 3


@pytest.mark.parametrize("text,match", [("", "empty"), ("  \n\n\t ", "empty"), ("... !!! ???", "no sentence"),
                                        ("Die Zusammenfassung langer Dokumente ist schwierig, weil Modelle nur begrenzte Kontexte lesen können.", "not look English"),
                                        ("长文档摘要是一项困难的任务。我们提出了一种异构图模型。", "not ASCII")])
def test_parse_document_refuses(nlp, text, match):
    with pytest.raises(ValueError, match=match): parse_document(text, nlp)


def test_parse_document_types_and_language_override(nlp):
    with pytest.raises(TypeError, match="str"): parse_document(b"bytes", nlp)
    p = parse_document("Die Zusammenfassung langer Dokumente ist schwierig, weil Modelle nur begrenzte Kontexte lesen können.", nlp, check_language=False)
    assert len(p.sentences) == 1


def test_select_words_threshold_by_hand():
    lem = [[("graph", "NOUN"), ("model", "NOUN")], [("graph", "NOUN"), ("run", "VERB")], [("graph", "NOUN"), ("et", "NOUN"), ("quick", "ADV")]]
    words, wi, si, tf = select_words(lem)
    from sklearn.feature_extraction.text import TfidfVectorizer
    v = TfidfVectorizer(analyzer=lambda x: x, lowercase=False); X = v.fit_transform([[l for l, _ in s] for s in lem])
    sums = dict(zip(v.get_feature_names_out(), np.asarray(X.sum(0)).ravel()))
    cand = [w for w in sums if w != "quick"]   # "quick" is an adverb
    thr = (np.mean([sums[w] for w in cand]) + np.median([sums[w] for w in cand])) / 1.6
    assert set(words) == {w for w in cand if sums[w] > thr} - {"et"}
    assert words == sorted(words, key=lambda w: -sums[w])
    for w, s, t in zip(wi, si, tf): assert math.isclose(t, X[s, v.vocabulary_[words[w]]], rel_tol=1e-6)


def test_select_words_empty_cases():
    assert select_words([[("be", "AUX")], []])[0] == []
    assert select_words([[("model", "NOUN")]])[0] == []    # all candidates equal: threshold 1.25 s keeps none


def test_sentence_edges_window_threshold():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(1, 8)); emb = base + 0.05 * rng.normal(size=(10, 8))   # all very similar
    emb[7] = rng.normal(size=8)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    (oi, oj, ow), (si, sj, sw) = sentence_edges(emb, 0.7, 0.4)
    assert list(zip(oi, oj)) == [(i, i + 1) for i in range(9)] and np.allclose(ow, (emb[:-1] * emb[1:]).sum(1))
    assert ((sj - si) >= 2).all() and ((sj - si) <= 4).all() and (sw > 0.7).all()
    assert 7 not in set(si) | set(sj)
    assert (0, 2) in set(zip(si, sj)) and (0, 5) not in set(zip(si, sj))
    one = sentence_edges(emb[:1])
    assert all(len(a) == 0 for part in one for a in part)


def test_word_similarity_edges_skip_zero_vectors():
    v = np.array([[1, 0], [0.9, 0.436], [0, 0], [0, 1.0]], dtype=np.float32)
    i, j, w = word_similarity_edges(v, 0.6)
    assert list(zip(i, j)) == [(0, 1)] and np.allclose(w, [0.9])
    assert len(word_similarity_edges(v[:1])[0]) == 0 and len(word_similarity_edges(np.zeros((3, 2), np.float32))[0]) == 0


def test_oracle_starts_from_the_best_sentence():
    sents = ["the weather was cold", "graph models summarize long documents", "we propose graph models", "documents are long"]
    lab = oracle_labels(sents, "graph models summarize long documents")
    assert lab[1] == 1 and lab[0] == 0 and sum(lab) == 1
    with pytest.raises(ValueError, match="no token"): oracle_labels(sents, "!!!")


def test_next_class_weight_rule():
    assert math.isclose(next_class_weight(10.0, 0.5, 0.05), 10.0 - (1 - math.log(0.5)))
    assert math.isclose(next_class_weight(10.0, 0.5, 0.05, temperature=4), 10.0 - (1 - math.log(0.5)) / 4)
    assert next_class_weight(10.0, 0.07, 0.05) == 10.0          # within eps of the true share: no update
    assert next_class_weight(1.5, 0.9, 0.05) == 1.0             # floor
    assert next_class_weight(5.0, 0.0, 0.0) == 5.0
    with pytest.raises(ValueError, match="temperature"): next_class_weight(5.0, 0.5, 0.1, temperature=0)
    with pytest.raises(ValueError, match="share"): next_class_weight(5.0, 1.5, 0.1)


def test_select_summary_and_textrank():
    assert select_summary([0.1, 0.9, 0.5, 0.8], ["a b", "c d e", "f", "g h"], 4) == [1, 3]
    assert select_summary([1.0], ["only one"], 100) == [0]
    with pytest.raises(ValueError, match="scores"): select_summary([1.0, 2.0], ["a"], 3)
    emb = np.array([[1, 0, 0], [0.9, 0.43, 0], [0.9, 0, 0.43], [0, 1, 0]], dtype=float)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    r = textrank_scores(emb)
    assert math.isclose(r.sum(), 1.0, rel_tol=1e-6) and r.argmax() in (0, 1) and r[3] < r[0]
    assert textrank_scores(emb[:1]).tolist() == [1.0]


def test_rouge_prf():
    assert rouge_prf(["a b c"], ["a b c"])["rougeLsum_f"] == 100
    r = rouge_prf(["cats sat"], ["the cat sat on the mat"])
    assert math.isclose(r["rouge1_p"], 100) and math.isclose(r["rouge1_r"], 100 * 2 / 6)


def test_file_word_vectors(tmp_path):
    p = tmp_path / "w2v.txt"; p.write_text("3 2\nmodel 3 4\ngraph 1 0\nnode 0 2\n")
    fv = FileWordVectors(p)
    out = fv(["model", "Graph", "unknown"])
    assert fv.dim == 2 and np.allclose(out[0], [0.6, 0.8]) and np.allclose(out[1], [1, 0]) and not out[2].any() and fv.oov == 1
    b = tmp_path / "bin"; b.write_bytes(b"3 2\n\0\0\x01")
    with pytest.raises(ValueError, match="binary"): FileWordVectors(b)
    bad = tmp_path / "bad.txt"; bad.write_text("model 1 2\ngraph 1\n")
    with pytest.raises(ValueError, match="expected 2"): FileWordVectors(bad)
    with pytest.raises(FileNotFoundError): FileWordVectors(tmp_path / "none.txt")


# ---------------------------------------------------------------- synthetic graphs (no spaCy) for the model and training

def fake_graph(n, m, rng, doc_id="g", d=16):
    x = torch.tensor(rng.normal(size=(n, d)), dtype=torch.float32)
    lab = torch.zeros(n, dtype=torch.long); lab[rng.choice(n, max(1, n // 5), replace=False)] = 1
    x[lab == 1] += 1.5   # learnable signal
    def und(a, b, w): return torch.tensor([list(a) + list(b), list(b) + list(a)], dtype=torch.long), torch.tensor(list(w) * 2, dtype=torch.float32)
    order = und(range(n - 1), range(1, n), rng.uniform(size=n - 1))
    sim = und([0] if n > 2 else [], [2] if n > 2 else [], [0.8] if n > 2 else [])
    wi = rng.integers(0, m, size=3 * n) if m else np.zeros(0, int); si = rng.integers(0, n, size=len(wi))
    ws = (torch.tensor(np.stack([wi, si]), dtype=torch.long), torch.tensor(rng.uniform(size=len(wi)), dtype=torch.float32))
    ww = und([0] if m > 1 else [], [1] if m > 1 else [], [0.7] if m > 1 else [])
    sents = [f"sentence {i} words here {'key' if lab[i] else 'filler'}" for i in range(n)]
    return dict(doc_id=doc_id, sentences=sents, words=[f"w{i}" for i in range(m)], x_sentence=x,
                x_word=torch.tensor(rng.normal(size=(m, d)), dtype=torch.float32),
                edges=dict(order=order, similarity=sim, word_in_sentence=ws, word_similarity=ww), labels=lab,
                reference_sentences=[s for s, l in zip(sents, lab) if l], stats={})


def test_to_hetero_drop_and_reverse():
    g = fake_graph(6, 4, np.random.default_rng(0))
    h = to_hetero(g)
    assert torch.equal(h["sentence", "has", "word"].edge_index, g["edges"]["word_in_sentence"][0].flip(0))
    assert all(h[et].edge_attr.shape == (h[et].edge_index.shape[1], 1) for et in HETERO_EDGE_TYPES)
    hd = to_hetero(g, drop=["word_in_sentence"])
    assert hd["word", "in", "sentence"].edge_index.shape == (2, 0) and hd["sentence", "has", "word"].edge_index.shape == (2, 0)
    assert hd["sentence", "order", "sentence"].edge_index.shape[1] == 10
    with pytest.raises(ValueError, match="unknown edge types"): to_hetero(g, drop=["syntax"])


def test_hetero_gat_degenerate_graphs_and_edge_weights():
    from torch_geometric.data import Batch
    rng = np.random.default_rng(1)
    gs = [fake_graph(1, 0, rng, "one-sentence"), fake_graph(5, 0, rng, "no-words"), fake_graph(7, 5, rng, "full")]
    torch.manual_seed(0)
    m = HeteroGAT({"sentence": 16, "word": 16}, hidden=16, heads=2).eval()
    b = Batch.from_data_list([to_hetero(g) for g in gs])
    out = m(b)
    assert out.shape == (13, 2) and torch.isfinite(out).all()
    b2 = b.clone()
    for et in HETERO_EDGE_TYPES: b2[et].edge_attr = b2[et].edge_attr * 3 + 1
    assert (m(b2) - out).abs().max() > 1e-5          # the weights change the output
    m(b).sum().backward()
    assert m.convs[0].convs[("sentence", "order", "sentence")].lin_edge.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="multiple of heads"): HeteroGAT({"sentence": 4, "word": 4}, hidden=10, heads=4)


@pytest.mark.parametrize("make", ["gat", "mlp"])
def test_train_summarizer_history_and_early_stop(make):
    rng = np.random.default_rng(0)
    train = [fake_graph(int(rng.integers(8, 15)), 4, rng, f"t{i}") for i in range(6)]
    val = [fake_graph(10, 4, rng, f"v{i}") for i in range(3)]
    torch.manual_seed(0)
    model = HeteroGAT({"sentence": 16, "word": 16}, hidden=16, heads=2) if make == "gat" else SentenceMLP(16, hidden=16)
    hist = train_summarizer(model, train, val, epochs=6, patience=2, batch_size=3, lr=5e-3, seed=0)
    assert 2 <= len(hist) <= 6 and list(hist.epoch) == list(range(1, len(hist) + 1))
    assert hist.class_weight.is_monotonic_decreasing and hist.class_weight.iloc[0] > 1
    assert np.isfinite(hist[["train_loss", "val_mean", "tau"]].to_numpy()).all() and (hist.train_s > 0).all()
    if len(hist) < 6: assert (hist.val_mean.iloc[-2:] <= hist.val_mean.max()).all()   # stopped after `patience` epochs without a new best
    picks = summarize_with(model, val)
    assert all(len(p) >= 1 for p in picks)


def test_train_summarizer_bad_inputs():
    rng = np.random.default_rng(0)
    g = fake_graph(6, 2, rng)
    m = SentenceMLP(16, hidden=8)
    with pytest.raises(ValueError, match="training and validation"): train_summarizer(m, [g], [])
    unl = dict(g, labels=None)
    with pytest.raises(ValueError, match="oracle labels"): train_summarizer(m, [unl], [g])
    flat = dict(g, labels=torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="no contrast"): train_summarizer(m, [flat], [g])


# ---------------------------------------------------------------- end to end on real text: bad documents and the cache

def test_build_graph_bad_documents(nlp, encoder):
    s = GraphSettings()
    with pytest.raises(ValueError, match="'empty-doc'.*empty"): build_graph(Document(id="empty-doc", text=" \n "), nlp, encoder, s)
    with pytest.raises(ValueError, match="not look English"):
        build_graph(Document(id="de", text="Die Zusammenfassung langer Dokumente ist schwierig, weil Modelle nur begrenzte Kontexte lesen können."), nlp, encoder, s)
    with pytest.raises(TypeError, match="Document"): build_graph("just a string", nlp, encoder, s)
    one = build_graph(Document(id="one", text="We propose a graph model for long scientific documents.", summary="A graph model."), nlp, encoder, s)
    assert one["stats"]["n_sentences"] == 1 and one["edges"]["order"][0].shape == (2, 0) and one["labels"].tolist() == [1]
    nowords = build_graph(Document(id="nw", text="It is what it is. And so it was, as it is.", summary="It is."), nlp, encoder, s)
    assert nowords["stats"]["n_words"] == 0 and nowords["x_word"].shape == (0, 384) and nowords["edges"]["order"][0].shape == (2, 2)
    # both degenerate graphs run through the model, batched together
    from torch_geometric.data import Batch
    out = HeteroGAT({"sentence": 384, "word": 384}, hidden=16, heads=2).eval()(Batch.from_data_list([to_hetero(one), to_hetero(nowords)]))
    assert out.shape == (3, 2) and torch.isfinite(out).all()


def test_build_graph_on_a_paper_and_cache(nlp, encoder, tmp_path, monkeypatch):
    monkeypatch.setenv("LONGCTX_CACHE", str(tmp_path))
    s = GraphSettings(max_sentences=30)
    doc = Document(id="P/1", text=PAPER, summary="We propose a graph of sentences and words for long document summarization.")
    g = build_graphs([doc], s, nlp, encoder)[0]
    assert not g["stats"]["cached"] and graph_cache_path(doc.id, doc.text, s).exists()
    assert str(graph_cache_path(doc.id, doc.text, s)).startswith(str(tmp_path / "graphlss" / s.key()))
    n = g["stats"]["n_sentences"]
    assert g["x_sentence"].shape == (n, 384) and g["labels"].shape == (n,) and g["labels"].sum() >= 1
    ei, w = g["edges"]["word_in_sentence"]
    assert ei[0].max() < len(g["words"]) and ei[1].max() < n and (w > 0).all()
    g2 = build_graphs([doc], s, nlp, encoder)[0]
    assert g2["stats"]["cached"] and g2["words"] == g["words"] and torch.equal(g2["x_sentence"], g["x_sentence"])
    other = GraphSettings(max_sentences=30, sim_threshold=0.5)
    assert graph_cache_path(doc.id, doc.text, other) != graph_cache_path(doc.id, doc.text, s)
    picks = baseline_picks([g])
    assert set(picks) == {"Lead", "TextRank", "Oracle"} and picks["Lead"][0][0] == 0
    ev = evaluate_summaries([g], picks["Oracle"])
    assert 0 < ev.rouge1_f.iloc[0] <= 100


def test_build_graphs_accepts_a_dataset(nlp, encoder):
    from longctx_nb.data import documents_to_dataset
    s = GraphSettings(max_sentences=30)
    docs = [Document(id="P/1", text=PAPER, summary="We propose a graph of sentences and words for long document summarization."),
            Document(id="P/2", text="We propose a graph model for long scientific documents.", summary="A graph model.")]
    from_list = build_graphs(docs, s, nlp, encoder, use_cache=False)
    from_ds = build_graphs(documents_to_dataset(docs), s, nlp, encoder, use_cache=False)
    for a, b in zip(from_list, from_ds):
        assert a["doc_id"] == b["doc_id"] and a["words"] == b["words"] and torch.equal(a["labels"], b["labels"])
        assert torch.equal(a["x_sentence"], b["x_sentence"])
    with pytest.raises(TypeError, match="list of Documents or a datasets.Dataset"): build_graphs("a string", s, nlp, encoder)
    with pytest.raises(TypeError, match="wrap it in a list"): build_graphs(docs[0], s, nlp, encoder)
