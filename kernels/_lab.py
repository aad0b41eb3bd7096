"""What every kernels/ script shares: the command line, the report folder, the GPU peaks, and A/B runs against another commit.

A script defines `measure(lib, args) -> Measured` and ends with `sys.exit(lab_main(NAME, __doc__, measure, add_args))`:

    python -m kernels.NAME [--out DIR] [--ab COMMIT] [--peaks LABEL] [script options]

- `--out` is anchored at the repo root (a relative path means <repo>/path), default reports/kernels/NAME;
- the exit status is 0 when every check of every run passed, 1 when one failed, 2 when the script cannot run here (no CUDA);
- peaks (for roofline floors) come from `longctx_nb.core.PEAKS` through `device_peaks` (`--peaks` names a row, e.g. H200);
- `--ab COMMIT` runs the same `measure` a second time, in the same process, on the package as it was at COMMIT: `git archive COMMIT
  longctx_nb` is unpacked into a temporary folder as the package `longctx_nb_ab`, its imports rewritten to that name, and both runs'
  tables are written side by side (a `code` column names the commit of each row). The script itself is today's in both runs: it
  reaches the library only through `lib` (`lib.tensorized`, `lib.get("host_empty", "kvcache", "shadowkv")` for a name that moved).
  COMMIT must be in the git history of the tree the script runs in: a copied tree (the GPU machine's) has only the history its .git
  carries, and names today's commit through LONGCTX_GIT_SHA.
"""
from __future__ import annotations
import argparse, atexit, importlib, os, re, shutil, subprocess, sys, tempfile, time
from dataclasses import dataclass, field, asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path: sys.path.insert(0, str(REPO))      # longctx_nb without PYTHONPATH

import longctx_nb.core as core  # noqa: E402  (first: on a machine without CUDA it sets TRITON_INTERPRET=1 before triton is imported)


def _load_test_helpers():
    "tests/helpers.py (kernel input factories shared with the tests), loaded by path: a wheel's top-level `tests` cannot shadow it."
    import importlib.util
    spec = importlib.util.spec_from_file_location("longctx_test_helpers", REPO / "tests" / "helpers.py")
    mod = importlib.util.module_from_spec(spec); sys.modules[spec.name] = mod; spec.loader.exec_module(mod)
    return mod

test_helpers = _load_test_helpers()


@dataclass
class Measured:
    "One run of a script's measurement: tables and figures to write, whether every check passed, extra meta."
    tables: dict = field(default_factory=dict)
    figures: dict = field(default_factory=dict)
    ok: bool = True
    meta: dict = field(default_factory=dict)
    claims: object = None          # a core.paper_vs_ours table (the first run's is written)


def profiled(fn, reps: int, cuda: bool):
    """Run `fn` `reps` times under torch.profiler: (wall ms per run, GPU busy ms per run, the per-op table per run: op, calls,
    host_self_ms, gpu_ms). GPU busy time sums the device events alone (kernels, copies): a CPU op's row also carries its kernels'
    time, so summing every row would count it twice."""
    import pandas as pd
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import profile, ProfilerActivity
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        t = time.perf_counter()
        for _ in range(reps): fn()
        if cuda: torch.cuda.synchronize()
        wall = (time.perf_counter() - t) * 1e3 / reps
    ev = prof.key_averages()
    dev_time = lambda e: getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0))
    busy = sum(dev_time(e) for e in ev if e.device_type != DeviceType.CPU) / 1e3 / reps
    ops = pd.DataFrame([dict(op=e.key, calls=e.count / reps, host_self_ms=e.self_cpu_time_total / 1e3 / reps,
                             gpu_ms=dev_time(e) / 1e3 / reps) for e in ev])
    return wall, busy, ops


class Lib:
    "The package a run measures: `lib.tensorized` imports `<package>.tensorized`; `lib.get(name, *modules)` finds a moved name."
    def __init__(self, package: str = "longctx_nb", label: str | None = None):
        self.package, self.label = package, label or f"HEAD {head_sha()}"
    def __getattr__(self, module: str):
        if module.startswith("__"): raise AttributeError(module)
        return importlib.import_module(f"{self.package}.{module}")
    def get(self, name: str, *modules: str, was: str | None = None):
        """The first of `modules` that exports `name` (e.g. a helper that moved from shadowkv to kvcache between commits), or
        failing that its older name `was` (a rename)."""
        for n in (name, was) if was else (name,):
            for m in modules:
                try: mod = importlib.import_module(f"{self.package}.{m}")
                except ModuleNotFoundError: continue
                if hasattr(mod, n): return getattr(mod, n)
        raise AttributeError(f"{self.label}: none of {modules} in {self.package} has {name!r}" + (f" (or {was!r})" if was else ""))


