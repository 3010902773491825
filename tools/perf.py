"""What the benchmark and the preflight measure with: model FLOPs, the hardware's peak, memory, timing."""
import os
import resource
import time

import torch

from train_gpt import cpu_info, sync

# Dense (no sparsity) bf16 and fp16 tensor-core peaks from NVIDIA's datasheets, in TFLOP/s; the first
# name that a card's name contains wins, so the PCIe and NVL variants come before plain H100.
GPU_PEAKS = (("H100 PCIe", 756), ("H100 NVL", 835), ("H100", 989), ("H200", 989), ("A100", 312))


# ----------------------------------------------------------------------------- model FLOPs (train_gpt.py)

def attended_keys(seq_len, window):
    """How many keys a query attends to on average: causal, within the window. Document boundaries,
    which depend on the data, are not counted."""
    w = min(window, seq_len)
    return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


def matmul_weights(cfg):
    """The weights of the matrix products: the blocks' (q, k, v, proj and the MLP's two) and the head."""
    return cfg.n_layer * (4 + 2 * cfg.mlp_ratio) * cfg.model_dim ** 2 + cfg.model_dim * cfg.vocab_size


def mtp_weights(cfg):
    """The multi-token prediction head's weights, per token: it scores all positions but the last."""
    return cfg.model_dim * cfg.vocab_size * (cfg.seq_len - 1) / cfg.seq_len if cfg.mtp_weight else 0


def flops_per_token(cfg, keys=None):
    """Model FLOPs per training token, as MFU counts them: forward and backward are 3 forwards, so 6 per
    weight of a matrix product (the embedding is a lookup), plus attention's scores and weighted sum,
    2 x 2 x model_dim per attended key and layer, tripled: 6 W + 12 n_layer model_dim keys."""
    keys = attended_keys(cfg.seq_len, cfg.window) if keys is None else keys
    return 6 * (matmul_weights(cfg) + mtp_weights(cfg)) + 12 * cfg.n_layer * cfg.model_dim * keys


def flops_formula(cfg):
    """The formula of flops_per_token with this config's numbers, for a log line."""
    mtp = f" (+ {mtp_weights(cfg):,.0f} of the multi-token head)" if cfg.mtp_weight else ""
    return (f"6 x {matmul_weights(cfg):,}{mtp} matmul weights + 12 x {cfg.n_layer} layers x {cfg.model_dim} x "
            f"{attended_keys(cfg.seq_len, cfg.window):.1f} attended keys (causal, window {cfg.window}, "
            f"seq_len {cfg.seq_len})")


# ----------------------------------------------------------------------------- the hardware

def peak_flops(device, dtype):
    """(FLOP/s, what it is) of the device's dense peak for dtype ("bfloat16", "float16" or "float32");
    (None, why) when unknown."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        tflops = next((t for key, t in GPU_PEAKS if key in name), None)
        kind = {"bfloat16": "bf16", "float16": "fp16"}.get(dtype)
        if kind is None:  # fp32 runs on other units, at a fraction of the tensor-core peak
            return None, f"{name}: no peak listed for {dtype}"
        return (tflops and tflops * 1e12), f"{name}, {tflops or 'unknown'} TFLOP/s dense {kind}"
    info = cpu_info()
    mhz, threads, flags = float(info.get("cpu MHz", 0)), torch.get_num_threads(), info.get("flags", "").split()
    # fp32 per thread: two FMA units of 8 lanes (AVX2) or 16 (AVX-512); bf16 dot products do twice that
    bf16 = dtype == "bfloat16" and "avx512_bf16" in flags
    per_cycle = (64 if "avx512f" in flags else 32) * (2 if bf16 else 1)
    peak = threads * mhz * 1e6 * per_cycle
    return (peak or None), (f"CPU, {threads} threads x {mhz / 1000:.2f} GHz x {per_cycle} "
                            f"{'bf16' if bf16 else 'fp32'} FLOP/cycle = {peak / 1e9:.0f} GFLOP/s")


def mfu_text(flops_per_item, items_per_s, device, dtype):
    """'12.3% of <the peak and where it comes from>' for a rate of items (tokens, images) per second."""
    peak, peak_text = peak_flops(device, dtype)
    return f"{flops_per_item * items_per_s / peak:.1%} of {peak_text}" if peak else f"unknown ({peak_text})"


def share_line(name, inside_s, total_s, steps, note=""):
    """The log line of an optimizer's share of the step time."""
    return (f"{name} step: {inside_s / total_s:.1%} of the step time ({1000 * inside_s / steps:.1f} of "
            f"{1000 * total_s / steps:.1f} ms{note})")


def memory_capacity(device):
    """Bytes of memory the device has: the GPU's, or the machine's RAM."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device):
    """(bytes, what they are) of the peak memory since the last reset: on CUDA, what the caching
    allocator reserved (what must fit on the card); on the CPU, the process's peak resident set, which
    is never reset."""
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device), "reserved"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "resident"


def memory_line(device):
    if device.type == "cuda":
        return (f"peak memory: {torch.cuda.max_memory_allocated(device) // 2**20} MiB allocated, "
                f"{torch.cuda.max_memory_reserved(device) // 2**20} MiB reserved")
    return f"peak memory: {peak_memory(device)[0] // 2**20} MiB resident"


# ----------------------------------------------------------------------------- timing

def time_steps(step, n, device):
    """Seconds for n calls of step(i), the device synchronised on both sides."""
    sync(device)
    t0 = time.perf_counter()
    for i in range(n):
        step(i)
    sync(device)
    return time.perf_counter() - t0


def time_inside(optimizers, step, n, device):
    """(seconds inside the optimizers' step(), seconds in all) over n calls of step(i). Hooks synchronise
    the device around each optimizer step, which slows the steps: time them apart from the others."""
    inside, started = [0.0], [0.0]

    def before(*_):
        sync(device)
        started[0] = time.perf_counter()

    def after(*_):
        sync(device)
        inside[0] += time.perf_counter() - started[0]
    hooks = [hook for opt in optimizers for hook in (opt.register_step_pre_hook(before),
                                                     opt.register_step_post_hook(after))]
    try:
        total = time_steps(step, n, device)
    finally:
        for hook in hooks:
            hook.remove()
    return inside[0], total
