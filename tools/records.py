"""Speedrun records: summarise runs, test them, plot them, submit a record and reproduce one.

    python -m tools.records summarize LOG_OR_DIR...
    python -m tools.records significance LOG_OR_DIR... [--target 1.88]
    python -m tools.records plot LOG_OR_DIR... -o curves.png
    python -m tools.records submit LOG_OR_DIR... --track cpu --name ShortName --description "..."
    python -m tools.records reproduce records/cpu/<YYYY-MM-DD>_<Name> [--runs 2]
    python -m tools.records table

A LOG_OR_DIR is a log file or a directory searched for logs (a record, logs/, a run's folder).
Each argument of `plot` is drawn in its own colour, so `plot records/cpu/A records/cpu/B`
compares two records. Records live in records/<track>/<YYYY-MM-DD>_<Name>/: the run logs as the
trainer wrote them (source included), README.md, curves.png and record.json; the tables of the
top-level README.md are made from them.
"""
import argparse
import json
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tools.logs import SEPARATOR, parse_log, printed_log_path, runs_from_log, source_files

ROOT = Path(__file__).resolve().parent.parent
RECORDS = ROOT / "records"


@dataclass(frozen=True)
class Track:
    title: str
    metric: str  # what a run's result is
    target: float
    lower_is_better: bool
    trainer: str


TRACKS = {
    "gpt": Track("GPT-2 (124M) on FineWeb, 8x H100", "val_loss", 3.28, True, "train_gpt.py"),
    "cifar": Track("CIFAR-10 to 94% on one GPU", "test_acc", 94.0, False, "train_cifar.py"),
    "cpu": Track("tiny Shakespeare on the 2-core CPU", "val_loss", 1.88, True, "train_gpt.py"),
}
ALPHA = 0.01  # records claim their target with p below this


class RecordError(Exception):
    """Input the user can fix; printed as one line."""


# ----------------------------------------------------------------------------- loading runs