def head_sha() -> str:
    "Today's commit: LONGCTX_GIT_SHA where set (a copied tree, e.g. on the GPU machine, may carry a stale .git), else git's HEAD."
    env = os.environ.get("LONGCTX_GIT_SHA")
    return env[:7] if env else (git_short("HEAD") or "?")


def git_short(rev: str) -> str | None:
    r = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", rev], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else None


def load_commit(commit: str, package: str = "longctx_nb_ab") -> Lib:
    "The package as it was at `commit`, importable under the name `package` beside today's (same process)."
    sha = git_short(commit)
    if sha is None: raise SystemExit(f"--ab {commit!r}: git cannot resolve it in {REPO}")
    tmp = Path(tempfile.mkdtemp(prefix=f"kernels-ab-{sha}-"))
    atexit.register(shutil.rmtree, tmp, True)                         # its modules stay loaded; the files go at exit
    archive = subprocess.run(["git", "-C", str(REPO), "archive", sha, "longctx_nb"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
    (tmp / "longctx_nb").rename(tmp / package)
    for p in (tmp / package).rglob("*.py"):
        p.write_text(re.sub(r"\blongctx_nb\b", package, p.read_text()))
    sys.path.insert(0, str(tmp))
    importlib.import_module(package)
    return Lib(package, label=f"A/B {sha}")


def out_path(out: str | Path) -> Path:
    "`out` anchored at the repo root when relative."
    p = Path(out)
    return p if p.is_absolute() else REPO / p


def parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=f"python -m kernels.{name}", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=f"reports/kernels/{name}", help="report folder, relative to the repo root (default: %(default)s)")
    ap.add_argument("--ab", metavar="COMMIT", default=None,
                    help="also run the same measurement on the package at COMMIT, in this process, and report both side by side")
    ap.add_argument("--peaks", metavar="LABEL", default=None,
                    help=f"GPU row of core.PEAKS for roofline floors (one of {list(core.PEAKS)}; default: this GPU's)")
    return ap


def peaks_for(args) -> core.DevicePeaks:
    "The roofline peaks of this run: `--peaks` if given, else this GPU's row of core.PEAKS."
    return core.device_peaks(args.peaks) if args.peaks else core.device_peaks()


def side_by_side(tables: dict[str, dict]) -> dict:
    "One table per name: each run's rows with a leading `code` column (the commit they measured), runs one after another."
    import pandas as pd
    out = {}
    for label, tabs in tables.items():
        for name, df in tabs.items():
            df = df.copy(); df.insert(0, "code", label)
            out.setdefault(name, []).append(df)
    return {name: pd.concat(dfs, ignore_index=True) if len(dfs) > 1 else dfs[0] for name, dfs in out.items()}


def lab_main(name: str, doc: str | None, measure, add_args=None, argv=None, needs_cuda=True) -> int:
    """Parse the shared and the script's options, run `measure` (twice with --ab), write one report, return the exit status.
    `needs_cuda`: a bool, or a function of the parsed options (a script whose CPU mode is an option)."""
    ap = parser(name, doc)
    if add_args: add_args(ap)
    a = ap.parse_args(argv)
    import torch
    needs_cuda = needs_cuda(a) if callable(needs_cuda) else needs_cuda
    if needs_cuda and not torch.cuda.is_available():
        print(f"kernels.{name} needs a CUDA GPU and none is visible; the kernels' CPU checks are in tests/", file=sys.stderr)
        return 2
    libs = [Lib()] + ([load_commit(a.ab)] if a.ab else [])
    t0, runs = time.perf_counter(), {}
    for lib in libs:
        print(f"[kernels.{name}] measuring {lib.label}", flush=True)
        runs[lib.label] = measure(lib, a)
    tables = side_by_side({k: m.tables for k, m in runs.items()})
    figures = {f"{fig}" if i == 0 else f"{fig}_ab": f for i, m in enumerate(runs.values()) for fig, f in m.figures.items()}
    peaks = None
    if torch.cuda.is_available() or a.peaks:
        try: peaks = asdict(peaks_for(a))
        except ValueError as e: print(f"[kernels.{name}] {e}", file=sys.stderr)
    meta = core.run_meta(core.Preset("kernels", needs_gpu=needs_cuda), time.perf_counter() - t0,
                         command=f"python -m kernels.{name} " + " ".join(argv if argv is not None else sys.argv[1:]),
                         runs={k: dict(ok=m.ok, **m.meta) for k, m in runs.items()}, ab=a.ab, peaks=peaks)
    claims = next((m.claims for m in runs.values() if m.claims is not None), None)
    out = core.save_report(out_path(a.out), tables=tables, figures=figures, meta=meta, claims=claims)
    ok = all(m.ok for m in runs.values())
    print(f"[kernels.{name}] wrote {out}; checks {'passed' if ok else 'FAILED'}", flush=True)
    return 0 if ok else 1
