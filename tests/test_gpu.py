"""The CUDA path, on a GPU: `./run.sh test -m gpu`. Every test here is skipped without CUDA.

FlexAttention compiled, forward and backward, against dense SDPA; the Triton kernel inside
Newton-Schulz; a compiled training step; resume on one GPU; one process against two over NCCL; the
CIFAR-10 trainer in fp16, channels-last and compiled; and the preflight's CUDA checks on a small model.
Tolerances are bf16's: GPU kernels sum in other orders than the CPU and than each other."""
import dataclasses
import math
import os
import re
import subprocess
import sys

import pytest
import torch

import kernels
import train_cifar
import train_gpt
from cifar10 import write_synthetic
from conftest import ROOT, run_trainer, tiny_config, train_lines
from tools import preflight
from tools.logs import parse_step

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

EOT = 0
CASES = {  # window, end-of-text positions: documents and windows that cross 128-token blocks
    "document": (10_000, [5, 200, 201, 640, 900]),
    "window": (300, []),
    "document+window": (300, [130, 700]),
}


def cuda():
    return torch.device("cuda", torch.cuda.current_device())


def gpu_env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def relative_error(x, reference):
    return ((x.double() - reference.double()).abs().max() / reference.double().abs().max()).item()


def gpu_config(char_shards, tmp_path, **overrides):
    """tiny_config as a GPU runs it: bf16, compiled (FlexAttention needs it), sequences of several blocks."""
    base = dict(dtype="bfloat16", compile=True, seq_len=256, window=256, batch_size=4, micro_batch_size=2,
                model_dim=64, head_dim=32)
    return tiny_config(char_shards, tmp_path, **{**base, **overrides})


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("case", CASES)
def test_compiled_flex_attention_matches_dense_sdpa_forward_and_backward(case, head_dim):
    """In bf16, compiled FlexAttention with the model's block mask is as close to an fp32 reference as
    SDPA with the same mask evaluated densely (within 2x, or one bf16 ulp), for the output and q, k, v's
    gradients."""
    window, eots = CASES[case]
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 50, (2, 1024), generator=g)
    tokens[0, eots] = EOT
    tokens = tokens.to(cuda())
    q, k, v, grad = (torch.randn(2, 4, 1024, head_dim, generator=g).to(cuda()) for _ in range(4))
    dense_mask = train_gpt.attention_mask(tokens, EOT, window, flex=False)
    block_mask = train_gpt.attention_mask(tokens, EOT, window, flex=True)

    def run(fn, mask, dtype):
        inputs = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*inputs, mask)
        out.backward(grad.to(dtype))
        return [out.detach()] + [t.grad for t in inputs]
    reference = run(train_gpt.attend, dense_mask, torch.float32)
    dense = run(train_gpt.attend, dense_mask, torch.bfloat16)
    flex = run(torch.compile(train_gpt.attend), block_mask, torch.bfloat16)
    for name, f, d, r in zip(["output", "dq", "dk", "dv"], flex, dense, reference):
        assert relative_error(f, r) <= max(2 * relative_error(d, r), 2 ** -8), name


def test_newton_schulz_runs_the_triton_kernel_and_matches_torch():
    """On CUDA in bf16 the Gram products go through the kernel: it must not fail over to torch, and the
    result must match torch's matmul to bf16 rounding, for the record's shapes and odd ones."""
    assert kernels.triton is not None and kernels.gram_by_kernel(torch.empty(1, device=cuda(), dtype=torch.bfloat16))
    g = torch.Generator().manual_seed(0)
    for shape in [(768, 768), (3072, 768), (768, 3072), (3, 100, 37), (130, 40)]:
        X = torch.randn(*shape, generator=g).to(cuda(), torch.bfloat16)
        A = kernels.gram(X)
        exact = X.double() @ X.double().mT
        assert torch.equal(A, A.mT), shape
        assert relative_error(A, exact) <= max(2 * relative_error(X @ X.mT, exact), 2 ** -8), shape
        G = torch.randn(2, *shape[-2:], generator=g).to(cuda())
        with_kernel = train_gpt.newton_schulz(G, 5, torch.bfloat16, triton_gram=True)
        without = train_gpt.newton_schulz(G, 5, torch.bfloat16, triton_gram=False)
        torch.testing.assert_close(with_kernel.float(), without.float(), atol=0.05, rtol=0.05)
    assert not kernels.failed, kernels.failed


