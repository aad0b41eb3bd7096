"""A tiny `train_lm` job for tests/test_distributed.py: CE and LongCE on a random tiny Llama, the same global batches on every rank.

Run it under several processes (on CPUs, gloo):
    CUDA_VISIBLE_DEVICES= ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 tests/distributed_job.py --out DIR
or call `run(DIR)` in one process for the reference. Every rank writes DIR/rank<r>.json (its loss histories and a hash of its trained
parameters); every rank *asks* to write a report (core.save_report) and a checkpoint (Accelerator.save_model) under a name carrying
its rank, so the test can see that only the main process wrote them.
"""
import argparse, hashlib, json, os, sys
from pathlib import Path
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import tiny_llama  # noqa: E402

STEPS, GLOBAL_BATCH, LENGTH = 3, 4, 32


def global_batches(seed: int = 0):
    "An endless stream of [GLOBAL_BATCH, LENGTH] token ids, identical on every rank (the same seed)."
    g = torch.Generator().manual_seed(seed)
    while True: yield torch.randint(0, 128, (GLOBAL_BATCH, LENGTH), generator=g)


def param_hash(model) -> str:
    "sha256 of every parameter's float32 bytes, in name order."
    h = hashlib.sha256()
    for n, p in sorted(model.named_parameters()):
        h.update(n.encode()); h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class Recorded:
    "A loss_fn that remembers what it was given: the first token of every row, and the model's wrapper class (DDP under a launch)."
    def __init__(self, fn): self.fn, self.rows, self.wrapper = fn, [], None
    def __call__(self, model, batch):
        self.rows.append(batch[:, 0].tolist()); self.wrapper = type(model).__name__
        return self.fn(model, batch)


def run(out: str | Path) -> dict:
    import pandas as pd
    from accelerate import Accelerator
    from longctx_nb.core import save_report
    from longctx_nb.models import train_lm, causal_lm_loss
    from longctx_nb.longppl import LongCELoss
    out = Path(out); out.mkdir(parents=True, exist_ok=True)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    res, rows = dict(rank=rank, world_size=world), []
    # LongCE as 40's full preset runs it: with gradient checkpointing (under DDP too)
    for name, loss_fn, ckpt in [("CE", causal_lm_loss, False), ("LongCE", LongCELoss(trunc_len=8, sliding_window=8, window_batch=4), True)]:
        model, rec = tiny_llama(seed=0), Recorded(loss_fn)
        hist = train_lm(model, global_batches(), steps=STEPS, lr=1e-3, loss_fn=rec, progress=False, gradient_checkpointing=ckpt)
        res[name] = dict(loss=[h["loss"] for h in hist], lr=[h["lr"] for h in hist], params=param_hash(model), device=str(next(model.parameters()).device),
                         rows=rec.rows, wrapper=rec.wrapper)
        rows += [dict(loss_fn=name, **h) for h in hist]
    save_report(out / f"report-rank{rank}", tables=dict(history=pd.DataFrame(rows)), meta=dict(rank=rank, world_size=world))
    Accelerator().save_model(model, out / f"checkpoint-rank{rank}")     # writes on the main process only
    (out / f"rank{rank}.json").write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    run(ap.parse_args().out)