def find_logs(path):
    """A log file as given, or every training log under a directory (other .txt files skipped)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise RecordError(f"{path}: no such file or directory")
    logs = [p for p in sorted(path.rglob("*.txt")) if f"\n{SEPARATOR}\n" in p.read_text(errors="replace")]
    if not logs:
        raise RecordError(f"{path}: no training log in this directory")
    return logs


def load_runs(paths, strict=True):
    """The finished runs in these logs and directories, each log once. An unfinished or unreadable
    log is an error; with strict=False, one found by searching a directory is skipped with a warning."""
    runs, seen = [], set()
    for path in paths:
        for file in find_logs(path):
            if file.resolve() in seen:
                continue
            seen.add(file.resolve())
            try:
                runs += runs_from_log(parse_log(file))
            except (ValueError, UnicodeDecodeError) as e:
                if strict or file == Path(path):
                    raise RecordError(str(e)) from None
                print(f"warning: skipped {e}", file=sys.stderr)
    return runs


def track_of(run):
    """cifar for CIFAR logs, cpu for GPT logs trained on tiny Shakespeare, gpt otherwise (public logs too)."""
    if run.kind == "cifar":
        return "cifar"
    val_files = run.log.config.get("config", {}).get("val_files", "")  # the data, not the preset's name
    return "cpu" if "shakespeare" in val_files else "gpt"


def one_track(runs, track=None):
    tracks = {track_of(r) for r in runs}
    if track and tracks != {track}:
        raise RecordError(f"these logs are from track {', '.join(sorted(tracks))}, not {track}")
    if len(tracks) > 1:
        raise RecordError(f"these logs mix tracks ({', '.join(sorted(tracks))}): give one track at a time")
    return TRACKS[tracks.pop()]


# ----------------------------------------------------------------------------- statistics

def significance(values, target, lower_is_better=True):
    """One-sided one-sample t-test that the mean is below the target (above it for accuracies).
    Returns (t, p)."""
    from scipy import stats
    if len(values) < 2:
        raise RecordError(f"a t-test needs at least 2 runs, got {len(values)}")
    if statistics.stdev(values) == 0:  # no spread: all that is left is which side of the target
        beyond = values[0] < target if lower_is_better else values[0] > target
        if not beyond:
            return math.nan, 1.0
        return (-math.inf if lower_is_better else math.inf), 0.0
    result = stats.ttest_1samp(values, target, alternative="less" if lower_is_better else "greater")
    return float(result.statistic), float(result.pvalue)


def describe(values):
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def format_time(seconds):
    return f"{seconds / 60:.2f} min" if seconds >= 600 else f"{seconds:.2f} s"


def result_name(track):
    return "test acc %" if track.metric == "test_acc" else "val loss"


def summary_table(runs, track):
    """The per-run table and the mean and std, as text."""
    steps = "epochs" if track.metric == "test_acc" else "steps"
    width = max(len(r.name) for r in runs) + 2
    lines = [f"{'run':<{width}}{result_name(track):>10}{'train time':>13}{steps:>8}  seed"]
    for r in runs:
        lines.append(f"{r.name:<{width}}{r.result:>10.4f}{format_time(r.time_s):>13}{r.steps:>8}  "
                     f"{'-' if r.seed is None else r.seed}")
    (mean, std), (tmean, tstd) = describe([r.result for r in runs]), describe([r.time_s for r in runs])
    lines.append(f"{f'mean of {len(runs)}':<{width}}{mean:>10.4f}{format_time(tmean):>13}")
    if len(runs) > 1:
        lines.append(f"{'std':<{width}}{std:>10.4f}{format_time(tstd):>13}")
    return "\n".join(lines)


def significance_line(runs, track, target):
    values = [r.result for r in runs]
    t, p = significance(values, target, track.lower_is_better)
    mean, std = describe(values)
    relation = "<=" if track.lower_is_better else ">="
    verdict = "significant" if p < ALPHA else "not significant"
    return (f"{len(values)} runs: mean {track.metric} {mean:.4f}, std {std:.4f}; one-sided t-test of mean "
            f"{relation} {target:g}: t = {t:.3f}, p = {p:.3g} ({verdict} at p < {ALPHA})")


# ----------------------------------------------------------------------------- plots

def group_label(path):
    path = Path(path).resolve()
    name = path.parent.name if path.name == "log.txt" else path.name
    return re.sub(r"^\d{4}-\d{2}-\d{2}_", "", name) if (path / "record.json").exists() else name


def plot(groups, out, target=None):
    """groups: [(label, runs)]. GPT runs: val loss against step and against train time. CIFAR
    runs: train loss against epoch, and test accuracy against run time."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kind = {r.kind for _, runs in groups for r in runs}
    if len(kind) > 1:
        raise RecordError("cannot draw GPT and CIFAR runs on the same axes")
    cifar = kind == {"cifar"}
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(13, 5))
    colormaps = ["Blues", "Oranges", "Greens", "Purples", "Reds", "Greys"]
    all_runs = [r for _, runs in groups for r in runs]
    minutes = max(r.time_s for r in all_runs) >= 600
    for g, (label, runs) in enumerate(groups):
        cmap = plt.get_cmap(colormaps[g % len(colormaps)])
        for i, r in enumerate(runs):
            color = cmap(0.45 + 0.5 * i / max(len(runs) - 1, 1))
            if len(groups) == 1:  # one record: tell its runs apart; several: tell the records apart
                name = f"{label}: " + (f"seed {r.seed}" if r.seed is not None else r.name)
            else:
                name = f"{label} ({len(runs)} runs)" if i == 0 else None
            xs = [c[0] for c in r.curve]
            ys = [c[2] for c in r.curve]
            by_step.plot(xs, ys, color=color, lw=1.2, label=name, marker="." if len(xs) < 30 else None)
            if cifar:
                by_time.scatter([r.time_s], [r.result], color=color, label=name)
            else:
                by_time.plot([c[1] / (60 if minutes else 1) for c in r.curve], ys, color=color, lw=1.2,
                             label=name)
    unit = "min" if minutes else "s"
    if cifar:
        by_step.set(xlabel="epoch", ylabel="train loss (label-smoothed)", title="train loss by epoch")
        by_time.set(xlabel=f"run time ({unit})", ylabel="test accuracy (%)", title="accuracy and time per run")
        if target is not None:
            by_time.axhline(target, color="k", ls="--", lw=0.8, label=f"target {target:g}%")
    else:
        by_step.set(xlabel="step", ylabel="val loss", title="val loss by step")
        by_time.set(xlabel=f"train time ({unit}, excluding validation)", ylabel="val loss",
                    title="val loss by train time")
        finals = [r.result for r in all_runs]
        # the first evaluations sit far above the rest; frame the approach to the target
        top = sorted(c[2] for r in all_runs for c in r.curve)[int(0.9 * sum(len(r.curve) for r in all_runs))]
        bottom = min(finals + ([target] if target else []))
        for ax in (by_step, by_time):
            if target is not None:
                ax.axhline(target, color="k", ls="--", lw=0.8, label=f"target {target:g}")
            ax.set_ylim(bottom - 0.05 * (top - bottom), top)
    for ax in (by_step, by_time):
        ax.grid(alpha=0.3)
    by_time.legend(fontsize=7, ncol=1 + len(all_runs) // 12)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- submit

RECORD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
VARYING = {"seed", "log_dir", "data_dir", "argv", "save_every"}  # what may differ between the runs of one record


def comparable_config(run):
    """What must be equal across a record's runs, flat: the logged header and config without seed,
    log dir and paths."""
    header = run.log.config
    return {**{k: v for k, v in header.items() if k not in VARYING | {"runs", "config"}},
            **{f"config.{k}": v for k, v in header.get("config", {}).items() if k not in VARYING}}


def check_record(runs, track, target):
    """Refuse what cannot be a record: mixed sources or configs, repeated seeds, a missed target."""
    sources = {r.log.source for r in runs}
    if len(sources) > 1:
        by_source = {}
        for r in runs:
            by_source.setdefault(r.log.source, []).append(r.log.path.name)
        groups = "; ".join(", ".join(names) for names in by_source.values())
        raise RecordError(f"the logs come from {len(sources)} different versions of the source code "
                          f"({groups}): a record is one version of the code")
    resumed = [r.log.run_id for r in runs if r.log.config.get("config", {}).get("resume")]
    if resumed:
        raise RecordError(f"{resumed[0]} continues a checkpoint: a record's runs each train from scratch")
    first = comparable_config(runs[0])
    for r in runs[1:]:
        other = comparable_config(r)
        differ = sorted(k for k in first.keys() | other.keys() if first.get(k) != other.get(k))
        if differ:
            raise RecordError(f"{runs[0].log.path.name} and {r.log.path.name} differ in {', '.join(differ)}: "
                              f"a record is one config (only seeds and paths may vary)")
    hardware = sorted({r.log.hardware for r in runs})
    if len(hardware) > 1:
        raise RecordError(f"the runs ran on different hardware ({'; '.join(hardware)}): their times do not "
                          f"compare")
    seeds = [r.seed for r in runs if r.seed is not None]
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise RecordError(f"seed {repeated[0]} appears in more than one run: each run needs its own seed")
    t, p = significance([r.result for r in runs], target, track.lower_is_better)
    if p >= ALPHA:
        mean = statistics.mean(r.result for r in runs)
        raise RecordError(f"the runs miss the target: mean {mean:.4f} against {target:g}, one-sided p = "
                          f"{p:.3g}, not below {ALPHA} (more runs, or a better recipe)")
    return t, p


def trainer_command(run, track):
    """The command line of a run, from the argv its log records, without its log directory."""
    argv, flags = run.log.config.get("argv") or [], []
    skip = False
    for a in argv[1:]:
        if skip or a.startswith(("--log_dir=", "--log-dir=")):
            skip = False
        elif a in ("--log_dir", "--log-dir"):
            skip = True
        else:
            flags.append(a)
    world_size = run.log.config.get("world_size", 1)
    launch = ["torchrun", "--standalone", f"--nproc_per_node={world_size}"] if world_size > 1 else ["python"]
    return shlex.join([*launch, track.trainer, *flags])


def record_readme(name, date, track_name, track, description, runs, t, p, target):
    mean, std = describe([r.result for r in runs])
    tmean, tstd = describe([r.time_s for r in runs])
    first = runs[0]
    hardware = sorted({r.log.hardware for r in runs})
    software = sorted({r.log.software for r in runs})
    relation = "≤" if track.lower_is_better else "≥"
    rows = "\n".join(f"| {r.name} | {'-' if r.seed is None else r.seed} | {r.result:.4f} | {format_time(r.time_s)} | "
                     f"{r.steps} | [log]({r.log.path.name}) |" for r in runs)
    return f"""# {name} ({track_name} track, {date})

{description}

| | {result_name(track)} | train time |
|---|---|---|
| mean over {len(runs)} runs | **{mean:.4f}** | **{format_time(tmean)}** |
| std | {std:.4f} | {format_time(tstd)} |

One-sided t-test that the mean {track.metric} is {relation} {target:g}: t = {t:.3f}, p = {p:.3g}
({len(runs) - 1} degrees of freedom).

Hardware: {"; ".join(hardware)}. Software: {"; ".join(software)}.

![{result_name(track)} of every run, by step and by train time](curves.png)

## Runs

| run | seed | {result_name(track)} | train time | {"epochs" if track.metric == "test_acc" else "steps"} | log |
|---|---|---|---|---|---|
{rows}

Each log begins with the exact source that produced it, then the environment and the full config.

## Reproduce

```bash
python -m tools.records reproduce records/{track_name}/{date}_{name}
# or one run by hand:
{trainer_command(first, track)}
```

Written by `python -m tools.records submit`; the figures above are computed from the logs in this
directory (`python -m tools.records summarize records/{track_name}/{date}_{name}`).
"""


def submit(paths, track_name, name, description, date=None, records=RECORDS, readme=ROOT / "README.md",
           target=None):
    if not RECORD_NAME.fullmatch(name):
        raise RecordError(f"record name {name!r}: use letters, digits and dashes, like MuonWarmup")
    check_markers(readme)
    track = TRACKS[track_name]
    target = track.target if target is None else target
    runs = load_runs(paths)
    one_track(runs, track_name)
    t, p = check_record(runs, track, target)
    date = date or time.strftime("%Y-%m-%d")
    directory = Path(records) / track_name / f"{date}_{name}"
    if directory.exists():
        raise RecordError(f"{directory} exists already: pick another --name")
    directory.mkdir(parents=True)
    try:
        for log in {r.log.path: r.log for r in runs}.values():  # a CIFAR log holds several runs
            copy = directory / f"{log.run_id}.txt"
            if copy.exists():
                raise RecordError(f"two logs are both named {log.run_id}: rename one")
            shutil.copyfile(log.path, copy)
        runs = load_runs([directory])  # from here on, the copies are what the record says
        plot([(name, runs)], directory / "curves.png", target)
        (directory / "README.md").write_text(
            record_readme(name, date, track_name, track, description, runs, t, p, target))
        (directory / "record.json").write_text(json.dumps(
            {"track": track_name, "name": name, "date": date, "description": description,
             "target": target}, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(directory)
        raise
    update_tables(records, readme)
    return directory


# ----------------------------------------------------------------------------- the README tables

def table_markers(track_name):
    return f"<!-- records:{track_name} -->", f"<!-- /records:{track_name} -->"


def check_markers(readme):
    text = Path(readme).read_text()
    for track_name in TRACKS:
        start, end = table_markers(track_name)
        if start not in text or end not in text:
            raise RecordError(f"{readme}: no '{start}' ... '{end}' markers for the {track_name} table")


def track_table(records, track_name, readme_dir):
    track = TRACKS[track_name]
    entries = []
    for meta_path in sorted((Path(records) / track_name).glob("*/record.json")):
        meta = json.loads(meta_path.read_text())
        runs = load_runs([meta_path.parent])
        entries.append((statistics.mean(r.time_s for r in runs), statistics.mean(r.result for r in runs),
                        len(runs), meta, meta_path.parent))
    if not entries:
        return "No record measured in this repository yet."
    lines = [f"| # | train time | {result_name(track)} | runs | description | date | record |",
             "|---|---|---|---|---|---|---|"]
    for rank, (seconds, result, n, meta, directory) in enumerate(sorted(entries, key=lambda e: e[0]), 1):
        link = Path(os.path.relpath(directory, readme_dir)).as_posix()
        description = meta["description"].splitlines()[0].replace("|", "\\|")
        lines.append(f"| {rank} | {format_time(seconds)} | {result:.4f} | {n} | {description} "
                     f"| {meta['date']} | [{meta['name']}]({link}/) |")
    return "\n".join(lines)


def update_tables(records=RECORDS, readme=ROOT / "README.md"):
    """Rewrite each track's table between its markers in README.md, ranked by mean train time."""
    readme = Path(readme)
    check_markers(readme)
    text = readme.read_text()
    for track_name in TRACKS:
        start, end = table_markers(track_name)
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = f"{head}{start}\n{track_table(records, track_name, readme.parent)}\n{end}{tail}"
    readme.write_text(text)


# ----------------------------------------------------------------------------- reproduce

def reproduce_command(run, source_file, log_dir):
    """The command line that reruns `run` from the source extracted into source_file."""
    header = run.log.config
    if run.kind == "cifar":  # the run's own flags, then ours: argparse keeps the last of each
        if run.seed is None:
            raise RecordError(f"{run.log.path}: the log records no seed")
        return [sys.executable, str(source_file), *header.get("argv", [])[1:], "--runs", "1",
                "--seed", str(run.seed), "--data-dir", header.get("data_dir", str(ROOT / "data" / "cifar10")),
                "--log-dir", str(log_dir)]
    flags = [f"--{k}={v}" for k, v in dict(header["config"], log_dir=str(log_dir)).items()]
    cmd = [str(source_file), "--preset", header["preset"], *flags]
    if header.get("world_size", 1) > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={header['world_size']}", *cmd]
    return [sys.executable, *cmd]


def reproduce(record, n_runs=1, out=ROOT / "logs" / "reproduce", say=print):
    """Rerun the first n_runs runs (seeds) of a record from the source in its logs, compare the
    results with the record's, and return the new runs."""
    record = Path(record)
    runs = load_runs([record])
    track = one_track(runs)
    if not 1 <= n_runs <= len(runs):
        raise RecordError(f"--runs must lie in [1, {len(runs)}], the record's runs")
    if not all(r.log.config for r in runs):
        raise RecordError(f"{record}: these logs carry no config (the public format): rerun them by hand")
    device = str(runs[0].log.config.get("device", "cpu"))
    env = dict(os.environ)
    if device.startswith("cuda"):
        import torch
        needed = runs[0].log.config.get("world_size", 1)
        if torch.cuda.device_count() < needed:
            raise RecordError(f"{record} ran on {runs[0].log.hardware} with {needed} process(es); this machine "
                              f"has {torch.cuda.device_count()} GPU(s)")
    else:
        env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU record reruns on the CPU, even where there are GPUs
    log_dir = Path(out) / record.name
    new_runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in runs[:n_runs]:
            try:
                files = source_files(run.log.source, track.trainer)
            except ValueError as e:
                raise RecordError(f"{run.log.path}: {e}") from None
            for name, text in files.items():  # the trainer and the files it ran, such as kernels.py
                (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
                (Path(tmp) / name).write_text(text + "\n")
            source_file = Path(tmp) / track.trainer
            cmd = reproduce_command(run, source_file, log_dir)
            say(f"reproducing {run.name} (seed {run.seed}): {shlex.join(cmd)}")
            result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
            try:
                if result.returncode:
                    raise ValueError(f"exit status {result.returncode}")
                new = load_runs([ROOT / printed_log_path(result.stdout)])
            except ValueError as e:
                raise RecordError(f"the rerun of {run.name} failed ({e}):\n"
                                  f"{(result.stderr or result.stdout)[-3000:]}") from None
            if new[0].log.source != run.log.source:
                raise RecordError(f"{new[0].log.path} logged a different source from the record's")
            new_runs += new
            for r in new:
                same = "identical" if r.result == run.result else f"recorded {run.result:.4f}"
                say(f"  {track.metric} {r.result:.4f} ({same}), train time {format_time(r.time_s)} "
                    f"(recorded {format_time(run.time_s)}); log {r.log.path}")
    mean, std = describe([r.result for r in runs])
    new_mean = statistics.mean(r.result for r in new_runs)
    gap = new_mean - mean
    verdict = "within 2 std of the record" if abs(gap) <= 2 * std else "NOT within 2 std of the record"
    say(f"new mean {track.metric} {new_mean:.4f} over {len(new_runs)} run(s); the record's: {mean:.4f} ± {std:.4f} "
        f"over {len(runs)} runs; difference {gap:+.4f}: {verdict}")
    recorded_hw, new_hw = {r.log.hardware for r in runs}, {r.log.hardware for r in new_runs}
    if recorded_hw != new_hw:
        say(f"note: this machine ({', '.join(sorted(new_hw))}) is not the record's "
            f"({', '.join(sorted(recorded_hw))}): compare the loss, not the time")
    return new_runs


# ----------------------------------------------------------------------------- command line

def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tools.records", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("summarize", help="a table of the runs: result, train time, steps; mean and std")
    p.add_argument("paths", nargs="+")
    p = sub.add_parser("significance", help="one-sided t-test of the mean against the track's target")
    p.add_argument("paths", nargs="+")
    p.add_argument("--target", type=float, help="default: 3.28 (gpt), 1.88 (cpu), 94 (cifar, accuracy in %%)")
    p = sub.add_parser("plot", help="curves of every run; one colour per argument")
    p.add_argument("paths", nargs="+")
    p.add_argument("-o", "--out", type=Path, default=Path("curves.png"))
    p.add_argument("--target", type=float)
    p = sub.add_parser("submit", help="make records/<track>/<date>_<name>/ from the logs of finished runs")
    p.add_argument("paths", nargs="+")
    p.add_argument("--track", choices=sorted(TRACKS), required=True)
    p.add_argument("--name", required=True, help="short, in CamelCase: MuonWarmup")
    p.add_argument("--description", required=True, help="what changed, in one line")
    p = sub.add_parser("reproduce", help="rerun a record from the source in its logs and compare")
    p.add_argument("record", type=Path)
    p.add_argument("--runs", type=int, default=1, help="how many of the record's runs (seeds) to rerun")
    sub.add_parser("table", help="rewrite the record tables in README.md from records/")
    args = parser.parse_args(argv)
    try:
        if args.command == "summarize":
            runs = load_runs(args.paths, strict=False)
            print(summary_table(runs, one_track(runs)))
        elif args.command == "significance":
            runs = load_runs(args.paths, strict=False)
            track = one_track(runs)
            print(significance_line(runs, track, track.target if args.target is None else args.target))
        elif args.command == "plot":
            groups = [(group_label(p), load_runs([p], strict=False)) for p in args.paths]
            track = one_track([r for _, runs in groups for r in runs])
            plot(groups, args.out, track.target if args.target is None else args.target)
            print(f"wrote {args.out}")
        elif args.command == "submit":
            directory = submit(args.paths, args.track, args.name, args.description)
            print(f"wrote {directory.relative_to(ROOT) if directory.is_relative_to(ROOT) else directory}; "
                  f"README.md's {args.track} table updated")
        elif args.command == "reproduce":
            reproduce(args.record, args.runs)
        elif args.command == "table":
            update_tables()
            print("README.md tables updated")
    except RecordError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
