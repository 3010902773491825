"""Ablation: the Nov-2024 record's storage dtypes on the CPU track.

    python benchmarks/ablation_bf16_storage.py [--seeds 8] [--out DIR]

The record casts its whole model to bf16 and then only the linear layers back to fp32, so the
embedding and every scalar (block lambdas, value-residual weights, skip weights) are bf16 parameters
with bf16 gradients, Adam moments and updates. train_gpt.py keeps fp32 master weights for all of them.
This trains the cpu-shakespeare preset both ways, seed by seed, interleaved so that both see the same
machine speed, and prints each final val loss and the means.
"""
import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import train_gpt  # noqa: E402


def record_storage(build):
    """build(), then the record's storage: every parameter outside the linear layers in bf16, in place,
    so that the optimizers (built on the same Parameter objects) keep their state in bf16 too."""
    def bf16_build(cfg, rank, world_size, device):
        raw_model, model, ddp_model, optimizers = build(cfg, rank, world_size, device)
        linear = {id(m.weight) for m in raw_model.modules() if isinstance(m, train_gpt.CastedLinear)}
        for p in raw_model.parameters():
            if id(p) not in linear:
                p.data = p.data.bfloat16()
        return raw_model, model, ddp_model, optimizers
    return bf16_build


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--out", type=Path, default=ROOT / "logs/ablation_bf16_storage")
    args = parser.parse_args(argv)
    torch.use_deterministic_algorithms(True)  # as main() runs on the CPU
    fp32_build = train_gpt.build
    results = {"fp32 (train_gpt.py)": [], "bf16 (the record's)": []}
    for seed in range(args.seeds):
        for arm, build in zip(results, (fp32_build, record_storage(fp32_build))):
            train_gpt.build = build
            _, cfg = train_gpt.parse_config(["--preset", "cpu-shakespeare", f"--seed={seed}", "--sample_tokens=0",
                                             f"--log_dir={args.out}"])
            val_loss, train_ms = train_gpt.train(cfg, lambda line: None)
            results[arm].append(val_loss)
            print(f"seed {seed}  {arm:<20} val_loss {val_loss:.4f}  train_time {train_ms / 1000:.2f}s", flush=True)
    for arm, losses in results.items():
        print(f"{arm:<20} mean {statistics.mean(losses):.4f}  std {statistics.stdev(losses):.4f}  over {len(losses)} seeds")
    diffs = [b - a for a, b in zip(*results.values())]
    print(f"bf16 minus fp32, seed by seed: mean {statistics.mean(diffs):+.4f}, std {statistics.stdev(diffs):.4f}")


if __name__ == "__main__":
    main()
