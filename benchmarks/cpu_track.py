"""Run the CPU track with several seeds, for one recipe or several interleaved, and print the figures.

    python benchmarks/cpu_track.py                                   # 5 seeds of the preset
    python benchmarks/cpu_track.py --runs 8 --arm muon= \\
        --arm "adamw=--optimizer=adamw --adamw_lr=0.008" --out logs/cpu-track

Each run is `python train_gpt.py --preset cpu-shakespeare --seed=K [flags]` in its own process,
exactly as a user runs it; the figures are read back from the logs, which go to OUT/<arm>/. With
several arms, seed K of every arm runs before seed K+1 of any, so that a drift in the machine's
speed (shared hardware) falls on all of them alike. Flags after `--` go to every run. The logs are
ready for `python -m tools.records submit OUT/<arm> ...`.
"""
import argparse
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tools.logs import parse_log, printed_log_path  # noqa: E402

TARGET = 1.88


def arm(text):
    name, sep, flags = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=FLAGS, got {text!r}")
    return name, shlex.split(flags)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="seeds 0 .. runs-1")
    parser.add_argument("--arm", type=arm, action="append", metavar="NAME=FLAGS",
                        help="a recipe: a name and its trainer flags (default: the preset alone)")
    parser.add_argument("--out", type=Path, default=ROOT / "logs" / "cpu-track", help="where the run logs go")
    parser.add_argument("trainer_args", nargs="*", help="flags for every run, after --")
    args = parser.parse_args(argv)
    arms = args.arm or [("preset", [])]
    results = {name: [] for name, _ in arms}
    for seed in range(args.runs):
        for name, flags in arms:
            cmd = [sys.executable, str(ROOT / "train_gpt.py"), "--preset", "cpu-shakespeare", f"--seed={seed}",
                   f"--log_dir={args.out / name}", *args.trainer_args, *flags]
            result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if result.returncode:
                sys.exit(f"{name} seed {seed} failed:\n{result.stderr[-2000:]}")
            path = printed_log_path(result.stdout)
            last = parse_log(ROOT / path).val[-1]
            results[name].append((last.loss, last.train_time_ms / 1000))
            print(f"{name} seed {seed}: val_loss {last.loss:.4f}  train_time {last.train_time_ms / 1000:.2f}s  "
                  f"{path}", flush=True)
    spread = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0
    for name, rows in results.items():
        losses, times = [r[0] for r in rows], [r[1] for r in rows]
        print(f"{name}: val_loss mean {statistics.mean(losses):.4f} std {spread(losses):.4f} "
              f"max {max(losses):.4f}, runs <= {TARGET}: {sum(x <= TARGET for x in losses)}/{len(losses)}; "
              f"train_time mean {statistics.mean(times):.2f}s std {spread(times):.2f}s")


if __name__ == "__main__":
    main()
