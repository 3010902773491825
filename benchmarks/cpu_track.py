"""Benchmark the CPU track: run the cpu-shakespeare preset with several seeds and print the figures.

    python benchmarks/cpu_track.py                # 5 runs, logs under logs/benchmarks/
    python benchmarks/cpu_track.py --runs 3 --out benchmarks/cpu-shakespeare -- --steps=120

Each run is `python train_gpt.py --preset cpu-shakespeare --seed=K` in its own process, exactly
as a user runs it; the figures are read back from the logs it writes. Extra trainer flags go
after `--`.
"""
import argparse
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tools.logs import parse_log  # noqa: E402

TARGET = 1.88


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "logs" / "benchmarks", help="where the run logs go")
    parser.add_argument("trainer_args", nargs="*", help="extra flags for train_gpt.py, after --")
    args = parser.parse_args(argv)
    rows = []
    for seed in range(args.runs):
        cmd = [sys.executable, str(ROOT / "train_gpt.py"), "--preset", "cpu-shakespeare", f"--seed={seed}",
               f"--log_dir={args.out}", *args.trainer_args]
        result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if result.returncode:
            sys.exit(f"run {seed} failed:\n{result.stderr[-2000:]}")
        path = [line[5:] for line in result.stdout.splitlines() if line.startswith("log: ")][-1]
        last = parse_log(ROOT / path).val[-1]
        rows.append((seed, last.loss, last.train_time_ms / 1000, last.step_avg_ms, path))
        print(f"seed {seed}: val_loss {last.loss:.4f}  train_time {last.train_time_ms / 1000:.2f}s  "
              f"step_avg {last.step_avg_ms:.2f}ms  {path}", flush=True)
    losses, times = [r[1] for r in rows], [r[2] for r in rows]
    spread = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0
    print(f"val_loss  mean {statistics.mean(losses):.4f}  std {spread(losses):.4f}  "
          f"max {max(losses):.4f}  runs <= {TARGET}: {sum(x <= TARGET for x in losses)}/{len(losses)}")
    print(f"train_time  mean {statistics.mean(times):.2f}s  std {spread(times):.2f}s  "
          f"min {min(times):.2f}s  max {max(times):.2f}s")


if __name__ == "__main__":
    main()
