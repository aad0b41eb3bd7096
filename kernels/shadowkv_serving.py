"""ShadowKV against full attention at serving speed: one context per process, both methods decoding through
CUDA graphs (notebook 51's StaticDecoder) at the largest batch that fits, on the Llama-3-8B-shaped random model. Rows: full
attention at its largest batch and at smaller ones (--full-fractions of it: the largest batch need not be the fastest, and the
ratio is to full attention's best row); ShadowKV paper-faithful (bf16 values in page-locked host memory); fp8 values; each of those with the values of as many
layers as fit moved to HBM (the count from the memory model); the batch and placement chosen together (notebook 51's
serving_point, its step model fitted to the two rows before it: its best point and its best at a larger batch than the host-capped
row's, the predicted ms beside the measured); where no layer's values fit
beside the host-capped batch (the 80 GB budget), every layer's values in HBM at the largest batch that holds them instead; the
faithful row with the SM-light value kernel (--fetch-programs); the faithful row and the best fp8 row again as two half-batches stepped in one graph
(PairedDecoder: layers interleaved, one fetch stream, the SM-light kernel: one half's PCIe reads overlap the other's GPU work). Per row: batch, ms/step, tok/s, ratio to full attention's best,
GPU busy share (union of device activity over the step), kernels per step, measured hit rate, PCIe GB per step (misses of the
host-resident layers), GPU and host bytes per sequence; and per row its 12 costliest kernels (gpu_time_by_kernel). Batches: the caps computed from the memory model (GPU: free memory after
the weights over the per-sequence bytes plus a workspace; host: MemAvailable less a reserve), then probed downward on the GPU
until a batch builds and decodes (the host cap is never probed: past it the host swaps rather than fails).

    python -m kernels.shadowkv_serving --context 122880 [--gpu-budget-gb 80] [--sensitivity] [--skip joint light pairs] [--out DIR]
    python -m kernels.shadowkv_serving --tiny      # a toy model on CPU (the static step run eagerly): checks the script end to end

--gpu-budget-gb caps this process's GPU memory (torch.cuda.set_per_process_memory_fraction), to stand beside the paper's A100 80GB.
--sensitivity adds tok/s at injected hit rates (labelled sensitivity: the slots then hold other chunks than their table says, so
only the speed means anything). Needs CUDA unless --tiny. Exit status 1 when a row gives no finite time or the sweep finds no batch.
"""
import argparse, dataclasses, gc, math, sys, time
from kernels._lab import lab_main, Measured
import pandas as pd
import torch

NAME = "shadowkv_serving"
TINY_MODEL = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=16)


CODE = ("kernels/shadowkv_serving.py", "kernels/_lab.py", "longctx_nb/shadowkv_throughput.py", "longctx_nb/shadowkv.py")


def code_digest(root=None) -> str:
    "sha256 over the sources that make this benchmark's numbers: a reader of a report (notebook 51) refuses one measured by other code."
    import hashlib
    from pathlib import Path
    root = Path(root) if root is not None else Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for rel in CODE: h.update(rel.encode() + b"\0" + (root / rel).read_bytes() + b"\0")
    return h.hexdigest()


def fractions(text: str) -> tuple[float, ...]:
    "'0.9,0.8' -> (0.9, 0.8); each must lie in (0, 1): a fraction of the largest batch, below it."
    try: fs = tuple(float(x) for x in text.split(","))
    except ValueError: raise argparse.ArgumentTypeError(f"expected comma-separated fractions like 0.9,0.8, got {text!r}") from None
    if not all(0 < f < 1 for f in fs): raise argparse.ArgumentTypeError(f"each fraction must lie in (0, 1), got {text!r}")
    return fs


