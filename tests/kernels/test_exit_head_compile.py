"""The Triton kernels compile for an H100 (sm_90) without one: the interpreter tests cannot catch errors
of the compiled path (loop-carried types, bool stores, dot shapes), nor loads that lost their vectorisation.
Under TRITON_INTERPRET=1 the kernels are interpreter objects, so this file reruns itself with the flag off."""
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

BF16_ROWS = {"y_ptr": "*bf16", "w_ptr": "*bf16", "inv_temp_ptr": "*fp32", "seed_ptr": "*i64", "ids_ptr": "*i32",
             "part_f_ptr": "*fp32", "part_i_ptr": "*i32", "rows": "i32", "d": "i32", "vocab": "i32", "tiles_per_split": "i32",
             "stride_w": "i32"}
REDUCE = {"part_f_ptr": "*fp32", "part_i_ptr": "*i32", "thresholds_ptr": "*fp32", "inv_temp_ptr": "*fp32",
          "seed_ptr": "*i64", "other_ptr": "*fp32", "ids_ptr": "*i32", "token_ptr": "*i64", "margin_ptr": "*fp32", "exit_ptr": "*i1", "logprob_ptr": "*fp32",
          "max_prob_ptr": "*fp32", "entropy_ptr": "*fp32", "rows": "i32", "num_splits": "i32", "num_listed": "i32"}
NORM = {"x_ptr": "*bf16", "w_ptr": "*bf16", "y_ptr": "*bf16", "rows": "i32", "d": "i32", "stride_x": "i32",
        "eps": "fp32"}
# What the launcher's specialisation sees at run time: 16-byte aligned pointers, strides and d multiples of 16.
ALIGNED = {"y_ptr", "w_ptr", "x_ptr", "part_f_ptr", "d", "stride_w", "stride_x"}


def compile_for_sm90(fn, signature, constexprs, **options):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    names = fn.arg_names
    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in ALIGNED if n in signature and n not in constexprs}
    source = ASTSource(fn=fn, signature=signature, attrs=attrs,
                       constexprs={(names.index(n),): v for n, v in constexprs.items()})
    options = {"enable_fp_fusion": True, **options}
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]


def check_kernels_compile():
    eh = importlib.import_module("kernels.exit_head")
    for sample, block_r, warps in ((False, 16, 4), (True, 64, 8)):
        ptx = compile_for_sm90(eh._partial_kernel, BF16_ROWS,
                               dict(SAMPLE=sample, HAS_IDS=sample, DOT_FP32=False, DOT_PRECISION="tf32",
                                    BLOCK_R=block_r, BLOCK_V=128, BLOCK_D=64), num_warps=warps, num_stages=3)
        assert "mma.sync" in ptx or "wgmma" in ptx, "the dot does not use tensor cores"
        copies = [line for line in ptx.splitlines() if "cp.async.cg.shared.global" in line]
        assert copies and all(", 0x10," in line for line in copies), "loads are not pipelined 16-byte async copies"
        assert "ld.global.b16" not in ptx, "scalar 2-byte weight loads"
    compile_for_sm90(eh._partial_kernel, {**BF16_ROWS, "y_ptr": "*fp32", "w_ptr": "*fp32"},
                     dict(SAMPLE=True, HAS_IDS=False, DOT_FP32=True, DOT_PRECISION="ieee", BLOCK_R=16, BLOCK_V=128,
                          BLOCK_D=32),
                     num_warps=4, num_stages=3)
    for sample, other in ((True, False), (True, True), (False, True)):
        compile_for_sm90(eh._reduce_kernel, REDUCE, dict(SAMPLE=sample, HAS_OTHER=other, HAS_IDS=other, BLOCK_R=8,
                                                         BLOCK_S=512), num_warps=4)
    compile_for_sm90(eh._rmsnorm_kernel, NORM, dict(ROUND_BF16=False, BLOCK_R=2, BLOCK_D=4096), num_warps=4)


def test_kernels_compile_for_hopper():
    eh = importlib.import_module("kernels.exit_head")
    if not eh._INTERPRETED:
        check_kernels_compile()
        return
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, __file__], cwd=Path(__file__).resolve().parents[2], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]


if __name__ == "__main__":
    check_kernels_compile()
