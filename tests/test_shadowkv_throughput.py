"ShadowKV at 8B scale: the memory model against built caches, the caps, the bandwidth formulas, the Llama-3-8B shape."
import dataclasses
import math
from pathlib import Path
import pytest
import torch
import longctx_nb.core  # noqa: F401  (before triton)
from longctx_nb.shadowkv import ShadowKVConfig, shadowkv_layout
from longctx_nb.shadowkv_throughput import (llama_config, random_llama, footprint, batch_caps, synthetic_prefill, constructed_cache,
                                            decode_speed, equivalent_bandwidth, predicted_step_ms, LLAMA3_8B)

TOY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)

@pytest.fixture(scope="module")
def toy():
    return random_llama(llama_config(**TOY), "cpu", torch.float32)

def test_llama3_8b_shape_has_8b_parameters():
    with torch.device("meta"):
        from transformers import LlamaForCausalLM
        m = LlamaForCausalLM(llama_config())
    assert abs(sum(p.numel() for p in m.parameters()) - 8.030e9) < 0.001e9
    assert m.config.num_key_value_heads == 8 and m.config.head_dim == 128 and m.config.num_hidden_layers == 32

@pytest.mark.parametrize("method,kw", [("full", {}), ("shadowkv", {}), ("shadowkv", dict(value_dtype="fp8")),
                                       ("shadowkv", dict(outliers=0, local_chunks=0))], ids=["full", "shadowkv", "fp8", "no-outliers"])
def test_footprint_is_what_a_built_cache_holds(toy, method, kw):
    S, B = 520, 3                                                     # not a multiple of the chunk size
    st = ShadowKVConfig(budget=48, rank=12, min_prefill=64, reserve_tokens=5, **kw) if method == "shadowkv" else None
    rec = synthetic_prefill(toy, S, rank=12)
    cache = constructed_cache(toy, rec, B, method, st, reserve_tokens=5)
    try:
        fp = footprint(toy.config, S, method, st, dtype_bytes=4, reserve_tokens=5)
        assert cache.gpu_bytes() == B * fp["gpu"] and cache.host_bytes() == B * fp["host"]
        speed = decode_speed(toy, cache, B, S, n_tokens=3, warmup=1)
        assert speed["tok_s"] > 0 and cache.get_seq_length() == S + 4
    finally:
        cache.detach()

def test_synthetic_keys_are_low_rank_and_roped(toy):
    rec = synthetic_prefill(toy, 256, rank=6, noise=0.0)
    s = torch.linalg.svdvals(rec.k_pre[0].float())
    assert (s[6:] < 1e-4 * s[0]).all()                               # rank 6 exactly without noise
    assert rec.keys.shape == (1, 2, 256, 16) and torch.equal(rec.positions[0], torch.arange(256))

def test_batch_caps():
    caps = batch_caps(dict(gpu=10, host=100), gpu_free=105, host_free=450, workspace_per_seq=5)
    assert caps == dict(gpu_cap=7, host_cap=4, cap=4)
    assert batch_caps(dict(gpu=10, host=0), 105, 0, max_batch=3)["cap"] == 3

def test_equivalent_bandwidth_formula():
    lay = shadowkv_layout(122880, ShadowKVConfig(budget=2048, rank=160))
    # all hits: 2S / (S/C + 2(K+O)C) times the GPU bandwidth
    want = 2 * 122880 / (122880 / 8 + 2 * (lay.selected_chunks + lay.outlier_chunks) * 8)
    assert equivalent_bandwidth(122880, lay, 1.0, 1.0, 1.0) == pytest.approx(want)
    # misses cost B_gpu/B_pcie more per fetched token: lower equivalent bandwidth, monotone in the hit rate
    e = [equivalent_bandwidth(122880, lay, a, 3000.0, 25.0) for a in (0.0, 0.5, 0.9)]
    assert e[0] < e[1] < e[2] < 3000.0 * want