def add_args(ap):
    ap.add_argument("--context", type=int, default=122880)
    ap.add_argument("--budget", type=int, default=None, help="sparse budget in tokens (default: 2048 at >= 96k, 1024 at >= 48k, else 512)")
    ap.add_argument("--rank", type=int, default=160)
    ap.add_argument("--steps", type=int, default=20, help="timed decode steps per row (after the graph's warm-up)")
    ap.add_argument("--gpu-budget-gb", type=float, default=None, help="cap this process's GPU memory (default: the whole GPU)")
    ap.add_argument("--host-reserve-gb", type=float, default=12.0)
    ap.add_argument("--workspace-mb", type=float, default=96.0, help="decode workspace per sequence added to the GPU footprint")
    ap.add_argument("--placement-margin-gb", type=float, default=4.0, help="GPU memory kept free when choosing how many layers' values go to HBM")
    ap.add_argument("--full-fractions", type=fractions, default=(0.9, 0.8, 0.7, 0.6, 0.5),
                    help="full attention is also measured at these fractions of its largest batch (comma-separated, each in (0, 1))")
    ap.add_argument("--probe", type=int, default=4, help="batches tried below the computed GPU cap before giving up")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--fetch-programs", type=int, default=16, help="programs of the SM-light value kernel (its rows and the pairs)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["joint", "light", "pairs"], help="leave these rows out (to fit a 10-minute call)")
    ap.add_argument("--sensitivity", action="store_true", help="also tok/s at injected hit rates 0, 0.25, 0.5, 0.75, 0.9 (sensitivity only)")
    ap.add_argument("--tiny", action="store_true", help="a toy model on CPU: checks the script, measures nothing of interest")


def free_memory():
    gc.collect()
    if torch.cuda.is_available(): torch.cuda.empty_cache()


def device_profile(dec, tokens, steps: int, top: list | None = None) -> dict:
    """Kernels per step and the GPU busy share: the union of device-activity intervals over the profiled steps' wall time. `top`, if
    given, receives the GPU time per step of each kernel name (descending): where a step's time goes, so a gap is measured, not guessed."""
    from torch.profiler import profile, ProfilerActivity
    from torch.autograd import DeviceType
    if not tokens.is_cuda: return dict(kernels_per_step=float("nan"), gpu_busy_share=float("nan"))
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps): dec.step(tokens)
        torch.cuda.synchronize()
        wall_us = (time.perf_counter() - t0) * 1e6
    events = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    spans = sorted((e.time_range.start, e.time_range.end) for e in events)
    if top is not None:
        per = {}
        for e in events:
            c = per.setdefault(e.name[:120], [0, 0.0]); c[0] += 1; c[1] += e.time_range.end - e.time_range.start
        total = sum(us for _, us in per.values()) or 1.0
        top.extend(dict(kernel=k, calls_per_step=n / steps, gpu_ms_per_step=us / steps / 1e3, share_of_kernel_time=us / total)
                   for k, (n, us) in sorted(per.items(), key=lambda kv: -kv[1][1]))
    busy, end = 0.0, -math.inf
    for s, e in spans:                                         # the two streams overlap: count covered time once
        if e <= end: continue
        busy += e - max(s, end); end = e
    return dict(kernels_per_step=len(spans) / steps, gpu_busy_share=busy / wall_us if wall_us else float("nan"))


def time_decoder(dec, batch: int, steps: int, vocab: int, dev) -> dict:
    "The median of `steps` decode steps (one graph replay each on CUDA, timed by device events; wall time on CPU), fed fresh random tokens."
    tokens = torch.randint(vocab, (steps, batch, 1), device=dev)
    ms = []
    for t in range(steps):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(); dec.step(tokens[t]); end.record(); end.synchronize()
            ms.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter(); dec.step(tokens[t]); ms.append((time.perf_counter() - t0) * 1e3)
    med = float(torch.tensor(ms).median())
    return dict(ms_per_step=med, tok_s=batch * 1e3 / med)


