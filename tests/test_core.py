"""The kernel-check rails of longctx_nb.core: NaN poisoning, the named comparison, the peak table, the interpreter setup."""
import os, subprocess, sys
import pytest
import torch
from fastcore.test import test_fail as fails  # (aliased: pytest would collect a name starting with test)
from longctx_nb import core
from longctx_nb.core import nan_poison, assert_close, TOLERANCES, PEAKS, device_peaks, configure_triton_interpreter


# ---------------------------------------------------------------- nan_poison (every test already runs inside one: conftest.py)
@pytest.mark.parametrize("make", [lambda: torch.empty(2, 3), lambda: torch.empty((4,), dtype=torch.float16),
                                  lambda: torch.empty_like(torch.zeros(3, dtype=torch.bfloat16)), lambda: torch.empty_strided((2, 2), (1, 2)),
                                  lambda: torch.zeros(1).new_empty((5,)), lambda: torch.empty(3, requires_grad=True),
                                  lambda: torch.empty(2, dtype=torch.float8_e4m3fn).float()],
                         ids=["empty", "fp16", "empty_like-bf16", "empty_strided", "new_empty", "requires_grad", "fp8"])
def test_fresh_float_buffers_are_nan(make):
    assert make().isnan().all()


def test_integer_bool_and_meta_buffers_are_left_alone():
    assert torch.empty(3, dtype=torch.int32).dtype == torch.int32 and torch.empty(2, dtype=torch.bool).dtype == torch.bool
    assert torch.empty(4, device="meta").is_meta
    with torch.device("meta"): lin = torch.nn.Linear(8, 8)         # torch's device context still applies inside the poison
    assert lin.weight.is_meta


def test_out_argument_and_values_written_after():
    buf = torch.zeros(3)
    torch.empty(3, out=buf)
    assert buf.isnan().all()
    x = torch.empty(4); x[:2] = 1
    assert x[:2].eq(1).all() and x[2:].isnan().all()               # what a kernel forgets to write stays NaN


def test_nesting_and_restore():
    outer = torch.empty                                             # the poisoned one (this test runs inside the fixture)
    with nan_poison():
        with nan_poison(): assert torch.empty(1).isnan().all()
        assert torch.empty is outer and torch.empty(1).isnan().all()
    assert torch.empty is outer and core._POISON_STATE["depth"] >= 1


