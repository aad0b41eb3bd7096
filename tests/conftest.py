"Shared fixtures: a tiny random Llama (no weights to download) and the folder the smoke run wrote its reports to."
import os
from pathlib import Path
import pytest
import longctx_nb.core  # noqa: F401  (sets TRITON_INTERPRET=1 on CPU before anything imports triton)
import torch


def tiny_llama_config(**kw):
    from transformers import LlamaConfig
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=True)
    base.update(kw)
    return LlamaConfig(**base)


@pytest.fixture
def tiny_llama():
    "A 2-layer Llama with GQA (4 q heads, 2 kv heads), random weights, float32, eval mode."
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


@pytest.fixture(scope="session")
def smoke_reports():
    "The reports folder of this CI run's smoke reproduction (LONGCTX_REPORTS), or reports/ of the repo."
    p = Path(os.environ.get("LONGCTX_REPORTS") or Path(__file__).resolve().parents[1] / "reports")
    if not p.exists(): pytest.fail(f"no reports at {p}: run `make test` (which runs the smoke reproduction first)")
    return p


def report_dir(root: Path, notebook: str, config: str = "smoke") -> Path:
    d = root / notebook / config
    assert (d / "meta.json").exists(), f"{d} has no meta.json: did the {notebook} smoke run fail?"
    return d
