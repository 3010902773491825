"""Run the CPU track with several seeds, for one recipe or several interleaved, and print the figures.

    python benchmarks/cpu_track.py                                   # 5 seeds of the preset
    python benchmarks/cpu_track.py --runs 8 --arm muon= \\
        --arm "adamw=--optimizer=adamw --adamw_lr=0.008" --out logs/cpu-track

Each run is `python train_gpt.py --preset cpu-shakespeare --seed=K [flags]` in its own process,
exactly as a user runs it; the figures are read back from the logs, which go to OUT/<arm>/. With
several arms, seed K of every arm runs before seed K+1 of any, so that a drift in the machine's
speed (shared hardware) falls on all of them alike. Flags after `--` go to every run. The logs are
ready for `python -m tools.records submit OUT/<arm> ...`.

With several arms, every arm after the first is also compared with the first, seed by seed (a run's
loss is exact for its seed on a given CPU, so the pairs share their data order and initialisation):
the mean difference in final val loss, at the steps each arm ran, with the paired t-test's two-sided
p; and the mean differences in steps and in train time to the target, read off each run's val curve
(linearly between the val points that straddle it). `--report` prints the same from the logs of an earlier
invocation, without running anything.

`--code NAME=DIR` runs arm NAME with the train_gpt.py of another checkout, such as the commit of an
earlier record (`git worktree add /tmp/old COMMIT`), so that new code is timed against old code in
one sitting:

    python benchmarks/cpu_track.py --runs 8 --arm old= --code old=/tmp/old --arm new= --out logs/vs-old
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


def to_target(val, at, target=TARGET):
    """at(point) where the val curve first reaches the target, linearly between the val points that
    straddle it; None if it never does."""
    for before, point in zip([None, *val], val):
        if point.loss <= target:
            if before is None:
                return at(point)
            frac = (before.loss - target) / (before.loss - point.loss)
            return at(before) + frac * (at(point) - at(before))
    return None


def seconds(point):
    return point.train_time_ms / 1000


def steps(point):
    return point.step


def paired(a, b):
    """Mean and std of b - a, and the paired t-test's two-sided p (nan for fewer than 2 pairs)."""
    from scipy import stats
    diffs = [y - x for x, y in zip(a, b)]
    mean = statistics.mean(diffs)
    std = statistics.stdev(diffs) if len(diffs) > 1 else float("nan")
    p = stats.ttest_rel(b, a).pvalue if len(diffs) > 1 and std > 0 else float("nan")
    return mean, std, p


def report(results, say=print):
    """results: {arm: [RunLog, ...] by seed}. One summary line per arm, then each arm against the first."""
    spread = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0
    for name, logs in results.items():
        losses, times = [log.val[-1].loss for log in logs], [log.val[-1].train_time_ms / 1000 for log in logs]
        say(f"{name}: val_loss mean {statistics.mean(losses):.4f} std {spread(losses):.4f} "
            f"max {max(losses):.4f}, runs <= {TARGET}: {sum(x <= TARGET for x in losses)}/{len(losses)}; "
            f"train_time mean {statistics.mean(times):.2f}s std {spread(times):.2f}s")
    (ref, ref_logs), *others = results.items()
    for name, logs in others:
        n = min(len(ref_logs), len(logs))
        loss, loss_std, p = paired([log.val[-1].loss for log in ref_logs[:n]], [log.val[-1].loss for log in logs[:n]])
        reached = []
        for at, unit in ((steps, " steps"), (seconds, "s")):
            reach = [(to_target(x.val, at), to_target(y.val, at)) for x, y in zip(ref_logs[:n], logs[:n])]
            both = [(x, y) for x, y in reach if x is not None and y is not None]
            if both:
                d, d_std, d_p = paired(*zip(*both))
                ref_mean = statistics.mean(x for x, _ in both)
                reached.append(f"{d:+.1f}{unit} ({100 * d / ref_mean:+.1f}%) std {d_std:.1f}{unit} p {d_p:.3g}")
        missed = sum(y is None for _, y in reach)
        timing = (f"to {TARGET}: {'; '.join(reached)} over {len(both)} pairs" if reached else
                  f"to {TARGET}: no pair in which both reach it")
        say(f"{name} - {ref}: val_loss {loss:+.4f} std {loss_std:.4f} p {p:.3g} ({n} seeds); {timing}"
            + (f"; {missed} of {n} runs never reach {TARGET}" if missed else ""))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="how many seeds: first-seed, first-seed + 1, ...")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--arm", type=arm, action="append", metavar="NAME=FLAGS",
                        help="a recipe: a name and its trainer flags (default: the preset alone)")
    parser.add_argument("--out", type=Path, default=ROOT / "logs" / "cpu-track", help="where the run logs go")
    parser.add_argument("--code", type=arm, action="append", default=[], metavar="NAME=DIR",
                        help="run arm NAME with DIR/train_gpt.py (default: this checkout's)")
    parser.add_argument("--report", action="store_true", help="only read OUT/<arm>/*/log.txt, in seed order")
    parser.add_argument("trainer_args", nargs="*", help="flags for every run, after --")
    args = parser.parse_args(argv)
    arms = args.arm or [("preset", [])]
    results = {name: [] for name, _ in arms}
    code = {}
    for name, parts in args.code:
        if name not in results or len(parts) != 1 or not (Path(parts[0]) / "train_gpt.py").is_file():
            parser.error(f"--code {name}=...: expected an arm's name and a folder holding train_gpt.py")
        code[name] = Path(parts[0]).resolve()
    if args.report:
        for name in results:
            results[name] = sorted((parse_log(p) for p in (args.out / name).glob("*/log.txt")),
                                   key=lambda log: log.config["seed"])  # paired with the other arms by seed
            if not results[name]:
                sys.exit(f"{args.out / name}: no logs")
        report(results)
        return
    for seed in range(args.first_seed, args.first_seed + args.runs):
        for name, flags in arms:
            # run from this checkout, which has the data, whichever train_gpt.py (and the modules beside it)
            cmd = [sys.executable, str(code.get(name, ROOT) / "train_gpt.py"), "--preset", "cpu-shakespeare",
                   f"--seed={seed}", f"--log_dir={args.out / name}", *args.trainer_args, *flags]
            result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if result.returncode:
                sys.exit(f"{name} seed {seed} failed:\n{result.stderr[-2000:]}")
            path = printed_log_path(result.stdout)
            log = parse_log(ROOT / path)
            results[name].append(log)
            last = log.val[-1]
            print(f"{name} seed {seed}: val_loss {last.loss:.4f}  train_time {last.train_time_ms / 1000:.2f}s  "
                  f"{path}", flush=True)
    report(results)


if __name__ == "__main__":
    main()
