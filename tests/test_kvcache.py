"KV-cache framework (longctx_nb.kvcache): the layer contract and its states, the shared prefill, the wiring, every method class, bad inputs."
import warnings
from dataclasses import dataclass, fields
from typing import ClassVar
import pytest
import torch
import longctx_nb.core  # noqa: F401  (before triton)
from helpers import tiny_llama_config, assert_dropped_caches_are_freed
from longctx_nb.kvcache import (
    LayerState, PrefillRecord, TokenBuffer, attend, valid_from_mask, positions_from_mask, host_empty, HookedKVLayer, HookedKVCache,
    PrefillRecorder, record_prefill, record_window, KVMethod, BudgetedKV, KeptTokensLayer, ScoredEviction, FullKV, StreamingLLM,
    QuestPages, QuestLayer, SnapKV, H2O, eviction_mask, masked_decode_logits)

METHODS = [StreamingLLM, QuestPages, SnapKV, H2O]
GEN = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)


@pytest.fixture
def tiny():
    from helpers import tiny_llama
    return tiny_llama(num_hidden_layers=2, max_position_embeddings=1024)


def _ids(n, b=2, seed=0):
    return torch.randint(1, 128, (b, n), generator=torch.Generator().manual_seed(seed))


def _random_records(cfg, B, S, seed=0, queries=None):
    "Weightless records: random post-RoPE keys and values, and (when `queries`) that many last queries."
    g = torch.Generator().manual_seed(seed)
    Hkv, H, D = cfg.num_key_value_heads, cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    return [PrefillRecord(keys=torch.randn(B, Hkv, S, D, generator=g), values=torch.randn(B, Hkv, S, D, generator=g),
                          positions=torch.arange(S).expand(B, S),
                          queries=None if queries is None else torch.randn(B, H, queries, D, generator=g))
            for _ in range(cfg.num_hidden_layers)]


def _kept(cache, layer=0):
    "Which prompt tokens (indices into the record) a kept-tokens layer holds, per (b, h): matched by key rows."
    return cache.layers[layer].buf.k[:, :, :cache.layers[layer].buf.prefix]


# ---------------------------------------------------------------- pieces

def test_valid_from_mask():
    m = torch.ones(2, 1, 4, 6, dtype=torch.bool); m[1, :, :, :2] = False
    assert valid_from_mask(m, 2, 6).tolist() == [[True] * 6, [False, False] + [True] * 4]
    assert valid_from_mask(torch.ones(2, 1, 4, 6, dtype=torch.bool), 2, 6) is None
    assert valid_from_mask(None, 2, 6) is None
    m[0, :, :, -1] = False
    with pytest.raises(ValueError, match="left padding"): valid_from_mask(m, 2, 6)


def test_positions_from_mask():
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    assert positions_from_mask(mask).tolist() == [[0, 1, 2, 3], [0, 0, 0, 1]]


def test_attend_is_causal_gqa_attention_with_padding():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 4, 2, 8, generator=g), torch.randn(1, 2, 5, 8, generator=g), torch.randn(1, 2, 5, 8, generator=g)
    valid = torch.tensor([[[False, True, True, True, True]] * 2])
    out = attend(q, k, v, 8 ** -0.5, valid)
    assert out.shape == (1, 2, 4, 8)
    for h in range(4):
        kh = h // 2
        for l, n in ((0, 4), (1, 5)):                                        # query l sees keys 1 .. n-1 (padding out, causal)
            s = (q[0, h, l] @ k[0, kh, 1:n].T * 8 ** -0.5).softmax(-1)
            torch.testing.assert_close(out[0, l, h], s @ v[0, kh, 1:n], rtol=1e-5, atol=1e-5)


def test_token_buffer_grows_the_decode_region_only():
    buf = TokenBuffer(torch.zeros(1, 1, 1000, 4), torch.zeros(1, 1, 1000, 4), extra=8)
    assert buf.k.shape[2] == 1008
    for _ in range(9): buf.append(torch.ones(1, 1, 1, 4), torch.ones(1, 1, 1, 4))
    assert buf.len == 1009 and 1009 <= buf.k.shape[2] <= 1008 + 256 and buf.k[0, 0, 1000:1009].eq(1).all()
    k, v, valid = buf.view()
    assert k.shape[2] == 1009 and valid is None