def test_restored_outside_every_block():
    "Outside the fixture's block, in a fresh process: the originals come back after the outermost block, also after an error."
    code = """
import torch
from longctx_nb.core import nan_poison
orig = (torch.empty, torch.empty_like, torch.empty_strided, torch.Tensor.new_empty)
try:
    with nan_poison():
        with nan_poison(): pass
        assert torch.empty is not orig[0] and torch.empty(2).isnan().all()
        raise KeyError
except KeyError: pass
assert (torch.empty, torch.empty_like, torch.empty_strided, torch.Tensor.new_empty) == orig
with torch.device("meta"): assert torch.nn.Linear(2, 2).weight.is_meta
print("restored")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "restored" in r.stdout, r.stderr[-2000:]


def test_a_failure_inside_restores():
    with pytest.raises(ValueError):
        with nan_poison(): raise ValueError("boom")
    assert core._POISON_STATE["depth"] >= 1 and torch.empty(1).isnan().all()


# ---------------------------------------------------------------- assert_close
def test_assert_close_passes_within_the_dtype_tolerance():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(2, 3, 17, 8, generator=g)
    assert_close("o", ref, ref.clone())
    assert_close("o", ref, ref.bfloat16())                          # bf16 rounding is within bf16's tolerance
    assert_close("o", ref, ref.half())
    assert_close("o", ref, ref + 1e-6)                              # below the fp32 absolute floor
    assert_close("empty", torch.zeros(0, 3), torch.zeros(0, 3))


def test_assert_close_messages_name_the_tensor_and_where():
    ref = torch.zeros(2, 3, 4); out = ref.clone(); out[1, 2, 3] = 0.5
    fails(lambda: assert_close("dq", ref + 1, out + 1), contains="dq (torch.float32): max abs err 0.5 at (1, 2, 3)")
    fails(lambda: assert_close("dq", ref, out[:, :, :3]), contains="shape (2, 3, 3) != reference shape (2, 3, 4)")
    holed = ref.clone(); holed[0, 1, 2] = float("nan")
    fails(lambda: assert_close("o", ref, holed), contains="1 of 24 elements are NaN/Inf where the reference is finite (first at (0, 1, 2))")
    fails(lambda: assert_close("o", ref, torch.full_like(ref, float("inf"))), contains="24 of 24")


def test_assert_close_tolerance_overrides():
    ref = torch.ones(100); out = ref * 1.001                        # rms ratio 1e-3
    fails(lambda: assert_close("x", ref, out), contains="rms ratio 0.001 > 0.0001")
    assert_close("x", ref, out, tol=2e-3)
    assert_close("x", ref, out, tol=dict(atol=2e-3))
    fails(lambda: assert_close("x", ref, out, tol=dict(atol=1e-4, ratio=1e-4)), contains="max abs err")


def test_tolerances_grow_as_precision_falls():
    r = [TOLERANCES[d]["ratio"] for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16)]
    assert r == sorted(r) and all(TOLERANCES[d]["atol"] > 0 for d in TOLERANCES)


# ---------------------------------------------------------------- PEAKS
@pytest.mark.parametrize("label,row", [("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H200", "H200"),
                                       ("h200", "H200"), ("H100 SXM", "H100 SXM")])
def test_device_peaks_by_cuda_name(label, row):
    assert device_peaks(label) is PEAKS[row]


def test_peak_values_and_units():
    h200 = PEAKS["H200"]
    assert (h200.bf16_tflops, h200.hbm_gb_s) == (989.0, 4800.0) and h200.flop_s == 989e12 and h200.bytes_s == 4.8e12
    assert PEAKS["H100 SXM"].hbm_gb_s == 3350.0 and PEAKS["H100 PCIe"].bf16_tflops == 756.0


def test_unknown_gpu_needs_a_default():
    fails(lambda: device_peaks("NVIDIA A100-SXM4-80GB"), contains="no peaks known for GPU 'NVIDIA A100-SXM4-80GB'")
    fails(lambda: device_peaks("NVIDIA H100 NVL"), contains="no peaks known")
    assumed = device_peaks("NVIDIA A100-SXM4-80GB", default="H200")
    assert assumed.name == "H200 (assumed for NVIDIA A100-SXM4-80GB)" and assumed.hbm_gb_s == 4800.0
    fails(lambda: device_peaks("x", default="B200"), contains="default must be one of")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where no GPU is visible")
def test_no_gpu_no_peaks():
    fails(lambda: device_peaks(), contains="no CUDA GPU is visible")
    assert device_peaks(default="H100 SXM").name.startswith("H100 SXM (assumed")


@pytest.mark.gpu
def test_this_gpu_has_peaks():
    assert device_peaks().name in PEAKS


# ---------------------------------------------------------------- the Triton interpreter
def test_configure_triton_interpreter_is_idempotent():
    on = configure_triton_interpreter()
    assert configure_triton_interpreter() == on == (os.environ.get("TRITON_INTERPRET") == "1")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the scalar fix applies in interpreter mode only (CPU here)")
def test_interpreter_scalar_fix_is_in_place():
    from triton.runtime import interpreter
    assert getattr(interpreter._patch_lang_tensor, "_longctx_fixed", False) and "triton" in sys.modules


def test_notebook_parameters_read_literals_and_refuse_bad_pairs():
    from longctx_nb.core import notebook_parameters
    assert notebook_parameters(["train_batch=4", "lr=1e-4", "x=None", "name=smollm2-135m", "s='a=b'"]) == \
        dict(train_batch=4, lr=1e-4, x=None, name="smollm2-135m", s="a=b")
    assert notebook_parameters(None) == {}
    for bad in ("train_batch", "=4", "2x=1"):
        fails(lambda: notebook_parameters([bad]), contains="KEY=VALUE")


def test_reproduce_cli_passes_params_to_every_notebook(monkeypatch):
    import longctx_nb.core as core
    seen = {}
    def fake_reproduce(config, out, only, keep_going=False, timeout=None, parameters=None):
        seen.update(parameters=parameters, only=only)
        return [dict(notebook="40_longppl", config="smoke", ok=True, wall_s=0.0)]
    monkeypatch.setattr(core, "reproduce", fake_reproduce)
    assert core.reproduce_cli(["--config", "smoke", "--only", "40", "--param", "train_batch=2", "--param", "lr=3e-5"]) == 0
    assert seen == dict(parameters=dict(train_batch=2, lr=3e-5), only=["40"])


@pytest.mark.gpu
def test_capture_graph_replays_the_step_and_resets_around_the_capture():
    "capture_graph: warm-up runs eagerly, reset() after the warm-up and after the capture, each replay redoes the step on the GPU."
    x = torch.zeros(4, device="cuda"); calls = []
    def step(): x.add_(1.0)
    def reset(): calls.append(float(x[0])); x.zero_()
    graph = core.capture_graph(step, "cuda", warmup=3, reset=reset)
    assert calls == [3.0, 0.0]                       # the warm-up ran three times; the capture itself ran nothing
    for _ in range(5): graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(x, torch.full((4,), 5.0, device="cuda"))
