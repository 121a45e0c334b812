"""CI check (CPU only): every Triton kernel compiles to an H100 (sm_90) cubin.

Uses the launch configurations of `triton_impl` itself (compile_specs), for
bf16 and fp32 inputs, so a kernel that cannot compile for the GPU fails here
rather than on the first GPU run.
"""

import pytest

triton = pytest.importorskip("triton")

from asyncrl.kernels import triton_impl  # noqa: E402

H100 = triton.backends.compiler.GPUTarget("cuda", 90, 32)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_triton_kernels_compile_for_h100(dtype):
    if triton_impl.INTERPRET:
        pytest.skip("TRITON_INTERPRET=1: kernels are interpreted functions, nothing to compile")
    specs = triton_impl.compile_specs(dtype)
    assert len(specs) == 3
    for kernel, signature, constexprs, options in specs:
        src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        compiled = triton.compile(src, target=H100, options=options)
        assert compiled.asm.get("cubin"), f"{kernel.__name__}: no cubin"
        assert ".target sm_90" in compiled.asm["ptx"], f"{kernel.__name__}: wrong target"
