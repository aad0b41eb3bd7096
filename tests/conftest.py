"""Shared fixtures: every test runs with NaN-poisoned fresh buffers, `gpu`-marked tests skip without CUDA (saying so), a tiny random
Llama, and the folder the smoke run wrote its reports to. Plain helpers (assert_close, configs, kernel inputs) are in helpers.py."""
import os
from pathlib import Path
import pytest
import longctx_nb.core  # noqa: F401  (sets TRITON_INTERPRET=1 on CPU before anything imports triton)
from longctx_nb.core import nan_poison
import torch
from helpers import tiny_llama_config, report_dir  # noqa: F401  (their home is helpers.py; importable from here for older tests)

GPU_SKIP_REASON = ("needs a CUDA GPU and torch.cuda.is_available() is False here; "
                   "these run on the GPU machine (bash tools/gpu/test.sh, see tools/gpu/README.md)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available(): return
    skip = pytest.mark.skip(reason=GPU_SKIP_REASON)
    for item in items:
        if "gpu" in item.keywords: item.add_marker(skip)


@pytest.fixture(autouse=True)
def _nan_poisoned_buffers():
    "Every test runs inside core.nan_poison(): a buffer from torch.empty* that a kernel forgets to write reads as NaN."
    with nan_poison(): yield


@pytest.fixture
def tiny_llama():
    "A 2-layer Llama with GQA (4 q heads, 2 kv heads), random weights, float32, eval mode."
    from helpers import tiny_llama as make
    return make()


@pytest.fixture(scope="session")
def smoke_reports():
    "The reports folder of this CI run's smoke reproduction (LONGCTX_REPORTS), or reports/ of the repo."
    p = Path(os.environ.get("LONGCTX_REPORTS") or Path(__file__).resolve().parents[1] / "reports")
    if not p.exists(): pytest.fail(f"no reports at {p}: run `make test` (which runs the smoke reproduction first)")
    return p