def test_predicted_step_ms_orders_methods():
    cfg = llama_config()
    bw = dict(hbm=6000.0, uva_gather=25.0)
    st = ShadowKVConfig(budget=2048, rank=160)
    full = predicted_step_ms(cfg, 122880, 3, "full", None, bw, weight_bytes=16e9)
    assert full == pytest.approx(1e3 * (16e9 + 3 * 32 * 2 * 8 * 128 * 122880 * 2) / 3e12)
    s0, s6 = (predicted_step_ms(cfg, 122880, 13, "shadowkv", st, bw, a, 16e9) for a in (0.0, 0.6))
    assert s6 < s0

def test_decode_speed_bad_inputs(toy):
    with pytest.raises(ValueError, match="inputs"): decode_speed(toy, None, 1, 10, 1, inputs="greedy")


# ---------------------------------------------------------------- the static-shape decode (CUDA-graph path)
from longctx_nb.kvcache import FullKV
from longctx_nb.shadowkv import ShadowKV
from longctx_nb.evals import greedy_generate
from longctx_nb.shadowkv_throughput import StaticDecoder, fast_generate, require_batch_fits

STATIC_METHODS = {"full": FullKV(), "shadowkv": ShadowKV(budget=32, rank=16, chunk_size=4, outliers=2, local_chunks=2, min_prefill=64)}

@pytest.fixture(scope="module")
def varied():
    "The toy model with larger random weights: its greedy tokens vary (at the default init it repeats one id)."
    m = random_llama(llama_config(**TOY), "cpu", torch.float32, seed=1)
    for p in m.parameters(): p.data.mul_(15)
    return m

def _prompt(B=2, S=161, seed=0, dev="cpu"):
    return torch.randint(256, (B, S), generator=torch.Generator().manual_seed(seed)).to(dev)

def _prefilled(model, kv, ids):
    cache = kv.make_cache(model)
    model(input_ids=ids, past_key_values=cache, use_cache=True)
    return cache

@pytest.mark.parametrize("method", list(STATIC_METHODS))
def test_fast_generate_equals_eager_greedy(varied, method):
    ids, kv = _prompt(), STATIC_METHODS[method]
    eager = torch.tensor(greedy_generate(varied, ids, stop_ids=[], max_new_tokens=16, cache=kv.make_cache(varied)))
    static = fast_generate(varied, ids, kv.make_cache(varied), 16)
    assert len(set(eager.flatten().tolist())) > 4          # the comparison is between varied sequences, not one repeated id
    assert torch.equal(eager, static)

@pytest.mark.parametrize("method", list(STATIC_METHODS))
def test_static_step_teacher_forced_matches_eager_and_counts_hits(varied, method):
    ids, kv = _prompt(seed=1), STATIC_METHODS[method]
    forced = torch.randint(256, (10, 2, 1), generator=torch.Generator().manual_seed(2))
    c = _prefilled(varied, kv, ids)
    eager = [varied(input_ids=forced[t], position_ids=torch.full((2, 1), ids.shape[1] + t), past_key_values=c,
                    use_cache=True).logits[:, -1].argmax(-1) for t in range(10)]
    eager_stats = c.stats() if method == "shadowkv" else None
    dec = StaticDecoder(varied, _prefilled(varied, kv, ids), 2, 10)
    static = [dec.step(forced[t])[:, 0].clone() for t in range(10)]
    assert torch.equal(torch.stack(eager), torch.stack(static))
    st = dec.stats()
    if method == "shadowkv":
        assert st["chunk_lookups"] == eager_stats["chunk_lookups"] and 0 < st["hit_rate"] < 1
        assert st["hit_rate"] == pytest.approx(eager_stats["hit_rate"], abs=1e-12)
    else: assert st["chunk_lookups"] == 0

