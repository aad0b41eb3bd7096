"""train_lm on several processes: two CPU processes (gloo) launched by `accelerate launch` train like one process at equal global
batch, stay synchronized, and only the main process writes; plus, without launching anything, the rank rules of core
(default_device, save_report, reproduce) and of shard_batch.

Why `--multi_gpu` with the CPU forced by the environment rather than `accelerate launch --num_processes 2 --cpu`: in accelerate 1.x
`--cpu` without an MPI hostfile goes to the simple launcher, which starts ONE process (no RANK/WORLD_SIZE), so two "processes" would
silently be one process training alone. `--multi_gpu` starts torchrun workers; ACCELERATE_USE_CPU=1 and CUDA_VISIBLE_DEVICES="" make
them MULTI_CPU (gloo) on any machine.
"""
import json, os, socket, subprocess, sys
from pathlib import Path
import pytest
import torch
from fastcore.test import test_fail as fails  # (not named test_*: pytest would collect it)

import distributed_job as job
import longctx_nb.core as core
from longctx_nb.models import shard_batch, train_lm
from helpers import tiny_llama

REPO = Path(__file__).resolve().parents[1]
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no"]


def _free_port() -> int:
    with socket.socket() as s: s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    "One 2-process launch of tests/distributed_job.py (CE and LongCE); its output folder and both ranks' results."
    out = tmp_path_factory.mktemp("two_processes")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(CUDA_VISIBLE_DEVICES="", ACCELERATE_USE_CPU="1")
    r = subprocess.run(LAUNCH + ["--main_process_port", str(_free_port()), str(REPO / "tests" / "distributed_job.py"), "--out", str(out)],
                       env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"launch failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return out, [json.loads((out / f"rank{i}.json").read_text()) for i in range(2)]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    "The same job in this process (world size 1): the reference."
    return job.run(tmp_path_factory.mktemp("one_process"))


@pytest.mark.parametrize("loss_fn", ["CE", "LongCE"])
def test_two_processes_train_like_one(two_processes, one_process, loss_fn):
    _, ranks = two_processes
    ref = one_process[loss_fn]
    assert one_process["world_size"] == 1 and ref["wrapper"] == "LlamaForCausalLM"
    for r in ranks:
        assert r["world_size"] == 2 and r[loss_fn]["wrapper"] == "DistributedDataParallel" and r[loss_fn]["device"] == "cpu"
        # one LR-schedule step per optimizer step (accelerate's default would step it num_processes times: split_batches=True)
        assert r[loss_fn]["lr"] == ref["lr"]
        # the logged loss is the global loss (reduced across ranks); equal to float tolerance, not bitwise: half batches and gloo's
        # sum change the reduction order
        assert r[loss_fn]["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=0), (r[loss_fn]["loss"], ref["loss"])


@pytest.mark.parametrize("loss_fn", ["CE", "LongCE"])
def test_each_rank_trains_on_its_half_of_the_global_batch(two_processes, one_process, loss_fn):
    _, ranks = two_processes
    g = job.global_batches()
    for step, full in enumerate(one_process[loss_fn]["rows"]):
        assert full == next(g)[:, 0].tolist()                                  # the reference saw whole global batches
        half = len(full) // 2
        assert ranks[0][loss_fn]["rows"][step] == full[:half] and ranks[1][loss_fn]["rows"][step] == full[half:]


@pytest.mark.parametrize("loss_fn", ["CE", "LongCE"])
def test_gradients_are_synchronized(two_processes, one_process, loss_fn):
    "Both replicas end with bitwise-identical parameters (DDP averaged the gradients), and training moved them."
    _, (r0, r1) = two_processes
    assert r0[loss_fn]["params"] == r1[loss_fn]["params"]
    assert r0[loss_fn]["params"] != job.param_hash(tiny_llama(seed=0))


def test_only_the_main_process_writes(two_processes):
    out, _ = two_processes
    assert json.loads((out / "report-rank0" / "meta.json").read_text())["rank"] == 0
    assert (out / "report-rank0" / "history.csv").exists() and not (out / "report-rank1").exists()
    assert (out / "checkpoint-rank0" / "model.safetensors").exists()
    # accelerate's save_model makes the folder on every rank, but writes the weights on the main process only
    assert not [p for p in (out / "checkpoint-rank1").rglob("*") if p.is_file()]


# ---------------------------------------------------------------- the rank rules, on CPU, without launching anything
def test_shard_batch():
    t = torch.arange(24).view(6, 4)
    assert torch.equal(torch.cat([shard_batch(t, r, 3) for r in range(3)]), t) and shard_batch(t, 0, 1) is t
    d = shard_batch({"input_ids": t, "labels": -t, "name": "x"}, 1, 2)
    assert torch.equal(d["input_ids"], t[3:]) and torch.equal(d["labels"], -t[3:]) and d["name"] == "x"
    fails(lambda: shard_batch(t, 0, 4), contains="6 rows does not split across 4 processes")
    fails(lambda: shard_batch({"a": t, "b": t[:2]}, 0, 2), contains="same number of rows")
    fails(lambda: shard_batch([t], 0, 2), contains="tensor or a dict of tensors")


def test_one_process_trains_where_the_model_is(monkeypatch):
    "A model on the CPU trains on the CPU (no move to a GPU, no bf16 autocast) even when a GPU is visible."
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"): monkeypatch.delenv(k, raising=False)
    m = tiny_llama(seed=0)
    hist = train_lm(m, iter([torch.randint(0, 128, (2, 16))]), steps=1, lr=1e-3, progress=False)
    assert next(m.parameters()).device.type == "cpu" and len(hist) == 1 and hist[0]["loss"] > 0


def test_default_device_under_a_launch(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2"); monkeypatch.setenv("LOCAL_RANK", "1")
    if not torch.cuda.is_available(): assert core.default_device() == torch.device("cpu")
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True); monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert core.default_device() == torch.device("cuda", 1) and chosen == [torch.device("cuda", 1)]
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert core.default_device() == torch.device("cuda")


def test_save_report_writes_on_rank_0_only(monkeypatch, tmp_path):
    import pandas as pd
    monkeypatch.setenv("RANK", "1")
    assert core.save_report(tmp_path / "r", tables=dict(t=pd.DataFrame(dict(a=[1]))), meta=dict(x=1)) is None
    assert not (tmp_path / "r").exists() and not list(tmp_path.iterdir())
    monkeypatch.setenv("RANK", "0")
    assert core.save_report(tmp_path / "r", tables=dict(t=pd.DataFrame(dict(a=[1]))), meta=dict(x=1)) == (tmp_path / "r").resolve()
    assert (tmp_path / "r" / "t.csv").exists()


@pytest.mark.parametrize("rank", [0, 1])
def test_reproduce_writes_on_rank_0_only(monkeypatch, tmp_path, rank):
    "Every rank runs the notebooks; rank != 0 runs them with no report folder, into a temp folder, and builds no index."
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp")); (tmp_path / "tmp").mkdir()
    calls = []
    def fake_run_notebook(nb, config, reports_dir, work_dir, timeout=None, parameters=None):
        calls.append(dict(nb=Path(nb).stem, reports_dir=reports_dir, work_dir=Path(work_dir), parameters=parameters))
        return None if reports_dir is None else Path(reports_dir) / Path(nb).stem / config
    monkeypatch.setattr(core, "run_notebook", fake_run_notebook)
    monkeypatch.setenv("RANK", str(rank)); monkeypatch.setenv("WORLD_SIZE", "2")
    res = core.reproduce("smoke", tmp_path / "reports", only=["00"], repo=REPO, parameters=dict(train_batch=2))
    assert [r["ok"] for r in res] == [True] and [c["nb"] for c in calls] == ["00_core"]
    assert calls[0]["parameters"] == dict(train_batch=2)     # every rank gets the same knobs
    if rank == 0:
        assert calls[0]["reports_dir"] == tmp_path / "reports" and (tmp_path / "reports" / "README.md").exists()
        assert calls[0]["work_dir"] == REPO / "build" / "executed"
    else:
        assert calls[0]["reports_dir"] is None and not (tmp_path / "reports").exists()
        assert REPO not in calls[0]["work_dir"].parents


def test_reproduce_under_a_launch_runs_one_notebook(monkeypatch, tmp_path):
    "Each notebook's kernel joins the launch's process group once, so a launch runs one notebook; asking for two is an error."
    monkeypatch.setattr(core, "run_notebook", lambda *a, **k: pytest.fail("no notebook may run"))
    monkeypatch.setenv("RANK", "0"); monkeypatch.setenv("WORLD_SIZE", "2")
    fails(lambda: core.reproduce("smoke", tmp_path / "reports", only=["11", "40"], repo=REPO), contains="one notebook per launch")
    assert not (tmp_path / "reports").exists()