def test_host_empty_is_exact():
    t = host_empty((3, 5, 7), torch.bfloat16)
    assert t.shape == (3, 5, 7) and t.dtype == torch.bfloat16 and t.device.type == "cpu"
    assert t.untyped_storage().nbytes() == 3 * 5 * 7 * 2
    assert host_empty((0, 4), torch.float32).numel() == 0
    assert host_empty((2, 2), torch.float32, fill=lambda x: x.fill_(3)).eq(3).all()


# ---------------------------------------------------------------- the layer contract, the cache, the wiring

def test_states_through_a_prefill_and_the_short_prefill_fallback(tiny):
    ids = _ids(40)
    cache = SnapKV(budget=16).make_cache(tiny)
    assert all(l.state is LayerState.EMPTY for l in cache.layers)
    with torch.no_grad(): tiny.generate(ids, **GEN, past_key_values=cache)
    assert all(l.state is LayerState.COMPRESSED for l in cache.layers) and cache.get_seq_length() == 40 + 5
    cache.detach()
    with torch.no_grad():
        ref = tiny.generate(ids, **GEN)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            with SnapKV(budget=16, min_prefill=64).make_cache(tiny) as cache: out = tiny.generate(ids, **GEN, past_key_values=cache)
    assert len([x for x in w if "min_prefill" in str(x.message)]) == 1 and torch.equal(out, ref)
    assert all(l.state is LayerState.EXACT for l in cache.layers)
    assert SnapKV(budget=16, min_prefill=64).attended_tokens(40) == 40


def test_a_layer_without_compress_says_what_is_missing():
    cfg = tiny_llama_config()
    cache = HookedKVCache(model_config=cfg)
    with pytest.raises(NotImplementedError, match="compress"): cache.load_prefill(_random_records(cfg, 1, 8))


def test_record_prefill_is_the_exact_forward_and_keeps_what_methods_read(tiny):
    ids = _ids(50)
    with torch.no_grad():
        logits, recs = record_prefill(tiny, ids)
        _, all_q = record_prefill(tiny, ids, window=None)
        torch.testing.assert_close(logits, tiny(ids).logits[:, -1], rtol=1e-5, atol=1e-5)
    assert len(recs) == 2 and recs[0].queries.shape == (2, 4, 32, 16) and all_q[0].queries.shape == (2, 4, 50, 16)
    assert recs[0].k_pre.shape == (2, 50, 32) and recs[0].valid is None and tiny.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="window"): PrefillRecorder(tiny, window=0)


def test_record_then_load_equals_online(tiny):
    from longctx_nb.evals import greedy_generate
    ids = _ids(120)
    for method in (SnapKV(budget=24), QuestPages(budget=32), H2O(budget=24)):
        with torch.no_grad():
            with method.make_cache(tiny) as c: online = tiny.generate(ids, **GEN, past_key_values=c)[:, 120:]
            logits, recs = record_prefill(tiny, ids, window=record_window([method]))
            with method.make_cache(tiny) as c:
                c.load_prefill(recs)
                offline = greedy_generate(tiny, ids, stop_ids=(), max_new_tokens=GEN["max_new_tokens"], cache=c, first_logits=logits)
        assert torch.equal(online, torch.tensor(offline)), method.label


def test_detach_and_garbage_collection_restore_the_model(tiny):
    ids = _ids(50)
    with torch.no_grad():
        ref = tiny(ids).logits
        cache = FullKV().make_cache(tiny)
        assert tiny.config._attn_implementation == "longctx"
        del cache                                                                 # hooks hold weak references only
        torch.testing.assert_close(tiny(ids).logits, ref, rtol=1e-5, atol=1e-5)
        FullKV().make_cache(tiny).detach()
        assert tiny.config._attn_implementation == "sdpa"


def test_a_dropped_cache_is_freed_at_once(tiny):
    assert_dropped_caches_are_freed(tiny, [lambda: QuestPages(budget=32).make_cache(tiny), lambda: H2O(budget=32).make_cache(tiny)],
                                    _ids(100), **GEN)