@pytest.mark.parametrize("method", list(STATIC_METHODS))
def test_finish_hands_the_cache_back_to_eager_decoding(varied, method):
    ids, kv = _prompt(seed=3), STATIC_METHODS[method]
    ref = torch.tensor(greedy_generate(varied, ids, stop_ids=[], max_new_tokens=12, cache=kv.make_cache(varied)))
    cache = kv.make_cache(varied)
    first = fast_generate(varied, ids, cache, 6)             # 6 static steps, then eager steps through the same cache
    assert cache.get_seq_length() == ids.shape[1] - 1 + 6
    tok, rest = first[:, -1:], []
    for t in range(6):
        tok = varied(input_ids=tok, position_ids=torch.full((2, 1), ids.shape[1] + 5 + t), past_key_values=cache,
                     use_cache=True).logits[:, -1:].argmax(-1)
        rest.append(tok)
    assert torch.equal(torch.cat([first, *rest], 1), ref)

def test_reset_restores_the_state_after_prefill(varied):
    kv, ids = STATIC_METHODS["shadowkv"], _prompt(seed=4)
    forced = torch.randint(256, (4, 2, 1), generator=torch.Generator().manual_seed(5))
    dec = StaticDecoder(varied, _prefilled(varied, kv, ids), 2, 4)
    first = [dec.step(forced[t]).clone() for t in range(4)]
    hit = dec.stats()["hit_rate"]
    dec.reset()
    again = [dec.step(forced[t]).clone() for t in range(4)]
    assert torch.equal(torch.cat(first), torch.cat(again)) and dec.stats()["hit_rate"] == hit

def test_static_decoder_bad_inputs(varied):
    kv, ids = STATIC_METHODS["shadowkv"], _prompt()
    with pytest.raises(ValueError, match="CUDA graph capture needs"): StaticDecoder(varied, _prefilled(varied, kv, ids), 2, 4, graphs=True)
    with pytest.raises(ValueError, match="CUDA graph capture needs"): fast_generate(varied, ids, kv.make_cache(varied), 4, graphs=True)
    dec = StaticDecoder(varied, _prefilled(varied, kv, ids), 2, 2)
    with pytest.raises(ValueError, match=r"built for batch 2 .*got \(3, 1\)"): dec.step(torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"got \(2, 2\)"): dec.step(torch.zeros(2, 2, dtype=torch.long))
    dec.step(torch.zeros(2, 1, dtype=torch.long)); dec.step(torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="all are used"): dec.step(torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="holds batch 2"): StaticDecoder(varied, _prefilled(varied, kv, ids), 3, 2)
    with pytest.warns(UserWarning, match="shorter than min_prefill"): short = _prefilled(varied, kv, ids[:, :40])
    with pytest.raises(ValueError, match="EXACT"): StaticDecoder(varied, short, 2, 2)
    padded = kv.make_cache(varied)
    mask = torch.ones_like(ids); mask[0, :3] = 0
    varied(input_ids=ids, attention_mask=mask, past_key_values=padded, use_cache=True)
    with pytest.raises(ValueError, match="left padding"): StaticDecoder(varied, padded, 2, 2)
    with pytest.raises(ValueError, match="length >= 2"): fast_generate(varied, ids[:, :1], kv.make_cache(varied), 2)

def test_require_batch_fits_names_the_cap_and_the_bytes():
    per_seq = dict(gpu=3 * 2**30, host=8 * 2**30)
    assert require_batch_fits(4, per_seq, 13 * 2**30, 40 * 2**30)["cap"] == 4
    with pytest.raises(ValueError, match=r"GPU cap of 4: 3,072.0 MiB per sequence"): require_batch_fits(5, per_seq, 13 * 2**30, 80 * 2**30)
    with pytest.raises(ValueError, match=r"host cap of 2: 8,192.0 MiB of values"): require_batch_fits(3, per_seq, 13 * 2**30, 20 * 2**30)
    with pytest.raises(ValueError, match=r"GPU cap of 3: 3,584.0 MiB per sequence \(3,072.0 cache \+ 512.0 workspace\)"):
        require_batch_fits(4, per_seq, 13 * 2**30, 80 * 2**30, workspace_per_seq=2**29)

