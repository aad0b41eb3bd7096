"""The kernel lab's shared command line (kernels/_lab.py): every script imports and shows --help on CPU, --out is anchored at the
repo root, a failed check exits nonzero, and --ab loads another commit's package beside today's in one process."""
import importlib, pkgutil, subprocess
from pathlib import Path
import pandas as pd
import pytest
import torch
import kernels
from kernels import _lab

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(m.name for m in pkgutil.iter_modules(kernels.__path__) if not m.name.startswith("_"))


def test_every_script_is_listed():
    assert {"tensorized_bench", "shadowkv_keys_check", "shadowkv_lab", "shadowkv_decode_profile", "shadowkv_serving", "longppl_speed"} <= set(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_imports_and_shows_help(name, capsys):
    mod = importlib.import_module(f"kernels.{name}")
    assert mod.NAME == name and callable(mod.main) and mod.__doc__
    with pytest.raises(SystemExit) as e: mod.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"python -m kernels.{name}" in out and "--out" in out and "--ab COMMIT" in out


def test_out_is_anchored_at_the_repo_root(tmp_path):
    assert _lab.out_path("reports/kernels/x") == REPO / "reports/kernels/x"
    assert _lab.out_path(tmp_path) == tmp_path
    assert _lab.parser("x", None).parse_args([]).out == "reports/kernels/x"


def _fake_measure(ok):
    return lambda lib, a: _lab.Measured({"t": pd.DataFrame(dict(x=[1.0], package=[lib.package]))}, ok=ok)


@pytest.mark.parametrize("ok,code", [(True, 0), (False, 1)], ids=["passed", "failed"])
def test_exit_status_follows_the_checks(ok, code, tmp_path):
    assert _lab.lab_main("fake", None, _fake_measure(ok), argv=["--out", str(tmp_path / "r")], needs_cuda=False) == code
    assert pd.read_csv(tmp_path / "r" / "t.csv").code.str.startswith("HEAD").all()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where no GPU is visible")
def test_a_gpu_script_without_cuda_exits_2(tmp_path, capsys):
    assert _lab.lab_main("fake", None, _fake_measure(True), argv=["--out", str(tmp_path / "r")]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_peaks_come_from_core():
    from longctx_nb.core import PEAKS
    assert _lab.peaks_for(_lab.parser("x", None).parse_args(["--peaks", "H200"])) == PEAKS["H200"]


@pytest.mark.skipif(subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True).returncode != 0,
                    reason="needs the repo's git history (--ab archives another commit)")
def test_ab_runs_another_commit_beside_today(tmp_path):
    code = _lab.lab_main("fake", None, _fake_measure(True), argv=["--out", str(tmp_path / "r"), "--ab", "HEAD"], needs_cuda=False)
    t = pd.read_csv(tmp_path / "r" / "t.csv")
    assert code == 0 and t.package.tolist() == ["longctx_nb", "longctx_nb_ab"] and t.code.iloc[1].startswith("A/B")
    ab = _lab.Lib("longctx_nb_ab")
    assert ab.core.__name__ == "longctx_nb_ab.core" and ab.core.save_report is not importlib.import_module("longctx_nb.core").save_report
    with pytest.raises(AttributeError, match="none of"): ab.get("no_such_name", "core")
    assert ab.get("no_such_name", "core", was="save_report") is ab.core.save_report


def _library_names_used(src: str) -> tuple[set, list]:
    "(module, name) pairs a script reaches through `lib` (direct `lib.mod.name` and aliases `x = lib.mod`), and its lib.get calls."
    import re
    pairs = set(re.findall(r"\blib\.(\w+)\.(\w+)", src))
    for lhs, rhs in re.findall(r"^\s*([\w, ]+?)\s*=\s*(lib\.\w+(?:\s*,\s*lib\.\w+)*)\s*$", src, re.M):
        for alias, mod in zip([x.strip() for x in lhs.split(",")], re.findall(r"lib\.(\w+)", rhs)):
            pairs |= {(mod, n) for n in re.findall(rf"\b{alias}\.(\w+)", src)}
    gets = [[a.strip().strip('"') for a in call.split(",") if "=" not in a] for call in re.findall(r"lib\.get\(([^)]*)\)", src)]
    return {(m, n) for m, n in pairs if m != "get"}, gets


@pytest.mark.parametrize("name", SCRIPTS)
def test_scripts_use_names_the_package_exports(name):
    "The scripts reach the library only through `lib`; every name they use must exist today (a moved name is a failure here)."
    pairs, gets = _library_names_used((REPO / "kernels" / f"{name}.py").read_text())
    missing = [f"{m}.{n}" for m, n in sorted(pairs) if not hasattr(importlib.import_module(f"longctx_nb.{m}"), n)]
    for n, *mods in gets:
        if not any(hasattr(importlib.import_module(f"longctx_nb.{m}"), n) for m in mods): missing.append(f"{'|'.join(mods)}.{n}")
    assert not missing, f"kernels/{name}.py uses names the package no longer has: {missing}"


def test_figures_claims_and_meta_reach_the_report(tmp_path):
    import json, matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from longctx_nb.core import paper_vs_ours
    def measure(lib, a):
        fig, ax = plt.subplots(figsize=(2, 2)); ax.plot([1, 2]); plt.close(fig)
        claims = paper_vs_ours([dict(claim="speedup", paper=2.0, ours=1.5, setting_difference="fake")])
        return _lab.Measured({"t": pd.DataFrame(dict(x=[1.0]))}, figures={"f": fig}, ok=True, meta=dict(knob=3), claims=claims)
    assert _lab.lab_main("fake", None, measure, argv=["--out", str(tmp_path / "r")], needs_cuda=False) == 0
    d = tmp_path / "r"
    assert (d / "f.png").stat().st_size > 0 and pd.read_csv(d / "paper_vs_ours.csv").ours.tolist() == [1.5]
    meta = json.loads((d / "meta.json").read_text())
    run = next(iter(meta["runs"].values()))
    assert run == dict(ok=True, knob=3) and meta["command"].startswith("python -m kernels.fake")


def test_tensorized_registers_compiles_the_chosen_backward_configs_for_sm90(tmp_path):
    """The compile-only register report (a fresh process: the interpreter this test session runs in cannot compile): every one-pass
    configuration the launcher picks compiles for sm_90, and the dominance mode's spill nothing."""
    import os, sys
    r = subprocess.run([sys.executable, "-m", "kernels.tensorized_registers", "--chosen-only", "--out", str(tmp_path / "regs")], cwd=REPO,
                       capture_output=True, text=True, timeout=900, env={**os.environ, "TRITON_INTERPRET": "0"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    table = pd.read_csv(tmp_path / "regs" / "registers.csv")
    assert len(table) == 8 and table.chosen.all() and set(table["mode"]) == {"dominance", "complete"}
    assert (table[table["mode"] == "dominance"].spill_bytes == 0).all() and (table.registers <= 255).all()


def test_tensorized_model_profile_tiny_profiles_every_model(tmp_path):
    "The profile script end to end on a toy model (CPU): a row per model and run, each with a time and its op tables."
    from kernels import tensorized_model_profile as prof
    assert prof.main(["--tiny", "--out", str(tmp_path / "r")]) == 0
    s = pd.read_csv(tmp_path / "r" / "summary.csv")
    assert len(s) == 9 and set(s.model) == {"full", "dominance", "complete"} and (s.ms > 0).all() and (s.launches > 0).all()
    assert (tmp_path / "r" / "complete_train_2x64_top_host.csv").exists()