def test_a_second_cache_takes_over_and_an_unattached_one_says_so(tiny):
    ids = _ids(50)
    first, second = FullKV().make_cache(tiny), FullKV().make_cache(tiny)
    with torch.no_grad():
        tiny.generate(ids, **GEN, past_key_values=second)
        with pytest.raises(RuntimeError, match="attached"): tiny.generate(ids, **GEN, past_key_values=first)
    second.detach()
    with pytest.raises(TypeError, match="model_config"): HookedKVCache()


def test_unsupported_cache_operations_are_refused_by_name(tiny):
    cache = FullKV().make_cache(model_config=tiny_llama_config()).load_prefill(_random_records(tiny_llama_config(), 1, 8))
    layer = cache.layers[0]
    with pytest.raises(NotImplementedError, match="num_beams=1"): layer.reorder_cache(torch.tensor([0]))
    with pytest.raises(NotImplementedError, match="cropped"): layer.crop(1)
    with pytest.raises(ValueError, match="repeats"): layer.batch_repeat_interleave(0)
    with pytest.raises(RuntimeError, match="empty cache"): cache.load_prefill(_random_records(tiny_llama_config(), 1, 8))
    with pytest.raises(ValueError, match="records for"): FullKV().make_cache(model_config=tiny_llama_config()).load_prefill(_random_records(tiny_llama_config(), 1, 8)[:1])


@pytest.mark.parametrize("method", [FullKV(reserve_tokens=2), QuestPages(budget=48, reserve_tokens=2), SnapKV(budget=40, reserve_tokens=2),
                                    H2O(budget=40, reserve_tokens=2)], ids=lambda m: m.label)
def test_batch_repeat_of_a_filled_cache_decodes_like_the_original(method):
    cfg = tiny_llama_config()
    B, S, H, Hkv = 2, 160, cfg.num_attention_heads, cfg.num_key_value_heads
    D = cfg.hidden_size // H
    make = lambda: method.make_cache(model_config=cfg).load_prefill(_random_records(cfg, B, S, queries=S))
    one, rep = make(), make()
    rep.batch_repeat_interleave(3)
    g = torch.Generator().manual_seed(7)
    r = lambda t: t.repeat_interleave(3, 0)
    for _ in range(4):                                                 # past reserve_tokens=2: the buffers grow on the way
        q, k1, v1 = torch.randn(B, H, 1, D, generator=g), torch.randn(B, Hkv, 1, D, generator=g), torch.randn(B, Hkv, 1, D, generator=g)
        for layer in range(cfg.num_hidden_layers):
            torch.testing.assert_close(rep.step(layer, r(q), r(k1), r(v1)), r(one.step(layer, q, k1, v1)), rtol=1e-5, atol=1e-5)
    assert rep.get_seq_length() == one.get_seq_length() == S + 4


# ---------------------------------------------------------------- methods

@pytest.mark.parametrize("cls", METHODS, ids=lambda c: c.__name__)
def test_methods_with_room_for_everything_are_full_attention(tiny, cls):
    ids = _ids(70)
    with torch.no_grad():
        ref = tiny.generate(ids, **GEN)
        with cls(budget=70).make_cache(tiny, 70) as c: out = tiny.generate(ids, **GEN, past_key_values=c)
        with cls(budget=1.0).make_cache(tiny, 70) as c: out_frac = tiny.generate(ids, **GEN, past_key_values=c)
    assert torch.equal(out, ref) and torch.equal(out_frac, ref)


@pytest.mark.parametrize("cls", METHODS, ids=lambda c: c.__name__)
def test_methods_at_a_small_budget_keep_the_budget(tiny, cls):
    ids = _ids(200, b=1)
    m = cls(budget=48)
    with torch.no_grad(), m.make_cache(tiny, 200) as c:
        out = tiny.generate(ids, **GEN, past_key_values=c)
        kept = c.layers[0].buf.prefix
    assert out.shape == (1, 200 + GEN["max_new_tokens"]) and m.attended_tokens(200) == 48
    assert kept == (200 if cls is QuestPages else 48)
    assert m.label == f"{cls.name}@48t" and cls(budget=0.25).label == f"{cls.name}@0.25" and cls(budget=0.25).attended_tokens(200) == 50