cuda = pytest.mark.gpu

@cuda
@pytest.mark.parametrize("method", list(STATIC_METHODS))
def test_cuda_graph_decode_equals_eager_greedy(method):
    m = random_llama(llama_config(**TOY), "cuda", torch.float32, seed=1)
    for p in m.parameters(): p.data.mul_(15)
    ids, kv = _prompt(dev="cuda"), STATIC_METHODS[method]
    eager = torch.tensor(greedy_generate(m, ids, stop_ids=[], max_new_tokens=16, cache=kv.make_cache(m)), device="cuda")
    cache = kv.make_cache(m)
    graph = fast_generate(m, ids, cache, 16, graphs=True)
    assert len(set(eager.flatten().tolist())) > 4 and torch.equal(eager, graph)
    forced = torch.randint(256, (10, 2, 1), generator=torch.Generator().manual_seed(2)).cuda()
    c = _prefilled(m, kv, ids)
    ref = [m(input_ids=forced[t], position_ids=torch.full((2, 1), ids.shape[1] + t, device="cuda"), past_key_values=c,
             use_cache=True).logits[:, -1].argmax(-1) for t in range(10)]
    dec = StaticDecoder(m, _prefilled(m, kv, ids), 2, 10, graphs=True)
    assert dec.graph is not None
    got = [dec.step(forced[t])[:, 0].clone() for t in range(10)]
    assert torch.equal(torch.stack(ref), torch.stack(got))
    if method == "shadowkv": assert dec.stats()["hit_rate"] == pytest.approx(c.stats()["hit_rate"], abs=1e-12)

@cuda
def test_cuda_graph_refuses_the_staged_fetch_and_the_torch_kernel():
    m = random_llama(llama_config(**TOY), "cuda", torch.float32, seed=1)
    ids = _prompt(dev="cuda")
    for kw, msg in [(dict(value_fetch="staged"), "staged"), (dict(kernel="torch"), "nonzero")]:
        kv = ShadowKV(budget=32, rank=16, chunk_size=4, outliers=2, local_chunks=2, min_prefill=64, **kw)
        with pytest.raises(ValueError, match=msg): StaticDecoder(m, _prefilled(m, kv, ids), 2, 2, graphs=True)

def _attend_case(dev, dtype, B=2, H=8, Hkv=2, D=16, base=300, span=20, step=6, seed=0):
    from longctx_nb.kvcache import TokenBuffer
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(dev, dtype)
    buf = TokenBuffer(r(B, Hkv, base, D), r(B, Hkv, base, D), extra=span)
    buf.k[:, :, base:] = r(B, Hkv, span, D); buf.v[:, :, base:] = r(B, Hkv, span, D)   # rows past step+1 must not count
    return buf, r(B, H, 1, D)

@pytest.mark.parametrize("step", [0, 6, 19])
def test_static_attend_is_attention_over_the_written_rows(step):
    from longctx_nb.kvcache import attend
    from longctx_nb.shadowkv_throughput import _static_attend
    buf, q = _attend_case("cpu", torch.float32, step=step)
    got = _static_attend(q, buf, 300, 20, 0.25, torch.tensor(step))
    ref = attend(q, buf.k[:, :, :301 + step], buf.v[:, :, :301 + step], 0.25)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)

@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_static_attend_on_cuda(dtype):
    from longctx_nb.kvcache import attend
    from longctx_nb.shadowkv_throughput import _static_attend
    buf, q = _attend_case("cuda", dtype, base=4000, step=7)
    got = _static_attend(q, buf, 4000, 20, 0.25, torch.tensor(7, device="cuda"))
    ref = attend(q.float(), buf.k[:, :, :4008].float(), buf.v[:, :, :4008].float(), 0.25)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got.float(), ref, atol=tol, rtol=tol)