def measure(lib, a) -> Measured:
    thr, skv = lib.shadowkv_throughput, lib.shadowkv
    cuda = torch.cuda.is_available() and not a.tiny
    dev = torch.device("cuda" if cuda else "cpu")
    if a.tiny: a.context, a.rank, a.steps, a.budget, a.workspace_mb, a.max_batch = 2048, 16, 3, 64, 0.5, 4
    budget = a.budget or (2048 if a.context >= 96 * 1024 else 1024 if a.context >= 48 * 1024 else 512)
    if cuda and a.gpu_budget_gb:
        total = torch.cuda.get_device_properties(dev).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, a.gpu_budget_gb * 1e9 / total), torch.cuda.current_device())   # needs an index, not "cuda"
    cfg = thr.llama_config(**(TINY_MODEL if a.tiny else {}))
    model = thr.random_llama(cfg, dev, torch.bfloat16 if cuda else torch.float32)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    dtype_bytes = 2 if cuda else 4
    n_profiled, warm = 3, 2
    max_new = warm + 1 + a.steps + n_profiled + 2               # every step the decoder takes, so no buffer grows after capture
    if cuda:
        limit = a.gpu_budget_gb * 1e9 if a.gpu_budget_gb else torch.cuda.get_device_properties(dev).total_memory
        gpu_free = min(torch.cuda.mem_get_info(dev)[0], limit - torch.cuda.memory_allocated(dev)) - 2**30
    else:
        gpu_free = 0.06e9                                       # the toy's pretend GPU, so the caps bind as they do at 122k
    host_free = (thr.host_available_bytes() - a.host_reserve_gb * 2**30) if cuda else 3e6   # the toy: a host cap of 2 for bf16
    workspace = a.workspace_mb * 2**20
    rec = thr.synthetic_prefill(model, a.context, a.rank)
    st = lambda **kw: skv.ShadowKVConfig(budget=budget, rank=a.rank, min_prefill=min(1024, a.context), reserve_tokens=max_new, **kw)
    rows, sens, checks, kernel_rows = [], [], [], []

    def run_rows(label, method, settings, placements, at=None, predicted_ms=float("nan")):
        """Build at the largest batch that fits (computed, then probed), measure, then each placement on the same cache. `at`:
        (batch, hbm layers) built so from the start (the joint choice: its values may exceed the host cap with no placement)."""
        fp = thr.footprint(cfg, a.context, method, settings, dtype_bytes=dtype_bytes, reserve_tokens=max_new)
        caps = thr.batch_caps(fp, gpu_free, host_free, workspace, max_batch=a.max_batch)
        first = caps["cap"] if at is None else at[0]
        for batch in range(first, max(0, first - a.probe), -1):
            cache = dec = None
            try:
                if at is None: thr.require_batch_fits(batch, fp, gpu_free, host_free, workspace)
                cache = thr.constructed_cache(model, rec, batch, method, settings, reserve_tokens=max_new, hbm_layers=0 if at is None else at[1])
                for n_hbm, programs in (placements(batch) if at is None else [(at[1], None)]):
                    if n_hbm and at is None:
                        try: thr.place_values_on_gpu(cache, n_hbm)
                        except torch.OutOfMemoryError:            # the faithful row stands; say the placement did not fit
                            rows.append(dict(method=f"{label}, {n_hbm} layers' values in HBM", context=a.context, batch=batch,
                                             hbm_value_layers=n_hbm, status="OOM")); break
                    if settings is not None:                      # the value kernel's grid is read when the step is captured
                        cache.settings = dataclasses.replace(settings, fetch_programs=programs) if programs else settings
                    cache_reset(cache)
                    dec = thr.StaticDecoder(model, cache, batch, max_new, graphs=cuda, warmup=warm)
                    t = time_decoder(dec, batch, a.steps, cfg.vocab_size, dev)
                    top = []
                    prof = device_profile(dec, torch.zeros(batch, 1, dtype=torch.long, device=dev), n_profiled, top)
                    hit = dec.stats()["hit_rate"]
                    L = cfg.num_hidden_layers
                    row_bytes = settings.chunk_size * cfg.head_dim * (1 if settings.value_dtype == "fp8" else dtype_bytes) if settings else 0
                    pcie = (1 - hit) * dec.lookups_per_step * row_bytes * (L - n_hbm) / L / 1e9 if settings else 0.0
                    moved = fp["host"] * n_hbm / L if settings else 0.0
                    name = (label + (f", {n_hbm} layers' values in HBM" if n_hbm and at is None else "")
                            + (f", SM-light fetch ({programs} programs)" if programs else ""))
                    kernel_rows.extend(dict(method=name, batch=batch, **k) for k in top[:12])
                    rows.append(dict(method=name, context=a.context, batch=batch, predicted_ms=predicted_ms if at is not None else float("nan"),
                                     gpu_cap=caps["gpu_cap"], host_cap=caps["host_cap"], hbm_value_layers=n_hbm, **t, **prof,
                                     hit_rate=hit, pcie_GB_per_step=pcie, gpu_GB_per_seq=(fp["gpu"] + moved) / 1e9,
                                     host_GB_per_seq=(fp["host"] - moved) / 1e9, graphs=dec.graph is not None, status="ok"))
                    print(rows[-1], flush=True)
                    if a.sensitivity and settings is not None and at is None and n_hbm == 0 and settings.value_dtype == "auto" and programs is None:
                        for h in (0.0, 0.25, 0.5, 0.75, 0.9):
                            dec = None; free_memory(); cache_reset(cache)
                            dec = thr.StaticDecoder(model, cache, batch, max_new, graphs=cuda, warmup=warm, inject_hit_rate=h, benchmark=True)
                            sens.append(dict(method=label, context=a.context, batch=batch, injected_hit_rate=h,
                                             measured_hit_rate=None, **time_decoder(dec, batch, a.steps, cfg.vocab_size, dev)))
                            sens[-1]["measured_hit_rate"] = dec.stats()["hit_rate"]
                        cache_reset(cache)
                    dec = None; free_memory()
                return
            except torch.OutOfMemoryError as e:
                print(f"{label} at batch {batch}: out of GPU memory ({str(e).splitlines()[0]}); probing {batch - 1}", flush=True)
            finally:
                dec = None
                if cache is not None: cache.detach()
                del cache; free_memory()
        checks.append(f"{label}: no batch from {caps['cap']} down {a.probe} builds and decodes")

    def run_joint(label, settings, weight_ms):
        "The batch and placement chosen together (serving_point), its step model fitted to this setting's two rows just measured."
        ok = [r for r in rows if r.get("status") == "ok" and r["method"].startswith(label) and "joint" not in r["method"] and "SM-light" not in r["method"]]
        host = next((r for r in ok if r["hbm_value_layers"] == 0), None)
        placed = next((r for r in ok if r["hbm_value_layers"] > 0 and host is not None and r["batch"] == host["batch"]), None)
        if not cuda or host is None: return
        if placed is None:
            # no layer's values fit beside the host-capped batch (the 80 GB budget), so there is no second point to fit a step model
            # to: measure the other end instead, every layer's values in HBM at the largest batch that holds them
            L, room = cfg.num_hidden_layers, gpu_free - a.placement_margin_gb * 2**30
            fits = [b for b in range(1, a.max_batch + 1) if thr.hbm_value_layers(cfg, a.context, settings, b, room, workspace, dtype_bytes) == L]
            if fits: run_rows(f"{label}, every layer's values in HBM at the largest batch that holds them", "shadowkv", settings, None, at=(max(fits), L))
            return
        try: model_ = thr.fit_step_model(host["batch"], host["ms_per_step"], placed["ms_per_step"], host["pcie_GB_per_step"],
                                         placed["hbm_value_layers"], cfg.num_hidden_layers, weight_ms)
        except ValueError as e: print(f"{label}: no step model ({e}); no joint row", flush=True); return
        try: pt = thr.serving_point(cfg, a.context, settings, gpu_free - a.placement_margin_gb * 2**30, host_free, model_, workspace, dtype_bytes, a.max_batch)
        except ValueError as e: print(f"{label}: no joint point ({e})", flush=True); return
        print(f"{label}: joint choice batch {pt['batch']}, {pt['hbm_value_layers']} HBM layers, predicted {pt['predicted_ms']:.1f} ms "
              f"({pt['predicted_tok_s']:.0f} tok/s); step model {model_}", flush=True)
        # the model's best, and its best at a larger batch than the host-capped row's: the step model's fixed part is the weights'
        # read only, so a batch-independent cost (launches) would make it favour small batches; the second point probes the other way
        larger = [c for c in pt["candidates"] if c["batch"] > placed["batch"]]
        picks = [("model's best", pt)] + ([("larger batch", max(larger, key=lambda c: c["predicted_tok_s"]))] if larger else [])
        seen = {(placed["batch"], placed["hbm_value_layers"])}
        for tag, c in picks:
            key = (c["batch"], c["hbm_value_layers"])
            if key == (placed["batch"], placed["hbm_value_layers"]): placed["predicted_ms"] = c["predicted_ms"]
            if key in seen: continue
            seen.add(key)
            run_rows(f"{label}, joint batch and placement, {tag} ({c['hbm_value_layers']} layers' values in HBM)", "shadowkv", settings, None,
                     at=key, predicted_ms=c["predicted_ms"])

    def cache_reset(cache):
        "A new decoder over a cache another decoder used: its buffers' lengths are still the prefill's (no finish()), the slots empty."
        for layer in cache.layers:
            if hasattr(layer, "slot_ids") and layer.slot_ids is not None: layer.slot_ids.fill_(-1)

    def placements_for(settings, light=False):
        "(HBM layers, value-kernel programs) measured on one cache in turn: all on the host, (the SM-light kernel,) then placed."
        def pick(batch):
            first = [(0, None)] + ([(0, a.fetch_programs)] if light and "light" not in a.skip else [])
            if not cuda: return first
            # a margin beyond the memory model: the graphs' private pools and the allocator's fragmentation
            n = thr.hbm_value_layers(cfg, a.context, settings, batch, gpu_free - a.placement_margin_gb * 2**30, workspace, dtype_bytes)
            return first + ([(n, None)] if n else [])
        return pick

    def run_paired(label, settings, of):
        "Two half-batch caches stepped as one graph on two streams (PairedDecoder), at the batch and placement of the row `of`."
        base = next((r for r in rows if r["method"] == of and r.get("status") == "ok"), None)
        if base is None or base["batch"] < 2: return
        batch, n_hbm = base["batch"], base["hbm_value_layers"]
        caches, dec = [], None
        try:
            for half in (batch // 2, batch - batch // 2):
                caches.append(thr.place_values_on_gpu(thr.constructed_cache(model, rec, half, "shadowkv", settings, reserve_tokens=max_new), n_hbm))
            dec = thr.PairedDecoder(model, caches, max_new, graphs=cuda, warmup=warm)
            t = time_decoder(dec, batch, a.steps, cfg.vocab_size, dev)
            prof = device_profile(dec, torch.zeros(batch, 1, dtype=torch.long, device=dev), n_profiled)
            hit, L = dec.stats()["hit_rate"], cfg.num_hidden_layers
            row_bytes = settings.chunk_size * cfg.head_dim * (1 if settings.value_dtype == "fp8" else dtype_bytes)
            rows.append(dict(base, method=label, **t, **prof, hit_rate=hit, graphs=dec.graph is not None, status="ok",
                             pcie_GB_per_step=(1 - hit) * dec.lookups_per_step * row_bytes * (L - n_hbm) / L / 1e9))
        except torch.OutOfMemoryError as e:
            rows.append(dict(method=label, context=a.context, batch=batch, hbm_value_layers=n_hbm, status="OOM"))
            print(f"{label}: out of GPU memory ({str(e).splitlines()[0]})", flush=True)
        finally:
            dec = None
            for c in caches: c.detach()
            caches.clear(); free_memory()
        print(rows[-1], flush=True)

    t_start = time.perf_counter()
    run_rows("full attention", "full", None, lambda b: [(0, None)])
    largest = next((r["batch"] for r in rows if r["method"] == "full attention" and r.get("status") == "ok"), None)
    if largest is not None:
        # the largest batch need not be the fastest: notebook 51's eager sweep at 32k on the H200 ran batch 26 at 37 ms per step
        # and batch 27 at 61 ms, so full attention's best is taken over several batches, not assumed at its cap
        for b in sorted({max(1, round(largest * f)) for f in a.full_fractions} - {largest}, reverse=True):
            run_rows("full attention, smaller batch", "full", None, None, at=(b, 0))
    faithful, fp8 = "ShadowKV host values (paper-faithful)", "ShadowKV fp8 values"
    weight_ms = weight_bytes / (thr.hbm_bandwidth(dev) * 1e9) * 1e3 if cuda else 0.0     # the weights' read per step (a copy's bytes moved per second)
    for label, kw in ((faithful, {}), (fp8, dict(value_dtype="fp8"))):
        run_rows(label, "shadowkv", st(**kw), placements_for(st(**kw), light=label == faithful))
        if "joint" not in a.skip: run_joint(label, st(**kw), weight_ms)
    light = dict(fetch_programs=a.fetch_programs)
    if "pairs" not in a.skip: run_paired(f"{faithful}, two half-batches overlapped", st(**light), faithful)
    placed_fp8 = [r["method"] for r in rows if r["method"].startswith(fp8 + ",") and r.get("status") == "ok" and "joint" not in r["method"] and "SM-light" not in r["method"]
                 and "every layer" not in r["method"]]      # the pair repeats a placement row, not the all-in-HBM fallback
    if "pairs" not in a.skip:
        run_paired(f"{placed_fp8[0] if placed_fp8 else fp8}, two half-batches overlapped", st(value_dtype="fp8", **light), placed_fp8[0] if placed_fp8 else fp8)
    table = pd.DataFrame(rows)
    if len(table):
        full_best = table[table.method.str.startswith("full attention") & (table.status == "ok")].tok_s.max()
        table["ratio_to_full_best"] = table.tok_s / full_best if full_best == full_best else float("nan")
    tables = dict(serving=table)                     # unrounded: the toy's PCIe bytes are far below 1e-4 GB
    if sens: tables["hit_rate_sensitivity"] = pd.DataFrame(sens).round(4)
    if kernel_rows: tables["gpu_time_by_kernel"] = pd.DataFrame(kernel_rows).round(4)    # the 12 costliest kernels of each row
    print(table.to_string(), flush=True)
    done = table[table.status == "ok"] if len(table) else table
    ok = not checks and len(done) > 0 and bool(done.ms_per_step.map(lambda x: math.isfinite(x) and x > 0).all())
    for c in checks: print("CHECK FAILED:", c, flush=True)
    meta = dict(mode="gpu" if cuda else "tiny", context=a.context, budget=budget, rank=a.rank, steps=a.steps, gpu_budget_gb=a.gpu_budget_gb,
                gpu_free_GB=gpu_free / 1e9, host_free_GB=host_free / 1e9, weight_GB=weight_bytes / 1e9, seconds=time.perf_counter() - t_start,
                failed_checks=checks, code_sha256=code_digest())
    return Measured(tables, ok=ok, meta=meta)


def main(argv=None) -> int:
    return lab_main(NAME, __doc__, measure, add_args, argv, needs_cuda=lambda a: not a.tiny)


if __name__ == "__main__":
    sys.exit(main())
