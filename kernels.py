"""Triton kernels of train_gpt.py. Logged with the trainer, so a run's log holds every line it ran.

gram(X) is X @ X^T for Newton-Schulz: on CUDA in 16-bit it runs the kernel below, elsewhere torch's
matmul does the same product. Tests run the kernel on the CPU under Triton's interpreter
(TRITON_INTERPRET=1, read when this module is imported).
"""
import os
import warnings

import torch

try:  # without Triton, torch's matmul does the same product
    import triton
    import triton.language as tl
except ImportError:
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton on the CPU: how the kernel is tested
failed = []  # the error, once the kernel failed on this machine

if triton is not None:
    @triton.jit
    def gram_kernel(X, A, M, K, sxb, sxm, sxk, sab, sam, san, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                    IEEE: tl.constexpr, UPCAST: tl.constexpr):
        """A[b] = X[b] @ X[b]^T. A is symmetric: the program of tile (i, j) with i <= j computes it,
        accumulating in fp32, and stores it at (i, j) and transposed at (j, i), exactly symmetric
        (a diagonal tile keeps its upper half); programs below the diagonal return at once."""
        i, j, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        if i > j:
            return
        rows = i * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = j * BLOCK_M + tl.arange(0, BLOCK_M)
        ks = tl.arange(0, BLOCK_K)
        X += b.to(tl.int64) * sxb  # offsets past 2^31 elements in a large batch
        acc = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            left = tl.load(X + rows[:, None] * sxm + (k + ks)[None, :] * sxk,
                           mask=(rows[:, None] < M) & ((k + ks)[None, :] < K), other=0.0)
            right = tl.load(X + cols[None, :] * sxm + (k + ks)[:, None] * sxk,  # X[cols]^T, (BLOCK_K, BLOCK_M)
                            mask=(cols[None, :] < M) & ((k + ks)[:, None] < K), other=0.0)
            if UPCAST:  # the interpreter's bf16 dot is wrong; bf16 products are exact in fp32 anyway
                left, right = left.to(tl.float32), right.to(tl.float32)
            acc = tl.dot(left, right, acc, input_precision="ieee" if IEEE else "tf32")
        out = acc.to(A.dtype.element_ty)
        A += b.to(tl.int64) * sab
        inside = (rows[:, None] < M) & (cols[None, :] < M)
        tl.store(A + rows[:, None] * sam + cols[None, :] * san, out, mask=inside & (rows[:, None] <= cols[None, :]))
        tl.store(A + cols[None, :] * sam + rows[:, None] * san, out, mask=inside & (rows[:, None] < cols[None, :]))


def gram_by_kernel(X):
    """Whether Newton-Schulz's products of X go through the kernel: on CUDA in 16-bit (in fp32 the
    kernel would forgo the tensor cores that torch's matmul uses), or anywhere under the interpreter."""
    on_gpu = X.is_cuda and X.dtype in (torch.bfloat16, torch.float16)
    return triton is not None and (on_gpu or INTERPRET) and not failed


def gram(X, block_m=64, block_k=32):
    """X @ X^T for a matrix or a batch of them (..., M, K) -> (..., M, M), by the Triton kernel. Should
    it fail to build or launch on a card, the run warns once and goes on with torch (not under the
    interpreter, where the tests must see the error)."""
    batch = X.reshape(-1, *X.shape[-2:])
    B, M, K = batch.shape
    A = torch.empty(B, M, M, dtype=X.dtype, device=X.device)
    tiles = triton.cdiv(M, block_m)
    try:
        gram_kernel[(tiles, tiles, B)](batch, A, M, K, *batch.stride(), *A.stride(), BLOCK_M=block_m,
                                       BLOCK_K=block_k, IEEE=X.dtype == torch.float32, UPCAST=INTERPRET)
    except Exception as e:
        if INTERPRET:
            raise
        failed.append(e)
        warnings.warn(f"the Triton Gram kernel failed ({type(e).__name__}: {e}); Newton-Schulz uses torch's matmul")
        return X @ X.mT
    return A.view(*X.shape[:-1], M)