def test_hit_rate_injection_is_refused_outside_the_benchmark(varied):
    kv, ids = STATIC_METHODS["shadowkv"], _prompt()
    with pytest.raises(ValueError, match="sensitivity mode only"): StaticDecoder(varied, _prefilled(varied, kv, ids), 2, 2, inject_hit_rate=0.5)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"): StaticDecoder(varied, _prefilled(varied, kv, ids), 2, 2, inject_hit_rate=1.5, benchmark=True)

@pytest.mark.parametrize("hit", [0.0, 0.5, 1.0])
def test_injected_hit_rate_is_the_measured_one(varied, hit):
    kv, ids = STATIC_METHODS["shadowkv"], _prompt()
    dec = StaticDecoder(varied, _prefilled(varied, kv, ids), 2, 3, inject_hit_rate=hit, benchmark=True)
    for _ in range(3): dec.step(torch.zeros(2, 1, dtype=torch.long))
    assert dec.forced_misses == round((1 - hit) * 8) and dec.stats()["hit_rate"] == pytest.approx(1 - dec.forced_misses / 8)

def test_hbm_value_layers_from_the_memory_model():
    from longctx_nb.shadowkv import ShadowKVConfig as C
    from longctx_nb.shadowkv_throughput import hbm_value_layers
    cfg = llama_config()
    st = C(budget=2048, rank=160)
    fp = footprint(cfg, 122880, "shadowkv", st)
    free = 13 * fp["gpu"] + 5.6 * 13 * fp["host"] / 32        # room for 5.6 layers' values beside 13 sequences
    assert hbm_value_layers(cfg, 122880, st, 13, free) == 5
    assert hbm_value_layers(cfg, 122880, st, 13, 13 * fp["gpu"] - 1) == 0
    assert hbm_value_layers(cfg, 122880, st, 1, 1e15) == 32
    assert hbm_value_layers(cfg, 122880, C(budget=2048, rank=160, value_dtype="fp8"), 13, free) == 11   # half the bytes (less the fp8 scales on the GPU)

def test_place_values_on_gpu_refuses_a_cpu_cache(toy):
    from longctx_nb.shadowkv_throughput import place_values_on_gpu
    st = ShadowKVConfig(budget=64, rank=16, min_prefill=256)
    c = constructed_cache(toy, synthetic_prefill(toy, 512, 16), 1, "shadowkv", st)
    with pytest.raises(ValueError, match="CUDA"): place_values_on_gpu(c, 1)
    assert place_values_on_gpu(c, 0) is c

@cuda
@pytest.mark.parametrize("value_dtype", ["auto", "fp8"])
def test_cuda_graph_with_values_in_hbm_equals_values_on_the_host(value_dtype):
    from longctx_nb.shadowkv_throughput import place_values_on_gpu
    m = random_llama(llama_config(**TOY), "cuda", torch.bfloat16, seed=1)
    st = ShadowKVConfig(budget=64, rank=16, min_prefill=256, value_dtype=value_dtype)
    rec = synthetic_prefill(m, 1024, 16)
    forced = torch.randint(256, (6, 2, 1), generator=torch.Generator().manual_seed(2)).cuda()
    outs = []
    for n_hbm in (0, 1):
        c = place_values_on_gpu(constructed_cache(m, rec, 2, "shadowkv", st), n_hbm)
        assert c.layers[0].v_host.is_cuda == bool(n_hbm) and not c.layers[1].v_host.is_cuda
        dec = StaticDecoder(m, c, 2, 6, graphs=True)
        outs.append(torch.stack([dec.step(forced[t]).clone() for t in range(6)]))
        c.detach()
    assert torch.equal(outs[0], outs[1])

