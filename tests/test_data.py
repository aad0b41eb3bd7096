"Corpora in both forms (Document lists and datasets.Dataset), and the hub path read offline from local copies in each hub layout."
import gzip, json
from pathlib import Path
import pytest
from longctx_nb.data import (Document, SPLITS, HUB_CORPORA, load_corpus, as_documents, documents_to_dataset, corpus_dataset,
                             token_windows, packed_batches)
import longctx_nb.data as data

datasets = pytest.importorskip("datasets")

# The exact column layout of each hub dataset, written down here (not taken from the library) so the mapping is checked against it.
HUB_LAYOUTS = {"pg19": ["short_book_title", "publication_date", "url", "text"],
               "proof-pile": ["text", "meta"],
               "ccdv/pubmed-summarization": ["article", "abstract"],
               "ccdv/arxiv-summarization": ["article", "abstract"]}
GUTENBERG = dict(emma=158, mansfieldpark=141, prideprejudice=1342, sensesensibility=161, northangerabbey=121, persuasion=105)


@pytest.fixture(scope="session")
def private_cache(tmp_path_factory):
    "A cache folder for this session: the unpacked Austen corpus linked in from the real cache; Arrow copies and datasets' cache fresh."
    real, tmp = data.cache_dir(), tmp_path_factory.mktemp("cache")
    for sub in ("corpora", "debs"):
        if (real / sub).exists(): (tmp / sub).symlink_to(real / sub, target_is_directory=True)
    return tmp


@pytest.fixture(autouse=True)
def offline(monkeypatch, private_cache):
    "No test here may reach the hub (a hub id without data_files must fail at once), nor leave files in the user's cache."
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("LONGCTX_CACHE", str(private_cache))


def _hub_rows(name: str, docs: list[Document]) -> list[dict]:
    if name == "pg19":
        return [dict(short_book_title=d.title, publication_date=1816, url=f"http://www.gutenberg.org/ebooks/{GUTENBERG[d.id]}", text=d.text) for d in docs]
    if name == "proof-pile": return [dict(text=d.text, meta=dict(set_name="stdlib", file=d.id)) for d in docs]
    return [dict(article=d.text, abstract=d.summary) for d in docs]


