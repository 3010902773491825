"""Speed of the trainers' steps on random data: tokens or images per second, model FLOPs, MFU, the
optimizer's share, peak memory; and a profile of a few steps.

    ./run.sh benchmark [--preset NAME] [--key=value ...]      # train_gpt.py, torchrun on every local GPU
    ./run.sh benchmark --profile                              # ... and trace.json with the top kernels
    python -m tools.benchmark cifar [--batch-size 2000]       # train_cifar.py on one device

The model and optimizers are built as training builds them, the warm-up compiles, then the steps are
timed on one batch of random tokens (no data needed). Each run writes logs/benchmark/<date>_<id>/log.txt
with the usual header: source, versions and hardware, config.
"""
import argparse
import dataclasses
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode

import kernels
import train_cifar
import train_gpt
from tools import perf

SOURCES = (*train_gpt.SOURCES, "tools/benchmark.py", "tools/perf.py")
CIFAR_SOURCES = ("train_cifar.py", "tools/benchmark.py", "tools/perf.py")


def gpt(cfg, log, rank=0, world_size=1, device=torch.device("cpu"), run_dir=None, steps=10, profile=False):
    """Time train_gpt.py's steps after the warm-up and log one line per figure; with profile, also a
    profiler trace of three steps in run_dir and a table of the top kernels. Returns tokens/s per process."""
    train_gpt.validate(cfg, world_size)
    torch.manual_seed(cfg.seed)
    raw_model, model, ddp_model, optimizers = train_gpt.build(cfg, rank, world_size, device)
    warm = max(cfg.warmup_steps, 1)
    train_gpt.warm_up(dataclasses.replace(cfg, warmup_steps=warm), raw_model, ddp_model, optimizers, world_size,
                      device)
    if kernels.failed:
        log(f"note: the Triton Gram kernel failed ({kernels.failed[0]}); Newton-Schulz runs on torch's matmul")
    batches = train_gpt.random_batches(cfg, world_size, device)

    def step(i):
        train_gpt.train_step(i, batches, cfg, ddp_model, optimizers, world_size)
    perf.reset_peak_memory(device)
    elapsed = perf.time_steps(step, steps, device)
    muons = [opt for opt in optimizers if isinstance(opt, train_gpt.Muon)]
    muon_s, hooked = perf.time_inside(muons, step, steps, device)
    per_process = steps * cfg.batch_size * cfg.seq_len / elapsed / world_size
    flops = perf.flops_per_token(cfg)
    probe = torch.empty(0, device=device, dtype=getattr(torch, cfg.dtype))  # what Newton-Schulz gets
    gram_by = "Triton" if cfg.muon_triton and kernels.gram_by_kernel(probe) else "torch"
    log(f"benchmark: {steps} steps of {cfg.batch_size * cfg.seq_len:,} random tokens after {warm} warm-up "
        f"steps, {world_size} process(es)")
    log(f"tokens/s per process: {per_process:,.0f}")
    log(f"model FLOPs per token: {flops / 1e9:.4f} GFLOP = {perf.flops_formula(cfg)}")
    log(f"MFU: {perf.mfu_text(flops, per_process, device, cfg.dtype)}")
    log(perf.share_line("Muon", muon_s, hooked, steps, f"; Gram matrices by {gram_by}"))
    log(perf.memory_line(device))
    if profile:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as profiler:
            for i in range(3):
                step(i)
            train_gpt.sync(device)
        if rank == 0:
            trace = Path(run_dir or ".") / "trace.json"
            profiler.export_chrome_trace(str(trace))
            by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
            log(profiler.key_averages().table(sort_by=by, row_limit=15))
            log(f"profile: {trace} (open it in https://ui.perfetto.dev or chrome://tracing)")
    return per_process


def gpt_main(argv):
    parser = train_gpt.config_parser("Time train_gpt.py's training steps on random tokens.")
    parser.add_argument("--timed_steps", type=int, default=10, help="steps to time after the warm-up")
    parser.add_argument("--profile", action="store_true", help="also profile three steps: trace.json, top kernels")
    args = parser.parse_args(argv)
    preset, cfg = train_gpt.config_from(args)
    distributed, rank, world_size, device = train_gpt.init_process()
    try:
        log = train_gpt.start_log(Path(cfg.log_dir) / "benchmark", rank, {
            "preset": preset, "world_size": world_size, "device": str(device), "argv": [sys.argv[0], *argv],
            "config": dataclasses.asdict(cfg)}, device, SOURCES)
        gpt(cfg, log, rank, world_size, device, log.path and log.path.parent, args.timed_steps, args.profile)
        if distributed:
            dist.barrier()
    except train_gpt.UserError as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if distributed:
            dist.destroy_process_group()
    return 0


def cifar(cfg, device, log, steps=20):
    """Time train_cifar.py's steps on random images after a warm-up (compiled on CUDA) and log images/s,
    FLOPs per image (counted by torch's FLOP counter: convolutions and the head, forward and backward),
    MFU, Muon's share of the step and peak memory. Returns images/s."""
    torch.manual_seed(0)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    x = torch.randn(cfg.batch_size, 3, 32, 32, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (cfg.batch_size,), device=device)
    model = train_cifar.build_model(cfg, device)
    model.init_whitening(x[:cfg.whiten_images], cfg.whiten_eps)
    run_model = torch.compile(model) if device.type == "cuda" else model
    sgd, muon = train_cifar.build_optimizers(model, cfg, device)

    def forward_backward(net):
        train_cifar.loss_fn(net(x), y, cfg).backward()

    def step(i):
        forward_backward(run_model)
        sgd.step()
        muon.step()
        model.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as counter:  # the model's FLOPs, not the optimizers'
        forward_backward(model)
    model.zero_grad(set_to_none=True)
    for i in range(3):
        step(i)
    perf.reset_peak_memory(device)
    elapsed = perf.time_steps(step, steps, device)
    muon_s, hooked = perf.time_inside([muon], step, steps, device)
    images_s, flops = steps * cfg.batch_size / elapsed, counter.get_total_flops() / cfg.batch_size
    log(f"benchmark: {steps} steps of {cfg.batch_size} random images after 3 warm-up steps")
    log(f"images/s: {images_s:,.0f}")
    log(f"model FLOPs per image: {flops / 1e6:.1f} MFLOP (forward and backward, counted by torch.utils.flop_counter)")
    log(f"MFU: {perf.mfu_text(flops, images_s, device, str(dtype).removeprefix('torch.'))}")
    log(perf.share_line("Muon", muon_s, hooked, steps))
    log(perf.memory_line(device))
    return images_s


def cifar_main(argv):
    parser = argparse.ArgumentParser(prog="python -m tools.benchmark cifar",
                                     description="Time train_cifar.py's training steps on random images.")
    parser.add_argument("--batch-size", type=train_cifar.positive, default=train_cifar.Config.batch_size)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--timed-steps", type=train_cifar.positive, default=20)
    parser.add_argument("--log-dir", type=Path, default=Path("logs") / "benchmark")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 1
    torch.backends.cudnn.benchmark = True  # as train_cifar.py runs
    cfg = train_cifar.Config(batch_size=args.batch_size)
    log = train_cifar.start_log(args.log_dir, {"device": str(device), "argv": [sys.argv[0], "cifar", *argv],
                                               "config": dataclasses.asdict(cfg)}, device, CIFAR_SOURCES)
    cifar(cfg, device, log, args.timed_steps)
    print(f"log: {log.path}", flush=True)
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["cifar"]:
        return cifar_main(argv[1:])
    return gpt_main(argv)


if __name__ == "__main__":
    sys.exit(main())