def test_full_kv():
    m = FullKV()
    assert m.label == "full" and m.attended_tokens(1234) == 1234 and m.budget_tokens(7) == 7


def test_streaming_keeps_sinks_and_window(tiny):
    ids = _ids(100, b=1)
    with torch.no_grad():
        _, recs = record_prefill(tiny, ids)
    c = StreamingLLM(budget=20).make_cache(model_config=tiny.config).load_prefill(recs)
    torch.testing.assert_close(_kept(c, 1), torch.cat([recs[1].keys[:, :, :4], recs[1].keys[:, :, -16:]], 2))


def test_streaming_sinks_are_the_first_real_tokens_of_a_left_padded_row():
    cfg = tiny_llama_config()
    rec = _random_records(cfg, 2, 40)
    valid = torch.ones(2, 40, dtype=torch.bool); valid[1, :8] = False
    rec = [PrefillRecord(keys=r.keys, values=r.values, positions=r.positions, valid=valid) for r in rec]
    idx = StreamingLLM(budget=10, n_sink=2).keep(rec[0], 10)
    assert idx[0, 0].tolist() == [0, 1] + list(range(32, 40)) and idx[1, 0].tolist() == [8, 9] + list(range(32, 40))


def test_streaming_keeps_each_token_once_in_a_short_padded_row():
    "12 real tokens of 20 at a budget of 16: the sinks fall inside the recent window, and each position is kept once."
    rec = _random_records(tiny_llama_config(), 2, 20)[0]
    valid = torch.ones(2, 20, dtype=torch.bool); valid[1, :8] = False
    rec = PrefillRecord(keys=rec.keys, values=rec.values, positions=rec.positions, valid=valid)
    idx = StreamingLLM(budget=16).keep(rec, 16)
    assert all(len(set(row)) == 16 and row == sorted(row) for row in idx.flatten(0, 1).tolist())
    assert idx[0, 0].tolist() == [0, 1, 2, 3] + list(range(8, 20)) and set(range(8, 20)) <= set(idx[1, 0].tolist())


def test_streaming_short_padded_row_attends_like_full_attention():
    "A budget covering a padded row's real tokens: its decode step is exact attention over them (sinks not counted twice)."
    cfg = tiny_llama_config(num_hidden_layers=1)
    B, S, H, Hkv, D = 2, 20, 4, 2, 16
    rec = _random_records(cfg, B, S)[0]
    valid = torch.ones(B, S, dtype=torch.bool); valid[1, :8] = False
    rec = PrefillRecord(keys=rec.keys, values=rec.values, positions=rec.positions, valid=valid)
    cache = StreamingLLM(budget=16).make_cache(model_config=cfg).load_prefill([rec])
    g = torch.Generator().manual_seed(5)
    q, k1, v1 = torch.randn(B, H, 1, D, generator=g), torch.randn(B, Hkv, 1, D, generator=g), torch.randn(B, Hkv, 1, D, generator=g)
    out = cache.step(0, q, k1, v1)
    ref = attend(q[1:], torch.cat([rec.keys[1:, :, 8:], k1[1:]], 2), torch.cat([rec.values[1:, :, 8:], v1[1:]], 2), D ** -0.5)
    torch.testing.assert_close(out[1:], ref, rtol=1e-5, atol=1e-5)


def test_quest_selects_the_page_with_the_largest_bound():
    cfg = tiny_llama_config(num_attention_heads=2, num_key_value_heads=1, hidden_size=32, num_hidden_layers=1)
    S, D = 64, 16
    keys = torch.zeros(1, 1, S, D); keys[0, 0, 37, 0] = 5.0                      # page 2 (of 16 tokens) holds the one aligned key
    rec = PrefillRecord(keys=keys, values=torch.randn(1, 1, S, D), positions=torch.arange(S)[None])
    cache = QuestPages(budget=16, page_size=16).make_cache(model_config=cfg).load_prefill([rec])
    q = torch.zeros(1, 2, 1, D); q[..., 0] = 1.0
    assert isinstance(cache.layers[0], QuestLayer) and cache.layers[0].select_pages(q).tolist() == [[[2]]]


