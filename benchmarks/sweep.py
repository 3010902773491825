"""Grid-search train_gpt.py flags and print the final val loss of every combination, best first.

    python benchmarks/sweep.py --grid adamw_lr=0.002,0.004 --grid steps:cooldown_steps=150:75,300:150 \\
        --seeds 0 1 --out benchmarks/adamw-sweep/lr.txt -- --optimizer=adamw

Keys joined by ':' move together (above: 150 steps with a cooldown of 75, or 300 with 150).

Each combination and seed runs `python train_gpt.py --preset cpu-shakespeare ...` in its own
process; the figures are read back from the logs it writes (under logs/sweeps/). The table is
printed as the runs finish and, with --out, written to a file as well.
"""
import argparse
import itertools
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tools.logs import parse_log, printed_log_path  # noqa: E402


def grid_axis(text):
    """'a:b=1:2,3:4' -> (['a', 'b'], [['1', '2'], ['3', '4']])"""
    key, sep, values = text.partition("=")
    keys, points = key.split(":"), [v.split(":") for v in values.split(",")]
    if not sep or not values or any(len(p) != len(keys) for p in points):
        raise argparse.ArgumentTypeError(f"expected KEY=V1,V2,... or KEY1:KEY2=A1:A2,B1:B2,..., got {text!r}")
    return keys, points


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", type=grid_axis, action="append", default=[], metavar="KEY=V1,V2,...")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--preset", default="cpu-shakespeare")
    parser.add_argument("--out", type=Path, help="also write the output here")
    parser.add_argument("trainer_args", nargs="*", help="flags for every run, after --")
    args = parser.parse_args(argv)
    out = open(args.out, "w") if args.out else None

    def say(text):
        print(text, flush=True)
        if out:
            out.write(text + "\n")
            out.flush()

    keys = [k for axis, _ in args.grid for k in axis]
    say(f"sweep over {' x '.join(keys) or 'nothing'}, seeds {args.seeds}, preset {args.preset}, "
        f"fixed flags: {' '.join(args.trainer_args) or 'none'}")
    rows = []
    for point in itertools.product(*(v for _, v in args.grid)):
        values = [v for linked in point for v in linked]
        flags = [f"--{k}={v}" for k, v in zip(keys, values)]
        losses, times = [], []
        for seed in args.seeds:
            cmd = [sys.executable, str(ROOT / "train_gpt.py"), "--preset", args.preset, f"--seed={seed}",
                   f"--log_dir={ROOT / 'logs' / 'sweeps'}", *args.trainer_args, *flags]
            result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if result.returncode:
                sys.exit(f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
            path = printed_log_path(result.stdout)
            last = parse_log(path).val[-1]
            losses.append(last.loss)
            times.append(last.train_time_ms / 1000)
        rows.append((statistics.mean(losses), values, losses, statistics.mean(times)))
        say(f"{' '.join(flags) or '(preset)'}  val_loss {statistics.mean(losses):.4f}  "
            f"[{' '.join(f'{x:.4f}' for x in losses)}]  train_time {statistics.mean(times):.2f}s")
    say("\nbest first (mean val loss over the seeds):")
    say("  ".join(f"{k:>14}" for k in keys) + "  val_loss")
    for mean, values, _, _ in sorted(rows, key=lambda r: r[0]):
        say("  ".join(f"{v:>14}" for v in values) + f"  {mean:.4f}")


if __name__ == "__main__":
    main()
