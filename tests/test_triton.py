"""The Triton kernel of Newton-Schulz's Gram matrix X @ X^T, run on the CPU by Triton's interpreter.

TRITON_INTERPRET is read when a kernel is defined, that is when kernels.py is imported, so the checks
run in a fresh interpreter: this process imported it without."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, cpu_env

triton = pytest.importorskip("triton")
# Triton 3.6's interpreter turns one-element arrays into Python ints, which NumPy 2.4 refuses; 3.7 does not
OLD_INTERPRETER = (tuple(map(int, triton.__version__.split(".")[:2])) < (3, 7)
                   and tuple(map(int, np.__version__.split(".")[:2])) >= (2, 4))

CHECKS = r"""
import json, math, sys
import torch
import kernels
import train_gpt

assert kernels.INTERPRET, "the kernel must run interpreted"
torch.manual_seed(0)
out = []
for shape, block_m, block_k in json.loads(sys.argv[1]):
    X = torch.randn(shape)
    A32 = kernels.gram(X, block_m, block_k)
    ref = X.double() @ X.double().mT
    Xb = X.bfloat16()
    A16 = kernels.gram(Xb, block_m, block_k)
    exact = Xb.double() @ Xb.double().mT  # bf16 products and their sums, without rounding
    ulp = torch.exp2(torch.floor(torch.log2(torch.maximum(exact.abs(), A16.double().abs()).clamp_min(1e-30))) - 7)
    accumulation = shape[-1] * 2.0 ** -24 * (Xb.double().abs() @ Xb.double().abs().mT)  # fp32 sums' error bound
    fp32_sums = kernels.gram(Xb.float(), block_m, block_k)  # the same sums, kept in fp32
    out.append(dict(
        shape=shape, dtypes=[str(A32.dtype), str(A16.dtype)], shapes=[list(A32.shape), list(A16.shape)],
        fp32_rel=((A32.double() - ref).abs().max() / ref.abs().max()).item(),
        bf16_ulps=((A16.double() - exact).abs() / (ulp + accumulation)).max().item(),
        bf16_is_fp32_truncated=bool(torch.equal(A16.float(), (fp32_sums.view(torch.int32) & ~0xFFFF).view(torch.float32))),
        symmetric=bool(torch.equal(A32, A32.mT) and torch.equal(A16, A16.mT))))
G = torch.randn(3, 96, 40)  # tall: Newton-Schulz iterates on the 40 x 40 Gram matrix
kernel = train_gpt.newton_schulz(G, dtype=torch.float32)
torch_only = train_gpt.newton_schulz(G, dtype=torch.float32, triton_gram=False)  # the same with torch's matmul
print(json.dumps(dict(cases=out, ns_diff=(kernel - torch_only).abs().max().item())))
"""

CASES = [  # (shape, BLOCK_M, BLOCK_K): square, tall, wide, batched; sizes that are not multiples of the blocks
    ((64, 64), 64, 32), ((130, 40), 64, 32), ((37, 100), 32, 32), ((100, 37), 64, 16), ((3, 70, 130), 32, 64),
    ((1, 16), 16, 16),
]


@pytest.fixture(scope="module")
def interpreted():
    if OLD_INTERPRETER:
        pytest.skip(f"Triton {triton.__version__}'s interpreter needs NumPy < 2.4, not {np.__version__}")
    result = subprocess.run([sys.executable, "-c", CHECKS, json.dumps(CASES)], cwd=ROOT, capture_output=True,
                            text=True, timeout=600, env={**cpu_env(), "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize("index", range(len(CASES)))
def test_gram_kernel_matches_torch(interpreted, index):
    """fp32 to float rounding. bf16: inputs loaded as bf16 and summed in fp32, then stored as bf16, which
    the interpreter does by truncation where a GPU rounds: so within 1 bf16 ulp of the exact value, plus
    what fp32 sums can lose to cancellation (K 2^-24 |X||X|^T), and bit for bit the kernel's fp32 sums
    truncated. Exactly symmetric, in the input's dtype."""
    case = interpreted["cases"][index]
    shape = CASES[index][0]
    assert case["shapes"] == [[*shape[:-1], shape[-2]]] * 2
    assert case["dtypes"] == ["torch.float32", "torch.bfloat16"]
    assert case["fp32_rel"] < 1e-6, case
    assert case["bf16_ulps"] <= 1.0, case
    assert case["bf16_is_fp32_truncated"], case
    assert case["symmetric"], case


def test_newton_schulz_with_the_kernel_matches_torch(interpreted):
    assert interpreted["ns_diff"] < 1e-5


@pytest.mark.parametrize("arch, product", [(90, "wgmma"), (80, "mma.sync")])
def test_the_gpu_path_compiles(arch, product):
    """What the interpreter does not run, bf16 tiles straight into tensor-core products, compiled to PTX
    on the CPU for Hopper and Ampere."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import kernels
    signature = {"X": "*bf16", "A": "*bf16", **{name: "i32" for name in ("M", "K", "sxb", "sxm", "sxk", "sab", "sam", "san")},
                 **{name: "constexpr" for name in ("BLOCK_M", "BLOCK_K", "IEEE", "UPCAST")}}
    source = ASTSource(fn=kernels.gram_kernel, signature=signature,
                       constexprs=dict(BLOCK_M=64, BLOCK_K=32, IEEE=False, UPCAST=False))
    ptx = triton.compile(source, target=GPUTarget("cuda", arch, 32)).asm["ptx"]
    assert product in ptx and "bf16" in ptx


def test_a_failing_kernel_falls_back_to_torch_once(monkeypatch):
    import kernels

    class Broken:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise RuntimeError("no kernel image for this card")
            return launch
    monkeypatch.setattr(kernels, "gram_kernel", Broken())
    monkeypatch.setattr(kernels, "failed", [])
    X = torch.randn(2, 8, 5)
    with pytest.warns(UserWarning, match="the Triton Gram kernel failed .*no kernel image"):
        assert torch.equal(kernels.gram(X), X @ X.mT)
    assert len(kernels.failed) == 1
    assert not kernels.gram_by_kernel(X.cuda() if torch.cuda.is_available() else X)