def test_compiled_training_step_learns_and_matches_eager(char_shards, tmp_path):
    """build() as training: FlexAttention, torch.compile, fused Adam, the Triton kernel. On a repeated batch
    the loss stays finite and falls; then the compiled model's loss equals the eager dense path's."""
    cfg = gpu_config(char_shards, tmp_path, eot_token=EOT)
    torch.manual_seed(0)
    raw_model, model, ddp_model, optimizers = train_gpt.build(cfg, 0, 1, cuda())
    assert raw_model.flex and optimizers[0].defaults["fused"]
    batches = train_gpt.random_batches(cfg, 1, cuda())
    losses = [train_gpt.train_step(0, batches, cfg, ddp_model, optimizers, 1)[0] for _ in range(10)]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.5, losses
    x, y = batches[0]
    with torch.no_grad():  # after training: the head and projections are no longer zero
        compiled, eager = model(x, y), raw_model(x, y, flex=False)
    assert compiled.item() == pytest.approx(eager.item(), rel=2e-2)
    assert not kernels.failed


def test_resume_on_one_gpu_continues_the_run(char_shards, tmp_path):
    """Stopped after step 4 (checkpoint at step 3) and resumed: the later losses are the uninterrupted run's,
    to GPU kernels' non-determinism, and so are the final weights."""
    cfg = gpu_config(char_shards, tmp_path, steps=8, cooldown_steps=4, save_every=3, val_every=2)
    whole = list(map(parse_step, train_lines(cfg, tmp_path / "whole", device=cuda())))
    train_lines(cfg, tmp_path / "stopped", crash_at=5, device=cuda())
    resumed = list(map(parse_step, train_lines(
        dataclasses.replace(cfg, resume=str(tmp_path / "stopped" / "step_000003.pt")), tmp_path / "resumed",
        device=cuda())))
    tail = [s for s in whole if s.step > 3]
    assert [(s.step, s.kind) for s in resumed] == [(s.step, s.kind) for s in tail]
    for a, b in zip(resumed, tail):
        assert a.loss == pytest.approx(b.loss, abs=5e-3), (a, b)
    a, b = (train_gpt.read_checkpoint(tmp_path / run / "step_000008.pt") for run in ("whole", "resumed"))
    for name in a["model"]:
        torch.testing.assert_close(a["model"][name], b["model"][name], atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_one_process_matches_two_over_nccl(char_shards, tmp_path):
    """torchrun on two GPUs (NCCL, DDP, Muon's all-gather) against one GPU that accumulates both halves."""
    cfg = gpu_config(char_shards, tmp_path, steps=5, val_every=2, n_layer=3, batch_size=4, micro_batch_size=1)
    one, two = run_trainer(cfg, 1, gpu_env()), run_trainer(cfg, 2, gpu_env())
    assert two.config["world_size"] == 2 and two.config["device"].startswith("cuda")
    assert [(s.step, s.kind) for s in one.steps] == [(s.step, s.kind) for s in two.steps]
    for a, b in zip(one.steps, two.steps):
        assert a.loss == pytest.approx(b.loss, abs=1e-2), (a, b)


def test_cifar_trains_in_fp16_channels_last_compiled(tmp_path):
    """train_cifar.py's CUDA path: fp16 weights with BatchNorm in fp32, channels-last, compiled in an
    untimed warm-up run, then a timed run that learns the synthetic classes."""
    cfg = train_cifar.Config()
    model = train_cifar.build_model(cfg, cuda())
    for m in model.modules():
        expected = torch.float32 if isinstance(m, train_cifar.BatchNorm) else torch.float16
        assert all(p.dtype == expected for p in m.parameters(recurse=False)), m
    conv = model.groups[0].conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    write_synthetic(tmp_path / "cifar", n_train=(500,) * 5, n_test=500)
    result = subprocess.run([sys.executable, str(ROOT / "train_cifar.py"), "--device", "cuda", "--data-dir",
                             str(tmp_path / "cifar"), "--epochs", "4", "--batch-size", "250", "--runs", "2",
                             "--log-dir", str(tmp_path / "logs")], capture_output=True, text=True, env=gpu_env(),
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warm-up run (untimed, compiles)" in result.stdout
    accuracies = [float(a) for a in re.findall(r"^run:\d/2 test_acc:([\d.]+) time:", result.stdout, re.M)]
    assert len(accuracies) == 2 and min(accuracies) > 0.9, result.stdout[-2000:]


def test_preflight_passes_on_this_gpu(tmp_path, capsys):
    """The preflight's CUDA checks (compiled FlexAttention with its backward, the Triton kernel, bf16, the
    real step compiled, peak memory, the checkpoint) on a small model: nothing fails."""
    code = preflight.main(["--preset", "cpu-shakespeare", "--no-data", "--model_dim=128", "--head_dim=32",
                           "--seq_len=256", "--window=256", "--timed_steps=3", f"--log_dir={tmp_path}"])
    out = capsys.readouterr().out
    assert code == 0, out[-4000:]
    for check in ("attention paths", "Triton Gram kernel", "Newton-Schulz", "small model, both paths",
                  "build and compile", "memory", "loss", "round trip"):
        assert re.search(rf"^\S+ / {re.escape(check)}\s+PASS\s", out, re.M), check