def _write(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".parquet":
        import pyarrow as pa, pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif path.name.endswith(".gz"):
        with gzip.open(path, "wt") as f: f.writelines(json.dumps(r) + "\n" for r in rows)
    else: path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def sources():
    "Our offline documents per hub corpus and split: Austen for PG19, stdlib files for proof-pile, ACLSum (validation, cut in 3) for ccdv."
    papers = load_corpus("aclsum", "validation")
    code = {s: load_corpus("stdlib", s, max_docs=8) for s in SPLITS}
    austen = {s: load_corpus("austen", s) for s in SPLITS}
    ccdv = dict(train=papers[:30], validation=papers[30:40], test=papers[40:])
    return {"pg19": austen, "proof-pile": code, "ccdv/pubmed-summarization": ccdv, "ccdv/arxiv-summarization": ccdv}


@pytest.fixture(scope="session")
def hub_copies(sources, tmp_path_factory):
    "{hub name: {split: file}}: local copies in each hub dataset's exact layout (JSON lines, gzipped JSON lines, Parquet)."
    root, out = tmp_path_factory.mktemp("hub"), {}
    ext = {"pg19": ".jsonl", "proof-pile": ".jsonl.gz", "ccdv/pubmed-summarization": ".parquet", "ccdv/arxiv-summarization": ".jsonl"}
    for name, by_split in sources.items():
        d = root / name.replace("/", "__"); d.mkdir()
        out[name] = {s: _write(d / f"{s}{ext[name]}", _hub_rows(name, docs)) for s, docs in by_split.items()}
    return out


def test_layouts_written_are_the_hub_ones(hub_copies):
    for name, files in hub_copies.items():
        first = datasets.load_dataset(data._builder_of([str(files["test"])]), data_files=str(files["test"]), split="train", streaming=True)
        assert list(next(iter(first))) == HUB_LAYOUTS[name], name
        assert set(HUB_LAYOUTS[name]) >= set(HUB_CORPORA[name]["columns"].values())


@pytest.mark.parametrize("name", list(HUB_LAYOUTS))
def test_hub_layout_maps_to_our_columns(name, sources, hub_copies):
    for split in SPLITS:
        docs = load_corpus(name, split, data_files=hub_copies[name])
        want = sources[name][split]
        assert [d.text for d in docs] == [d.text for d in want]
        if name == "pg19":
            assert [(d.id, d.title) for d in docs] == [(str(GUTENBERG[w.id]), w.title) for w in want]
            assert docs[0].meta == dict(publication_date=1816, url=f"http://www.gutenberg.org/ebooks/{GUTENBERG[want[0].id]}")
        else: assert [d.id for d in docs] == [f"{split}-{i}" for i in range(len(want))]
        if name.startswith("ccdv"): assert [d.summary for d in docs] == [w.summary for w in want]
        else: assert all(d.summary is None for d in docs)
        if name == "proof-pile": assert json.loads(docs[0].meta["meta"]) == dict(set_name="stdlib", file=want[0].id)


@pytest.mark.parametrize("name", ["ccdv/pubmed-summarization", "pg19"])
def test_hub_streaming_and_max_docs(name, sources, hub_copies):
    files, want = hub_copies[name], sources[name]["train"]
    stream = load_corpus(name, "train", max_docs=2, as_dataset=True, streaming=True, data_files=files)
    assert isinstance(stream, datasets.IterableDataset)
    rows = list(stream)
    assert len(rows) == 2 and list(rows[0])[:3] == ["id", "title", "text"] and [r["text"] for r in rows] == [d.text for d in want[:2]]
    table = load_corpus(name, "train", max_docs=3, as_dataset=True, data_files=files)  # streamed up to max_docs, then held as a Dataset
    assert isinstance(table, datasets.Dataset) and table.num_rows == min(3, len(want)) and table.column_names[:3] == ["id", "title", "text"]
    whole = load_corpus(name, "train", as_dataset=True, streaming=False, data_files=files)
    assert isinstance(whole, datasets.Dataset) and whole.num_rows == len(want)
    assert as_documents(table) == as_documents(whole)[:3] == load_corpus(name, "train", max_docs=3, data_files=files)
    assert len(load_corpus(name, "train", max_docs=10_000, data_files=files)) == len(want)


def test_hub_split_handling(hub_copies):
    only_test = {"test": hub_copies["pg19"]["test"]}
    with pytest.raises(ValueError, match=r"data_files has the splits \['test'\], not 'validation'"):
        load_corpus("pg19", "validation", data_files=only_test)
    with pytest.raises(ValueError, match="split must be one of"):
        load_corpus("pg19", "dev", data_files=only_test)
    with pytest.raises(TypeError, match="data_files must map split names to files"):
        load_corpus("pg19", "test", data_files=str(only_test["test"]))
    with pytest.raises(ValueError, match="data_files reads a local copy of a hub corpus"):
        load_corpus("austen", "test", data_files=only_test)
    with pytest.raises(ValueError, match="max_docs must be a positive int"):
        load_corpus("pg19", "test", max_docs=0, data_files=only_test)


@pytest.mark.parametrize("name", list(HUB_CORPORA))
def test_hub_id_offline_fails_at_once_naming_the_default(name, monkeypatch):
    monkeypatch.setattr(data, "_datasets", lambda: pytest.fail("reached for datasets before saying the machine is offline"))
    with pytest.raises(RuntimeError, match=rf"offline default load_corpus\('{HUB_CORPORA[name]['offline']}'\)"):
        load_corpus(name, "test")
    with pytest.raises(RuntimeError, match="offline default"):
        load_corpus(name, "test", as_dataset=True)


@pytest.mark.parametrize("streaming", [True, False])
def test_unknown_layout_lists_found_and_expected(streaming, tmp_path):
    f = _write(tmp_path / "x.jsonl", [dict(body="b", summary="s")])
    with pytest.raises(ValueError, match=r"need the columns \['article', 'abstract'\].*missing \['article', 'abstract'\]; found \['body', 'summary'\]"):
        load_corpus("ccdv/arxiv-summarization", "test", data_files={"test": f}, as_dataset=True, streaming=streaming)
    g = _write(tmp_path / "y.jsonl", [dict(text="t", title="no short_book_title")])
    with pytest.raises(ValueError, match=r"missing \['short_book_title'\]; found \['text', 'title'\]"):
        load_corpus("pg19", "test", data_files={"test": g})


@pytest.mark.parametrize("streaming", [True, False])
def test_empty_split_is_a_clear_error(streaming, tmp_path):
    import pyarrow as pa, pyarrow.parquet as pq
    (tmp_path / "e.jsonl").write_text("")
    pq.write_table(pa.table(dict(article=pa.array([], pa.string()), abstract=pa.array([], pa.string()))), tmp_path / "e.parquet")
    for f in (tmp_path / "e.jsonl", tmp_path / "e.parquet"):
        with pytest.raises(ValueError, match="split 'validation' of 'ccdv/pubmed-summarization' is empty"):
            load_corpus("ccdv/pubmed-summarization", "validation", data_files={"validation": f}, streaming=streaming)
    with pytest.raises(ValueError, match="cannot tell the format"):
        load_corpus("proof-pile", "test", data_files={"test": tmp_path / "notes.txt"})


@pytest.mark.parametrize("name,split", [("austen", "train"), ("austen", "test"), ("stdlib", "validation"), ("aclsum", "validation")])
def test_offline_dataset_is_the_documents(name, split):
    ds, docs = load_corpus(name, split, as_dataset=True), load_corpus(name, split)
    assert isinstance(ds, datasets.Dataset) and ds.column_names[:3] == ["id", "title", "text"]
    assert as_documents(ds) == docs
    assert Path(ds.cache_files[0]["filename"]).is_relative_to(data.cache_dir("datasets"))  # memory-mapped Arrow in our cache
    assert as_documents(load_corpus(name, split, max_docs=2, as_dataset=True)) == docs[:2]
    assert isinstance(load_corpus(name, split, as_dataset=True, streaming=True), datasets.IterableDataset)


def test_aclsum_dataset_has_abstract_and_highlights():
    ds = load_corpus("aclsum", "validation", as_dataset=True)
    assert ds.column_names == ["id", "title", "text", "abstract", "aspect_summaries", "sentences", "highlights"]
    row = ds[0]
    assert row["abstract"] and set(row["highlights"]) == set(data.ACLSUM_ASPECTS) == set(row["aspect_summaries"])
    assert all(len(row["highlights"][a]) == len(row["sentences"]) and set(row["highlights"][a]) <= {0, 1} for a in data.ACLSUM_ASPECTS)
    assert any(sum(r[a]) for r in ds["highlights"] for a in data.ACLSUM_ASPECTS)


def test_arrow_cache_is_built_once(monkeypatch, private_cache, tmp_path):
    (tmp_path / "corpora").symlink_to(private_cache / "corpora", target_is_directory=True)
    monkeypatch.setenv("LONGCTX_CACHE", str(tmp_path))
    corpus_dataset("austen", "validation")
    stored = [p.name for p in (tmp_path / "datasets").iterdir()]
    assert len(stored) == 1 and stored[0].startswith(f"austen-validation-v{data.DATASET_FORMAT}-"), stored
    monkeypatch.setattr(data, "_offline_documents", lambda *a: pytest.fail("rebuilt a cached corpus dataset"))
    assert corpus_dataset("austen", "validation")["id"][:] == ["northangerabbey"]


def test_as_documents_bad_inputs():
    ds = documents_to_dataset([Document("a", "text a", "A", summary="s"), Document("b", "text b")])
    assert [d.summary for d in as_documents(ds)] == ["s", None] and as_documents([]) == []
    with pytest.raises(ValueError, match=r"missing \['text'\], found \['id', 'title', 'abstract'\]"):
        as_documents(ds.remove_columns("text"))
    with pytest.raises(TypeError, match="pass one split"):
        as_documents(datasets.DatasetDict(train=ds))
    with pytest.raises(TypeError, match="got one Document"):
        as_documents(Document("a", "x"))
    with pytest.raises(TypeError, match="found a str"):
        as_documents(["just text"])
    with pytest.raises(TypeError, match="got dict"):
        as_documents({"id": ["a"], "text": ["x"]})
    with pytest.raises(ValueError, match="same meta keys"):
        documents_to_dataset([Document("a", "x", meta=dict(k=1)), Document("b", "y")])
    with pytest.raises(ValueError, match="no documents"):
        documents_to_dataset([])


class CharTok:
    eos_token_id = 0
    def __call__(self, text, add_special_tokens=False): return {"input_ids": [ord(c) % 100 + 1 for c in text]}


def test_token_helpers_take_either_form():
    docs = [Document("a", "abcdefghij" * 30), Document("b", "klmnopqrst" * 50)]
    ds = documents_to_dataset(docs)
    assert (token_windows(ds, CharTok(), seq_len=64, n=4, seed=3) == token_windows(docs, CharTok(), seq_len=64, n=4, seed=3)).all()
    assert (next(packed_batches(ds, CharTok(), 32, 2, seed=1)) == next(packed_batches(docs, CharTok(), 32, 2, seed=1))).all()