def test_serving_benchmark_runs_end_to_end_on_cpu(tmp_path):
    "kernels.shadowkv_serving --tiny: the toy model on CPU through every row (caps computed and binding, probe, sensitivity)."
    import pandas as pd
    from kernels import shadowkv_serving
    assert shadowkv_serving.main(["--tiny", "--sensitivity", "--out", str(tmp_path)]) == 0
    raw = pd.read_csv(tmp_path / "serving.csv")
    full = raw[raw.method.str.startswith("full attention")]
    assert list(full.method) == ["full attention"] + ["full attention, smaller batch"] * 2
    # the toy's largest full batch is 4; the default fractions 0.9..0.5 of it round to 4, 3, 3, 2, 2: two smaller batches, largest first
    assert list(full.batch) == [4, 3, 2] and full.ratio_to_full_best.max() == 1.0     # the ratio is to the best full row, whichever batch
    t = raw[~raw.method.str.startswith("full attention")].set_index("method")
    assert list(t.index) == ["ShadowKV host values (paper-faithful)",
                             "ShadowKV host values (paper-faithful), SM-light fetch (16 programs)", "ShadowKV fp8 values",
                             "ShadowKV host values (paper-faithful), two half-batches overlapped", "ShadowKV fp8 values, two half-batches overlapped"]
    assert t.iloc[1].batch == t.iloc[3].batch == t.iloc[0].batch and t.iloc[4].batch == t.iloc[2].batch   # SM-light and pair at its row's batch
    assert t.predicted_ms.isna().all()                     # no joint row on CPU: its step model needs two measured placements
    assert t.loc["ShadowKV host values (paper-faithful)", "batch"] == t.loc["ShadowKV host values (paper-faithful)", "host_cap"] == 2
    assert t.loc["ShadowKV fp8 values", "batch"] == 4
    assert (raw.ms_per_step > 0).all() and t.hit_rate.between(0, 1).all() and (t.pcie_GB_per_step > 0).all()
    assert (s := pd.read_csv(tmp_path / "hit_rate_sensitivity.csv")).method.eq("ShadowKV host values (paper-faithful)").all()   # the default grid only
    s = pd.read_csv(tmp_path / "hit_rate_sensitivity.csv")  # five rows: the default grid only
    assert list(s.injected_hit_rate) == [0.0, 0.25, 0.5, 0.75, 0.9]
    assert (s.measured_hit_rate - s.injected_hit_rate).abs().max() <= 1 / 16      # rounded to whole chunks of the 16 selected
    import json
    run = next(iter(json.loads((tmp_path / "meta.json").read_text())["runs"].values()))
    assert run["code_sha256"] == shadowkv_serving.code_digest()        # what notebook 51 compares before it reads a serving report

def test_serving_code_digest_changes_with_any_of_its_sources(tmp_path):
    import shutil
    from kernels import shadowkv_serving
    root = Path(shadowkv_serving.__file__).resolve().parents[1]
    for rel in shadowkv_serving.CODE:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True); shutil.copy(root / rel, tmp_path / rel)
    base = shadowkv_serving.code_digest(tmp_path)
    assert base == shadowkv_serving.code_digest(root)
    for rel in shadowkv_serving.CODE:
        f = tmp_path / rel; text = f.read_bytes()
        f.write_bytes(text + b"\n"); assert shadowkv_serving.code_digest(tmp_path) != base, rel
        f.write_bytes(text)
    assert shadowkv_serving.code_digest(tmp_path) == base