def test_snapkv_keeps_its_window_and_what_the_window_attends_to():
    cfg = tiny_llama_config(num_attention_heads=2, num_key_value_heads=1, hidden_size=32, num_hidden_layers=1)
    S, D = 64, 16
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 1, S, D, generator=g) * 0.1; keys[0, 0, 11, 0] = 6.0
    q = torch.randn(1, 2, 8, D, generator=g) * 0.1; q[..., 0] = 2.0
    rec = PrefillRecord(keys=keys, values=torch.randn(1, 1, S, D, generator=g), positions=torch.arange(S)[None], queries=q)
    idx = SnapKV(budget=16, window=8, pool_kernel=1).keep(rec, 16)[0, 0].tolist()
    assert 11 in idx and idx[-8:] == list(range(56, 64)) and len(idx) == 16 and idx == sorted(idx)
    with pytest.raises(ValueError, match="last queries"):
        SnapKV(budget=16).score(PrefillRecord(keys=keys, values=keys, positions=torch.arange(S)[None]), 16)


def _snapkv_by_hand(q, k, w, kernel, pooling):
    "SnapKV's score by explicit loops: per query head, the window's attention to each earlier key (softmax over all keys, causal"
    "in the window), pooled over +-kernel//2 neighbours (zero padding; avg divides by kernel), then averaged over the GQA group."
    B, H, _, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G, r = H // Hkv, kernel // 2
    out = torch.zeros(B, Hkv, S, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            votes = torch.zeros(S - w, dtype=torch.float64)
            for i in range(w):
                row = S - w + i                                           # the query's position: keys 0 .. row
                s = torch.tensor([float(q[b, h, q.shape[2] - w + i].double() @ k[b, h // G, j].double()) / D ** 0.5 for j in range(row + 1)])
                votes += s.softmax(0)[:S - w]
            pad = torch.cat([torch.zeros(r, dtype=torch.float64), votes, torch.zeros(r, dtype=torch.float64)])
            pooled = torch.stack([pad[j:j + kernel].mean() if pooling == "avg" else pad[j:j + kernel].max() for j in range(S - w)])
            out[b, h // G, :S - w] += pooled / G
    out[..., S - w:] = float("inf")
    return out


@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_snapkv_score_equals_a_hand_computation(pooling):
    g = torch.Generator().manual_seed(4)
    B, H, Hkv, S, D, w = 2, 4, 2, 20, 8, 5
    q, k = torch.randn(B, H, 7, D, generator=g), torch.randn(B, Hkv, S, D, generator=g)
    rec = PrefillRecord(keys=k, values=k, positions=torch.arange(S).expand(B, S), queries=q)
    got = SnapKV(budget=12, window=w, pool_kernel=3, pooling=pooling).score(rec, 12)    # window = min(5, 12 // 2)
    torch.testing.assert_close(got.double(), _snapkv_by_hand(q, k, w, 3, pooling), rtol=1e-5, atol=1e-6)


def test_snapkv_bad_knobs_and_a_budget_covering_the_prompt():
    with pytest.raises(ValueError, match="pooling must be"): SnapKV(budget=8, pooling="median")
    with pytest.raises(ValueError, match="pool_kernel must be odd"): SnapKV(budget=8, pool_kernel=4)
    with pytest.raises(ValueError, match="window must be an int"): SnapKV(budget=8, window=0)
    with pytest.raises(ValueError, match="window must be an int"): SnapKV(budget=8, window=True)
    cfg = tiny_llama_config()
    c = SnapKV(budget=1.0).make_cache(model_config=cfg).load_prefill(_random_records(cfg, 1, 20))   # nothing to rank: no queries needed
    assert c.layers[0].buf.prefix == 20


def test_masked_decode_logits_with_every_token_kept_is_the_plain_model(tiny):
    "The reference itself: full attention masked to every prompt token is the model's own forward over prompt + fed tokens."
    S, T = 40, 5
    ids, new = _ids(S), _ids(T, seed=1)
    with torch.no_grad():
        _, recs = record_prefill(tiny, ids)
        plain = tiny(torch.cat([ids, new], 1)).logits[:, S:]
    every = [torch.ones(r.keys.shape[:3], dtype=torch.bool) for r in recs]
    torch.testing.assert_close(masked_decode_logits(tiny, recs, every, new), plain, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="kept masks for"): masked_decode_logits(tiny, recs, every[:1], new)
    with pytest.raises(ValueError, match=r"kept\[0\] is"): masked_decode_logits(tiny, recs, [e[:, :, 1:] for e in every], new)
    with pytest.raises(ValueError, match="tokens must be"): masked_decode_logits(tiny, recs, every, new[0])
    with pytest.raises(TypeError, match="no keep"): eviction_mask(QuestPages(budget=16), recs[0])
    assert eviction_mask(SnapKV(budget=1.0), recs[0]).all() and eviction_mask(StreamingLLM(budget=8), recs[0]).sum(-1).eq(8).all()


@pytest.mark.parametrize("method", [StreamingLLM(budget=24), SnapKV(budget=24, window=8), SnapKV(budget=0.25, pooling="max"), H2O(budget=24)],
                         ids=lambda m: f"{m.label}-{getattr(m, 'pooling', '')}")
def test_eviction_decode_equals_full_attention_masked_to_the_kept_tokens(tiny, method):
    "The cache is right (positions of new tokens, RoPE of kept keys, GQA, reserve growth): decoding from the kept tokens equals"
    "full attention restricted to them by an explicit mask, so an eviction's accuracy is the accuracy of its choice."
    S, T = 96, 6
    ids, new = _ids(S), _ids(T, seed=1)
    with torch.no_grad():
        _, recs = record_prefill(tiny, ids, window=None)
    m = type(method)(**{**{f.name: getattr(method, f.name) for f in fields(method)}, "reserve_tokens": 2})   # grows on the way
    n = m.budget_tokens(S)
    kept = [eviction_mask(m, r) for r in recs]
    with torch.no_grad(), m.make_cache(tiny, S) as c:
        c.load_prefill(recs)
        got = torch.cat([tiny(input_ids=new[:, t:t + 1], position_ids=torch.full((2, 1), S + t), past_key_values=c).logits for t in range(T)], 1)
    assert all(int(k.sum(-1).min()) == n < S for k in kept)
    torch.testing.assert_close(got, masked_decode_logits(tiny, recs, kept, new), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- H2O

def _h2o_by_hand(q, k, recent_n, n):
    "Accumulated attention by explicit loops: for every query position i and head h, softmax over keys 0..i, added to each key."
    B, H, S, D = q.shape
    Hkv = k.shape[1]
    acc = torch.zeros(B, Hkv, S, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(S):
                s = torch.tensor([float(q[b, h, i].double() @ k[b, h // (H // Hkv), j].double()) / D ** 0.5 for j in range(i + 1)])
                acc[b, h // (H // Hkv), :i + 1] += s.softmax(0)
    heavy = acc[..., :S - recent_n].topk(n - recent_n, -1).indices
    return acc, [sorted(heavy[b, h].tolist() + list(range(S - recent_n, S))) for b in range(B) for h in range(Hkv)]


def test_h2o_ranking_equals_a_hand_computation():
    g = torch.Generator().manual_seed(3)
    B, H, Hkv, S, D = 2, 4, 2, 12, 8
    q, k = torch.randn(B, H, S, D, generator=g), torch.randn(B, Hkv, S, D, generator=g)
    rec = PrefillRecord(keys=k, values=torch.randn(B, Hkv, S, D, generator=g), positions=torch.arange(S).expand(B, S), queries=q)
    acc, kept = _h2o_by_hand(q, k, recent_n=3, n=6)
    m = H2O(budget=6)                                                  # recent = round(0.5 * 6) = 3
    torch.testing.assert_close(H2O.accumulated_attention(rec, block=5).double(), acc, rtol=1e-5, atol=1e-6)   # odd block: the loop must not matter
    assert [r for row in m.keep(rec, 6).tolist() for r in row] == kept


def test_h2o_accumulates_once_per_record_and_each_budget_sets_its_own_recent_window():
    g = torch.Generator().manual_seed(4)
    B, H, Hkv, S, D = 1, 4, 2, 16, 8
    q, k = torch.randn(B, H, S, D, generator=g), torch.randn(B, Hkv, S, D, generator=g)
    rec = PrefillRecord(keys=k, values=k, positions=torch.arange(S)[None], queries=q)
    acc, _ = _h2o_by_hand(q, k, recent_n=0, n=4)
    wide = H2O(budget=12, recent=0.5).score(rec, 12)                  # the last 6 tokens at +inf
    assert torch.isinf(wide[..., -6:]).all() and torch.isfinite(wide[..., :-6]).all()
    memo = rec.memo["accumulated_attention"]
    narrow = H2O(budget=4, recent=0.0).score(rec, 4)                  # a later budget on the same record: no +inf left from the first
    torch.testing.assert_close(narrow.double(), acc, rtol=1e-5, atol=1e-6)
    assert H2O.accumulated_attention(rec) is memo and torch.isfinite(memo).all()


def test_h2o_keeps_the_budget_the_recent_window_and_the_heavy_hitter(tiny):
    S, D = 80, 16
    g = torch.Generator().manual_seed(1)
    cfg = tiny_llama_config(num_attention_heads=2, num_key_value_heads=1, hidden_size=32, num_hidden_layers=1)
    keys = torch.randn(1, 1, S, D, generator=g) * 0.1; keys[0, 0, 30, 0] = 6.0
    q = torch.randn(1, 2, S, D, generator=g) * 0.1; q[..., 0] = 2.0
    rec = PrefillRecord(keys=keys, values=torch.randn(1, 1, S, D, generator=g), positions=torch.arange(S)[None], queries=q)
    for budget, recent in ((20, 0.5), (20, 0.25), (0.25, 0.5)):
        m = H2O(budget=budget, recent=recent)
        cache = m.make_cache(model_config=cfg).load_prefill([rec])
        n = m.attended_tokens(S)
        idx = m.keep(rec, n)[0, 0].tolist()
        n_recent = round(recent * n)
        assert cache.layers[0].buf.prefix == n == 20 and len(set(idx)) == n
        assert idx[-n_recent:] == list(range(S - n_recent, S)) and 30 in idx
    # through generate on the tiny model: the online cache records every query for it
    ids = _ids(90, b=1)
    with torch.no_grad(), H2O(budget=30).make_cache(tiny) as c:
        tiny.generate(ids, **GEN, past_key_values=c)
        assert c.query_window is None and c.layers[0].buf.prefix == 30


def test_h2o_ignores_padding():
    g = torch.Generator().manual_seed(2)
    B, H, Hkv, S, D = 1, 2, 1, 16, 8
    q, k = torch.randn(B, H, S, D, generator=g), torch.randn(B, Hkv, S, D, generator=g)
    valid = torch.ones(B, S, dtype=torch.bool); valid[0, :5] = False
    rec = PrefillRecord(keys=k, values=k, positions=torch.arange(S)[None], valid=valid, queries=q)
    idx = H2O(budget=6).keep(rec, 6)[0, 0].tolist()
    assert all(i >= 5 for i in idx)
    alone = PrefillRecord(keys=k[:, :, 5:], values=k[:, :, 5:], positions=torch.arange(S - 5)[None], queries=q[:, :, 5:])
    torch.testing.assert_close(H2O(budget=6, recent=0.0).score(rec, 6)[..., 5:], H2O(budget=6, recent=0.0).score(alone, 6), rtol=1e-5, atol=1e-6)


def test_h2o_bad_inputs():
    with pytest.raises(ValueError, match="recent"): H2O(budget=8, recent=1.0)
    with pytest.raises(ValueError, match="recent"): H2O(budget=8, recent=-0.1)
    rec = _random_records(tiny_llama_config(), 1, 20, queries=4)[0]
    with pytest.raises(ValueError, match="window=None"): H2O(budget=8).score(rec, 8)
    with pytest.raises(ValueError, match="at least 2 tokens"): H2O(budget=1).make_cache(model_config=tiny_llama_config(), prefill_len=20)


# ---------------------------------------------------------------- budgets, equal budgets, a new method

def test_budget_validation():
    with pytest.raises(ValueError, match="fraction of the prefill"): SnapKV(budget=1.5)
    with pytest.raises(ValueError, match="fraction of the prefill"): SnapKV(budget=0.0)
    with pytest.raises(ValueError, match="number of tokens"): StreamingLLM(budget=0)
    with pytest.raises(TypeError, match="budget must be"): QuestPages(budget="2%")
    with pytest.raises(TypeError, match="budget must be"): QuestPages(budget=True)
    with pytest.raises(ValueError, match="min_prefill"): SnapKV(budget=8, min_prefill=0)
    with pytest.raises(ValueError, match="reserve_tokens"): SnapKV(budget=8, reserve_tokens=-1)
    cfg = tiny_llama_config()
    with pytest.raises(ValueError, match="at least 5 tokens"): StreamingLLM(budget=4).make_cache(model_config=cfg, prefill_len=100)
    with pytest.raises(ValueError, match="at least 16 tokens"): QuestPages(budget=8).make_cache(model_config=cfg, prefill_len=100)
    with pytest.raises(ValueError, match="at least 16 tokens"):                  # a fraction too small for this prefill, at load time
        QuestPages(budget=0.01).make_cache(model_config=cfg).load_prefill(_random_records(cfg, 1, 100))
    QuestPages(budget=8).make_cache(model_config=cfg, prefill_len=8)              # a budget covering the prompt is always fine


def test_a_method_as_the_budget_of_another_and_record_window():
    m = SnapKV(budget=StreamingLLM(budget=0.25))
    assert m.attended_tokens(96) == 24 and m.attended_tokens(1000) == 250 and m.label == "snapkv@0.25"
    assert SnapKV(budget=FullKV()).attended_tokens(77) == 77
    assert record_window([FullKV()]) == 32 and record_window([SnapKV(window=48), QuestPages()]) == 48
    assert record_window([SnapKV(), H2O()]) is None and record_window([]) == 32


def test_a_new_scored_method_is_one_small_class():
    "Keep the tokens with the largest key norm: score() is all a new eviction writes."
    @dataclass(frozen=True)
    class KeyNorm(ScoredEviction):
        name: ClassVar[str] = "keynorm"
        def score(self, rec, n): return rec.keys.float().norm(dim=-1)
    cfg = tiny_llama_config()
    recs = _random_records(cfg, 2, 40)
    c = KeyNorm(budget=10).make_cache(model_config=cfg).load_prefill(recs)
    norms = recs[0].keys.norm(dim=-1)
    expect = norms.topk(10, -1).indices.sort(-1).values
    got = recs[0].keys.gather(2, expect[..., None].expand(-1, -1, -1, recs[0].keys.shape[-1]))
    torch.testing.assert_close(_kept(c), got)
    assert KeyNorm(budget=10).label == "keynorm@10t"

    @dataclass(frozen=True)
    class Broken(ScoredEviction):
        def score(self, rec, n): return rec.keys[..., 0, 0]
    with pytest.raises(ValueError, match="score returned"): Broken(budget=10).make_cache(model_config=cfg).load_prefill(recs)


def test_kv_method_base_says_what_is_missing():
    with pytest.raises(NotImplementedError, match="attends to"): KVMethod().attended_tokens(10)
    with pytest.raises(NotImplementedError, match="score"): ScoredEviction(budget=4).score(None, 4)


# ---------------------------------------------------------------- CUDA

@pytest.mark.gpu
@pytest.mark.parametrize("cls", METHODS, ids=lambda c: c.__name__)
def test_cuda_methods_through_generate(tiny, cls):
    m = tiny.cuda()
    ids = _ids(150).cuda()
    with torch.no_grad():
        ref = m.generate(ids, **GEN)
        with cls(budget=150).make_cache(m, 150) as c: assert torch.equal(m.generate(ids, **GEN, past_key_values=c), ref)
        with cls(budget=32).make_cache(m, 150) as c:
            out = m.generate(ids, **GEN, past_key_values=c)
            assert out.shape == ref.shape and c.layers[0].buf.k.is_cuda
