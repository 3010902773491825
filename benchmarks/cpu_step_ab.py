"""Time a training step of two recipes, or of two checkouts, alternating in one process.

    python benchmarks/cpu_step_ab.py --a=--dtype=bfloat16 --b=               # this checkout, two flag sets
    python benchmarks/cpu_step_ab.py --a-code /tmp/old --a= --b=             # an older checkout against this one

(`--a=FLAGS`, with the `=`: argparse would take a lone `--a --dtype=...` for two options.)

Each side builds the cpu-shakespeare preset with its flags (compiled, as a run trains), runs its
warm-up, then the two take turns: ROUNDS rounds of STEPS steps each on a fixed batch of random
tokens. Taking turns puts a drift in the machine's speed on both alike; the median per side and the
round-by-round difference are printed. The step is train_gpt.train_step: forward, backward and the
optimizers, without data loading, validation or logging. Times, not losses: the batch is random.
"""
import argparse
import importlib.util
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def load_trainer(folder, name):
    """folder/train_gpt.py as a module of its own, importing the kernels.py and sampling.py beside it."""
    sys.path.insert(0, str(folder))
    for module in ("kernels", "sampling"):
        sys.modules.pop(module, None)
    try:
        spec = importlib.util.spec_from_file_location(name, Path(folder) / "train_gpt.py")
        trainer = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(trainer)
    finally:
        sys.path.pop(0)
    return trainer


def setup(trainer, flags):
    _, cfg = trainer.parse_config(["--preset", "cpu-shakespeare", *flags])
    device = torch.device("cpu")
    torch.manual_seed(0)
    raw_model, _, ddp_model, optimizers = trainer.build(cfg, 0, 1, device)
    trainer.warm_up(cfg, raw_model, ddp_model, optimizers, 1, device)
    batches = trainer.random_batches(cfg, 1, device)

    def steps(n):
        start = time.perf_counter()
        for step in range(n):
            trainer.train_step(step, batches, cfg, ddp_model, optimizers, 1)
        return (time.perf_counter() - start) / n * 1000
    return steps


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", default="", help="trainer flags of side A, as one string")
    parser.add_argument("--b", default="", help="trainer flags of side B")
    parser.add_argument("--a-code", type=Path, default=ROOT, help="the checkout whose train_gpt.py A runs")
    parser.add_argument("--b-code", type=Path, default=ROOT)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    sides = [("A", args.a, setup(load_trainer(args.a_code, "trainer_a"), shlex.split(args.a))),
             ("B", args.b, setup(load_trainer(args.b_code, "trainer_b"), shlex.split(args.b)))]
    times = {name: [] for name, _, _ in sides}
    for _ in range(args.rounds):
        for name, _, steps in sides:
            times[name].append(steps(args.steps))
    for (name, flags, _), code in zip(sides, (args.a_code, args.b_code)):
        print(f"{name} ({code.resolve()}; flags: {flags or 'none'}): "
              + " ".join(f"{t:.1f}" for t in times[name]) + f" ms; median {statistics.median(times[name]):.1f} ms/step")
    diffs = [b - a for a, b in zip(times["A"], times["B"])]
    print(f"B - A: median {statistics.median(diffs):+.1f} ms/step "
          f"({100 * statistics.median(diffs) / statistics.median(times['A']):+.1f}%); "
          f"B faster in {sum(d < 0 for d in diffs)} of {len(diffs)} rounds")


if __name__ == "__main__":
    main()