def test_paired_decoder_equals_its_halves_alone(varied):
    from longctx_nb.shadowkv_throughput import PairedDecoder
    kv, ids = STATIC_METHODS["shadowkv"], _prompt(B=3, seed=6)
    forced = torch.randint(256, (8, 3, 1), generator=torch.Generator().manual_seed(7))
    alone, misses = [], 0
    for rows in (slice(0, 2), slice(2, 3)):
        d = StaticDecoder(varied, _prefilled(varied, kv, ids[rows]), ids[rows].shape[0], 8)
        alone.append(torch.stack([d.step(forced[t, rows]).clone() for t in range(8)])); misses += int(d.misses)
    pair = PairedDecoder(varied, [_prefilled(varied, kv, ids[:2]), _prefilled(varied, kv, ids[2:])], 8)
    together = torch.stack([pair.step(forced[t]).clone() for t in range(8)])
    assert torch.equal(together, torch.cat(alone, 1))
    st = pair.stats()
    assert st["chunk_lookups"] == 8 * 3 * 2 * 8 * 2        # steps x rows x kv heads x selected chunks x layers
    assert st["hit_rate"] == pytest.approx(1 - misses / st["chunk_lookups"])
    with pytest.raises(ValueError, match=r"batch 3 \(2 \+ 1\)"): pair.step(torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="two caches"): PairedDecoder(varied, [_prefilled(varied, kv, ids)], 2)
    with pytest.raises(ValueError, match="CUDA graph capture needs"): PairedDecoder(varied, [_prefilled(varied, kv, ids[:2]), _prefilled(varied, kv, ids[2:])], 2, graphs=True)

@cuda
@pytest.mark.parametrize("fetch_programs", [None, 4], ids=["grid-all", "grid-P4"])
def test_paired_cuda_graph_equals_its_halves_alone(fetch_programs):
    "The pair (layers interleaved, one shared fetch stream) against each half decoded alone, with both value-kernel grids."
    from longctx_nb.shadowkv_throughput import PairedDecoder
    m = random_llama(llama_config(**TOY), "cuda", torch.float32, seed=1)
    for p in m.parameters(): p.data.mul_(15)
    kv, ids = dataclasses.replace(STATIC_METHODS["shadowkv"], fetch_programs=fetch_programs), _prompt(B=4, seed=6, dev="cuda")
    forced = torch.randint(256, (8, 4, 1), generator=torch.Generator().manual_seed(7)).cuda()
    alone = []
    for rows in (slice(0, 2), slice(2, 4)):
        d = StaticDecoder(m, _prefilled(m, kv, ids[rows]), 2, 8, graphs=True)
        alone.append(torch.stack([d.step(forced[t, rows]).clone() for t in range(8)]))
    pair = PairedDecoder(m, [_prefilled(m, kv, ids[:2]), _prefilled(m, kv, ids[2:])], 8, graphs=True)
    assert pair.graph is not None
    assert torch.equal(torch.stack([pair.step(forced[t]).clone() for t in range(8)]), torch.cat(alone, 1))

def test_static_step_with_fp8_values_equals_eager(varied):
    "fp8 values (quantized chunks and their scales) through the static step: the eager decode's tokens and hit rate."
    kv = ShadowKV(budget=32, rank=16, chunk_size=4, outliers=2, local_chunks=2, min_prefill=64, value_dtype="fp8")
    ids = _prompt(seed=8)
    eager_cache = kv.make_cache(varied)
    eager = torch.tensor(greedy_generate(varied, ids, stop_ids=[], max_new_tokens=12, cache=eager_cache))
    assert eager_cache.layers[0].v_host.dtype == torch.float8_e4m3fn
    assert torch.equal(eager, fast_generate(varied, ids, kv.make_cache(varied), 12))

def test_fit_step_model_passes_through_its_two_steps_and_refuses_bad_ones():
    from longctx_nb.shadowkv_throughput import fit_step_model
    m = fit_step_model(56, 72.74, 48.18, 1.832, 21, 32, fixed_ms=4.0)
    assert m(56, 0) == pytest.approx(72.74) and m(56, 21) == pytest.approx(48.18)
    assert m.pcie_GB_s == pytest.approx(1.832 * 21 / 32 / (72.74 - 48.18) * 1e3)
    assert m(56, 32) == pytest.approx(4.0 + 56 * m.per_seq_ms) and m(28, 0) < m(56, 0)
    with pytest.raises(ValueError, match="ms_host > ms_placed"): fit_step_model(56, 40.0, 48.18, 1.832, 21, 32, 4.0)
    with pytest.raises(ValueError, match="1 to 32 layers"): fit_step_model(56, 72.74, 48.18, 1.832, 0, 32, 4.0)

