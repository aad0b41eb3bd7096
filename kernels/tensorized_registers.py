"""Registers and spills of the tensorized-attention backward kernels on sm_90 (H100, H200): compile only, no GPU needed.

    python -m kernels.tensorized_registers [--out reports/kernels/tensorized_registers] [--chosen-only]

Triton compiles each kernel for the target with the launcher's specializations at the benchmark's shapes (pointers, the strides, L
and D divisible by 16), and cuobjdump (shipped with triton) reads the cubin's resource usage: registers per thread and stack bytes,
which at 255 registers are spills to local memory. The one-pass backward (ONE_PASS=True of `_tensorized_hop_bwd_dkdv`, the
dominance mode, and of `_tensorized_complete_bwd_dkda`, the complete mode's two streams) is compiled over HEAD_D, BLOCK_N (the whole
fibre's keys), BLOCK_M (the query block) and num_warps; `chosen` marks what `_fused_bwd_blocks` picks. The two-kernel backward's
configurations (`_blocks(..., backward=True)`, ONE_PASS=False) are compiled beside them. `--chosen-only` compiles the chosen configurations alone (the test's mode;
then only the dominance mode's no-spill check can fail).
Check: every chosen configuration spills no more than the least-spilling candidate of its (mode, HEAD_D, BLOCK_N), and none of the
dominance mode's spills. A compile-time fact, not a speed: kernels/tensorized_bench.py measures the kernels on the GPU.
Must run in a fresh process (the interpreter, which the package turns on where no GPU is visible, cannot compile).
"""
import os, sys
if "triton" not in sys.modules: os.environ["TRITON_INTERPRET"] = "0"     # before triton is imported: compile, do not interpret
import itertools, re, subprocess, tempfile
from pathlib import Path
from kernels._lab import lab_main, Measured
import pandas as pd

NAME = "tensorized_registers"
ARCH = 90
POINTER_F32 = {"LSE", "LSE_C", "LSE_A", "DELTA", "DELTA_C", "DELTA_A", "DQ_ACC", "DK_ACC"}
DIVISIBLE_16 = {"sqb", "sqh", "sql", "skb", "skh", "skl", "svb", "svh", "svl", "sob", "soh", "sol", "sdvb", "sdvh", "sdvl",
                "sab", "sah", "sal", "L", "D"}


def resource_usage(fn, constexprs: dict, num_warps: int, num_stages: int) -> dict:
    "Registers and stack bytes of `fn` (a triton.JITFunction) compiled for sm_90 with bf16 tensors (fp32 statistics and running sums)."
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    if not hasattr(fn, "arg_names"):
        raise RuntimeError("the kernels are interpreted in this process (TRITON_INTERPRET=1 before triton was imported): "
                           "run `python -m kernels.tensorized_registers` in a fresh process")
    names = fn.arg_names
    n_ptr = next(i for i, n in enumerate(names) if n[0].islower())          # the kernels take their pointers first
    sig = {n: ("*fp32" if n in POINTER_F32 else "*bf16") if i < n_ptr else "fp32" if n.endswith("_scale") else "i32"
           for i, n in enumerate(names) if n not in constexprs}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in sig if sig[n].startswith("*") or n in DIVISIBLE_16}
    src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in constexprs}}, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", ARCH, 32), options=dict(num_warps=num_warps, num_stages=num_stages))
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as d:
        cubin = Path(d) / "k.cubin"; cubin.write_bytes(kernel.asm["cubin"])
        out = subprocess.run([str(tool), "--dump-resource-usage", str(cubin)], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+).*?STACK:(\d+)", out, re.S)
    if not m: raise RuntimeError(f"no resource usage in cuobjdump's output:\n{out}")
    return dict(registers=int(m[1]), spill_bytes=int(m[2]))


def add_args(ap):
    ap.add_argument("--chosen-only", action="store_true", help="compile only the configurations the launcher picks")


def measure(lib, a) -> Measured:
    T = lib.tensorized
    rows = []
    for mode, head_d, block_n in itertools.product(("dominance", "complete"), (64, 128), (32, 64)):
        streams = 2 if mode == "complete" else 1
        chosen = T._fused_bwd_blocks(block_n, head_d, streams)
        configs = [chosen[::2]] if a.chosen_only else [(bm, w) for bm in (16, 32, 64) if bm <= block_n for w in (4, 8)]
        for block_m, warps in configs:
            if mode == "dominance":
                fn, c = T._tensorized_hop_bwd_dkdv, dict(CAUSAL=True, V_SHARED=False)
            else:
                fn, c = T._tensorized_complete_bwd_dkda, dict(DIAG_FROM_C=True, HAS_A=True, V_SHARED=False)
            c.update(HEAD_D=head_d, ACCUMULATE=True, ONE_PASS=True, BLOCK_M=block_m, BLOCK_N=block_n, PRECISION="tf32")
            use = resource_usage(fn, c, warps, 1)
            rows.append(dict(kernel=fn.__name__, one_pass=True, mode=mode, HEAD_D=head_d, BLOCK_N=block_n, BLOCK_M=block_m,
                             num_warps=warps, **use, chosen=(block_m, block_n, warps) == chosen))
            print(rows[-1], flush=True)
    if not a.chosen_only:      # the two-kernel backward at the same head dims (64-row blocks: fibres longer than one tile)
        for head_d in (64, 128):
            bm, bn, warps = T._blocks(512, head_d, backward=True)
            for fn, c in ((T._tensorized_hop_bwd_dq, dict(CAUSAL=True)),
                          (T._tensorized_hop_bwd_dkdv, dict(CAUSAL=True, V_SHARED=False, ONE_PASS=False))):
                c.update(HEAD_D=head_d, ACCUMULATE=True, BLOCK_M=bm, BLOCK_N=bn, PRECISION="tf32")
                rows.append(dict(kernel=fn.__name__, one_pass=False, mode="dominance", HEAD_D=head_d, BLOCK_N=bn, BLOCK_M=bm,
                                 num_warps=warps, **resource_usage(fn, c, warps, 2), chosen=True))
                print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    fused = table[table.one_pass]
    least = fused.groupby(["mode", "HEAD_D", "BLOCK_N"]).spill_bytes.transform("min")
    picked = fused[fused.chosen]
    ok = bool((picked.spill_bytes <= least[fused.chosen]).all() and (picked[picked["mode"] == "dominance"].spill_bytes == 0).all())
    print(table.to_string(index=False), flush=True)
    return Measured({"registers": table}, ok=ok, meta=dict(arch=f"sm_{ARCH}", chosen_only=bool(a.chosen_only)))


def main(argv=None) -> int:
    return lab_main(NAME, __doc__, measure, add_args, argv, needs_cuda=False)


if __name__ == "__main__":
    sys.exit(main())