def test_serving_point_chooses_batch_and_placement_together():
    from longctx_nb.shadowkv_throughput import serving_point, StepModel, hbm_value_layers
    cfg, st = llama_config(), ShadowKVConfig(budget=1024, rank=160)
    fp = footprint(cfg, 65536, "shadowkv", st)
    host_free = 20.5 * fp["host"]                               # a host cap of 20 with no layer placed
    gpu_free = 40 * fp["gpu"] + 20 * fp["host"]                 # room for 40 sequences' state and 20 sequences' values
    slow_pcie = StepModel(fixed_ms=4.0, per_seq_ms=0.5, pcie_GB_s=10.0, pcie_GB_per_seq=0.05, n_layers=32)
    pt = serving_point(cfg, 65536, st, gpu_free, host_free, slow_pcie, max_batch=64)
    best = max(pt["candidates"], key=lambda c: c["predicted_tok_s"])
    assert (pt["batch"], pt["hbm_value_layers"]) == (best["batch"], best["hbm_value_layers"])
    assert all(c["host_GB"] * 1e9 <= host_free + 1 for c in pt["candidates"])
    assert all(c["hbm_value_layers"] == hbm_value_layers(cfg, 65536, st, c["batch"], gpu_free) for c in pt["candidates"])
    assert max(c["batch"] for c in pt["candidates"]) > 20      # placement lets the batch pass the host cap of no placement
    free_pcie = dataclasses.replace(slow_pcie, pcie_GB_s=1e9)   # PCIe costs nothing: the largest batch the GPU state fits wins
    assert serving_point(cfg, 65536, st, gpu_free, 1e15, free_pcie, max_batch=64)["batch"] == min(64, int(gpu_free // fp["gpu"]))
    with pytest.raises(ValueError, match="no batch fits"): serving_point(cfg, 65536, st, 0.5 * fp["gpu"], host_free, slow_pcie)

@cuda
def test_constructed_cache_places_values_before_repeating():
    m = random_llama(llama_config(**TOY), "cuda", torch.bfloat16, seed=1)
    st = ShadowKVConfig(budget=64, rank=16, min_prefill=256)
    rec = synthetic_prefill(m, 1024, 16)
    c = constructed_cache(m, rec, 3, "shadowkv", st, hbm_layers=1)
    assert c.layers[0].v_host.is_cuda and c.layers[0].v_host.shape[0] == 3 and not c.layers[1].v_host.is_cuda
    ref = constructed_cache(m, rec, 3, "shadowkv", st)
    assert torch.equal(c.layers[0].v_host.cpu(), ref.layers[0].v_host)
    c.detach(); ref.detach()

def test_serving_benchmark_skips_rows_on_request(tmp_path):
    import pandas as pd
    from kernels import shadowkv_serving
    assert shadowkv_serving.main(["--tiny", "--skip", "pairs", "light", "--full-fractions", "0.5", "--out", str(tmp_path)]) == 0
    t = pd.read_csv(tmp_path / "serving.csv")
    assert list(t.method) == ["full attention", "full attention, smaller batch", "ShadowKV host values (paper-faithful)", "ShadowKV fp8 values"]
    assert list(t.batch[:2]) == [4, 2]

@pytest.mark.parametrize("text", ["0", "1", "0.5,1.2", "-0.1", "half", ""])
def test_serving_benchmark_refuses_bad_full_fractions(text, capsys):
    from kernels import shadowkv_serving
    with pytest.raises(SystemExit): shadowkv_serving.main(["--tiny", "--full-fractions", text])
    assert "--full-fractions" in capsys.readouterr().err
