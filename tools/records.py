"""Speedrun records: summarise runs, test them, compare them, plot them, submit a record and reproduce one.

    python -m tools.records summarize LOG_OR_DIR...               [--pool] [--target X]
    python -m tools.records significance LOG_OR_DIR...            [--pool] [--target X]
    python -m tools.records compare A B                           [--target X]
    python -m tools.records plot LOG_OR_DIR... -o curves.png
    python -m tools.records submit LOG_OR_DIR... --track cpu --name ShortName --description "..."
    python -m tools.records reproduce RECORD_OR_LOG [--runs 2] [--dry-run]
    python -m tools.records table

A LOG_OR_DIR is a log file (.txt or .log) or a directory searched for logs: a record, logs/, a public
record folder with its baseline/ and this_pr/ runs. Runs are compared only within a group: the
same source (a digest of the logged code), the same hardware (GPU model and process count, or CPU)
and the same track, whose target is the default one. Our records live in
records/<track>/<YYYY-MM-DD>_<Name>/: the run logs as the trainer wrote them (source included),
README.md, curves.png and record.json; the tables of the top-level README.md are made from them.
"""
import argparse
import glob
import hashlib
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

from tools.logs import LogError, NotALog, parse_log, printed_log_path, runs_from_log, source_files

ROOT = Path(__file__).resolve().parent.parent
RECORDS = ROOT / "records"
LOG_SUFFIXES = (".txt", ".log")


@dataclass(frozen=True)
class Track:
    metric: str  # what a run's result is
    target: float
    lower_is_better: bool
    trainer: str


TRACKS = {
    "gpt": Track("val_loss", 3.28, True, "train_gpt.py"),  # GPT-2 (124M) on FineWeb, 8x H100
    "medium": Track("val_loss", 2.92, True, "train_gpt.py"),  # GPT-2 Medium (350M) on FineWeb, 8x H100
    "cifar": Track("test_acc", 94.0, False, "train_cifar.py"),  # CIFAR-10 to 94% on one GPU
    "cpu": Track("val_loss", 1.88, True, "train_gpt.py"),  # tiny Shakespeare on the 2-core CPU
}
WIDTH_TRACKS = {768: "gpt", 1024: "medium"}  # GPT-2's 124M and Medium models, by width
FOLDER_TRACKS = {re.compile(r"track_1_short"): "gpt",  # the public repository's folders: its tracks
                 re.compile(r"track_2_medium|gpt-?2[_-]?medium", re.IGNORECASE): "medium"}  # and 011825_GPT2Medium
ALPHA = 0.01  # records claim their target with p below this


class RecordError(Exception):
    """Input the user can fix; printed as one line."""


def warn(message):
    print(message, file=sys.stderr)


# ----------------------------------------------------------------------------- loading runs

def find_logs(path):
    """A log file as given, or every .txt and .log file under a directory."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise RecordError(f"{path}: no such file or directory")
    return sorted(p for p in path.rglob("*") if p.suffix in LOG_SUFFIXES and p.is_file())


def load_runs(paths, strict=True, say=warn):
    """The finished runs in these logs and directories, each log once. A file named on the command line
    that holds no finished run is an error. In a directory, a file that is no training log is skipped with
    its reason, in one line, and so is an unfinished log unless strict."""
    runs, seen, contents = [], set(), {}
    for path in paths:
        for file in find_logs(path):
            if file.resolve() in seen:
                continue
            seen.add(file.resolve())
            try:
                digest = hashlib.sha256(file.read_bytes()).hexdigest()
                if digest in contents:  # a copy is the same run again, not another one
                    if strict:
                        raise RecordError(f"{file} is a copy of {contents[digest]}: a run counts once")
                    say(f"skipped {file}: the same bytes as {contents[digest]}")
                    continue
                contents[digest] = file
                runs += runs_from_log(parse_log(file))
            except (LogError, OSError) as e:
                if file == Path(path) or (strict and not isinstance(e, NotALog)):
                    raise RecordError(str(e)) from None
                say(f"skipped {e}")
    if not runs:
        raise RecordError(f"{', '.join(map(str, paths))}: no finished run"
                          + ("" if all(Path(p).is_file() for p in paths) else " in any .txt or .log file"))
    return runs


# ----------------------------------------------------------------------------- tracks and groups

MODEL_WIDTH = re.compile(r"\b(?:model_dim|n_embd)\s*(?::\s*int\s*)?=\s*(\d+)")
VAL_TOKENS = re.compile(r"\bval_tokens\s*(?::\s*int\s*)?=\s*(\d[\d_]*(?:\s*\*\s*\d[\d_]*)*)")  # 10485760, 20 * 524288
TRACK_VAL_TOKENS = 10_485_760  # both FineWeb tracks measure the first 10,485,760 val tokens


def infer_track(run):
    """(track name or None, how it was told). Our logs say what they trained. A public log's track follows
    the model width in its source (768: 124M, 1024: Medium), else a folder name; a source that measures
    other val tokens than the tracks do is on no track."""
    if run.kind == "cifar":
        return "cifar", "a CIFAR-10 log"
    config = run.log.config.get("config")
    if config:  # ours: the data, not the preset's name, then the width; other widths train on FineWeb too
        if "shakespeare" in config.get("val_files", ""):
            return "cpu", "trained on tiny Shakespeare"
        width = config.get("model_dim")
        return WIDTH_TRACKS.get(width, "gpt"), f"its config: FineWeb, model_dim {width}"
    counts = {math.prod(int(f) for f in v.split("*")) for v in VAL_TOKENS.findall(run.log.source)}
    if counts and counts != {TRACK_VAL_TOKENS}:
        tokens = " or ".join(map(str, sorted(counts)))
        return None, f"val_tokens {tokens} in its source, not the tracks' {TRACK_VAL_TOKENS}"
    widths = {int(w) for w in MODEL_WIDTH.findall(run.log.source)}
    how = f"model_dim {' or '.join(map(str, sorted(widths)))} in its source"
    if len(widths) == 1 and widths <= WIDTH_TRACKS.keys():
        return WIDTH_TRACKS[widths.pop()], how
    if widths:
        return None, f"{how}: no track of that width"
    for folder in reversed(run.log.path.resolve().parent.parts):
        for pattern, name in FOLDER_TRACKS.items():
            if pattern.search(folder):
                return name, f"the folder name {folder}"
    return None, "no model width in its source and no folder named for a track"


def track_of(run):
    return infer_track(run)[0]


VARYING = {"seed", "log_dir", "data_dir", "argv", "save_every"}  # what may differ between the runs of one record


def comparable_config(run):
    """What must be equal across a record's runs, flat: the logged header and config without seed,
    log dir and paths."""
    header = run.log.config
    return {**{k: v for k, v in header.items() if k not in VARYING | {"runs", "config"}},
            **{f"config.{k}": v for k, v in header.get("config", {}).items() if k not in VARYING}}


def code_key(run):
    """What must be equal for runs to compare, besides hardware and track: the source's digest, and for our
    logs, which run one source with many configs, also a digest of the config without seed and paths."""
    if not run.log.config:
        return run.log.digest
    config = json.dumps(comparable_config(run), sort_keys=True, default=str)
    return f"{run.log.digest} config {hashlib.sha256(config.encode()).hexdigest()[:8]}"


@dataclass
class Group:
    """Runs that compare: one source, one hardware, one track."""
    name: str
    runs: list
    track: str  # a key of TRACKS, or None when it could not be told
    how: str  # how the track was told
    sources: list  # code_key() of its runs; "not logged (FOLDER)" for console captures

    @property
    def results(self):
        return [r.result for r in self.runs]

    @property
    def times(self):
        return [r.time_s for r in self.runs]

    @property
    def hardware(self):
        return sorted({r.log.hardware for r in self.runs})

    @property
    def source(self):
        return ", ".join(dict.fromkeys(s.split(" (")[0] for s in self.sources))

    def about(self):
        track = f"track {self.track}" if self.track else "track unknown"
        source = ("source not logged: its folder stands for one version of the code" if self.source == "not logged"
                  else f"source {self.source}")
        return (f"{source} · {'; '.join(self.hardware)} · {len(self.runs)} "
                f"run{'s' * (len(self.runs) > 1)} · {track} ({self.how})")


def folder_of(run):
    """The folder that holds a run: a public log's, or the folder above our logs/<run>/log.txt."""
    path = run.log.path.resolve()
    return path.parent.parent if path.name == "log.txt" else path.parent


def shown(path):
    """A path as the user would type it: relative to the working directory when that is at most two
    levels up (../modded-nanogpt/records/...), else absolute."""
    relative = Path(os.path.relpath(path))
    return (relative if relative.parts[:3] != ("..",) * 3 else Path(path)).as_posix()


def group_runs(runs):
    """The runs split by (source digest, hardware, track), in the order first seen, each group named by
    the folder that holds its runs, and by what tells it apart from another group in that folder."""
    keyed = {}
    for r in runs:
        track, how = infer_track(r)
        source = code_key(r) or f"not logged ({shown(folder_of(r))})"  # without a source, its folder is one
        keyed.setdefault((source, r.log.hardware, track), (how, []))[1].append(r)
    folders = {key: Path(os.path.commonpath([str(folder_of(r)) for r in group])) for key, (_, group) in keyed.items()}
    groups = []
    for key, (how, group) in keyed.items():
        name = shown(folders[key])
        rivals = [k for k in keyed if k != key and folders[k] == folders[key]]
        tags = [f"{label} {mine}" for i, label in enumerate(("source", "on", "track"))
                for mine in [key[i]] if any(k[i] != mine for k in rivals)]
        groups.append(Group(f"{name} [{', '.join(tags)}]" if tags else name, group, key[2], how, [key[0]]))
    return groups


def pooled(groups, say=warn):
    """All groups as one; it warns, naming what differs, when there is more than one."""
    if len(groups) == 1:
        return groups[0]
    runs = [r for g in groups for r in g.runs]
    if len({r.kind for r in runs}) > 1:
        raise RecordError("GPT and CIFAR runs do not pool: their results are a loss and an accuracy")
    sources = sorted({s for g in groups for s in g.sources})
    differ = [f"{what} ({'; '.join(values)})" for what, values in (
        ("source", sources), ("hardware", sorted({r.log.hardware for r in runs})),
        ("track", sorted({str(g.track) for g in groups}))) if len(values) > 1]
    say(f"warning: pooling {len(groups)} groups ({', '.join(g.name for g in groups)}) that differ in "
        f"{' and '.join(differ)}: one mean and one test over runs that do not compare")
    tracks = sorted({str(g.track) for g in groups})
    return Group(f"pooled: {', '.join(g.name for g in groups)}", runs, groups[0].track if len(tracks) == 1 else None,
                 f"pooled over track{'s' * (len(tracks) > 1)} {' and '.join(tracks)}", sources)


def grouped(paths, pool=False, say=warn):
    groups = group_runs(load_runs(paths, strict=False, say=say))
    return [pooled(groups, say)] if pool else groups


def target_of(group, target=None):
    """(Track, target): the group's track and its target, or the one given. A group of unknown track is
    measured like the GPT or CIFAR track its runs are, with no target unless one is given."""
    track = TRACKS.get(group.track)
    if track is None:
        return TRACKS["gpt"] if group.runs[0].kind == "gpt" else TRACKS["cifar"], target
    return track, track.target if target is None else target


def one_track(runs, track=None):
    tracks = {track_of(r) for r in runs}
    if track and tracks != {track}:
        raise RecordError(f"these logs are from track {', '.join(sorted(map(str, tracks)))}, not {track}")
    if len(tracks) > 1:
        raise RecordError(f"these logs mix tracks ({', '.join(sorted(map(str, tracks)))}): give one track at a time")
    name = tracks.pop()
    if name is None:
        raise RecordError(f"{runs[0].log.path}: the track is unknown ({infer_track(runs[0])[1]})")
    return TRACKS[name]


# ----------------------------------------------------------------------------- statistics

def significance(values, target, lower_is_better=True):
    """One-sided one-sample t-test that the mean is below the target (above it for accuracies).
    Returns (t, p)."""
    if len(values) < 2:
        raise RecordError(f"a t-test needs at least 2 runs, got {len(values)}")
    return one_sample(*mean_std(values), len(values), target, lower_is_better)


def one_sample(mean, std, n, target, lower_is_better):
    """significance() from the mean and std of n runs: (t, p)."""
    from scipy import stats
    if std == 0:  # no spread: all that is left is which side of the target
        if not (mean < target if lower_is_better else mean > target):
            return math.nan, 1.0
        return (-math.inf if lower_is_better else math.inf), 0.0
    t = (mean - target) / (std / math.sqrt(n))
    return t, float(stats.t.cdf(t, n - 1) if lower_is_better else stats.t.sf(t, n - 1))


def welch(a, b, alternative):
    """Welch's t-test of mean(b) against mean(a) from (mean, std, n) of each; alternative 'less' asks
    whether b's mean is below a's. Returns (t, p)."""
    from scipy import stats
    (ma, sa, na), (mb, sb, nb) = a, b
    if sa == sb == 0:
        below, above = mb < ma, mb > ma
        hit = {"less": below, "greater": above, "two-sided": below or above}[alternative]
        return (math.copysign(math.inf, mb - ma) if mb != ma else math.nan), 0.0 if hit else 1.0
    result = stats.ttest_ind_from_stats(mb, sb, nb, ma, sa, na, equal_var=False, alternative=alternative)
    return float(result.statistic), float(result.pvalue)


def runs_to_settle(p_after, limit=1000):
    """The fewest more runs k with p_after(k) < ALPHA, if means and stds stay as measured; None past limit."""
    return next((k for k in range(1, limit + 1) if p_after(k) < ALPHA), None)


def more_runs(n):
    return f"{n} more run{'s' * (n != 1)}"


def mean_std(values):
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


# ----------------------------------------------------------------------------- figures

def decimals(values, target=None, least=4, most=12):
    """Decimals enough that none of the values rounds onto or across the target."""
    def side(v):
        return (v > target) - (v < target)
    for d in range(least, most):
        if target is None or all(side(round(v, d)) == side(v) for v in values if math.isfinite(v)):
            return d
    return most


def time_unit(seconds):
    """One unit for a column of times: minutes from 10 minutes up, else seconds."""
    return ("min", 60) if max(seconds, default=0) >= 600 else ("s", 1)


def format_time(seconds):
    unit, scale = time_unit([seconds])
    return f"{seconds / scale:.2f} {unit}"


def result_name(track):
    return "test acc %" if track.metric == "test_acc" else "val loss"


def test_line(group, target=None):
    """'one-sided t-test ...: t, p, verdict' for a group, or why there is none."""
    track, target = target_of(group, target)
    if target is None:
        return f"no t-test: the track is unknown ({group.how}); give --target"
    if len(group.runs) < 2:
        return f"no t-test: {len(group.runs)} run"
    t, p = significance(group.results, target, track.lower_is_better)
    relation = "<=" if track.lower_is_better else ">="
    verdict = "significant" if p < ALPHA else "not significant"
    return f"one-sided t-test of mean {relation} {target:.10g}: t = {t:.3f}, p = {p:.3g} ({verdict} at p < {ALPHA})"


def stats_line(group, target=None):
    track, target = target_of(group, target)
    (mean, std), (tmean, tstd) = mean_std(group.results), mean_std(group.times)
    d = decimals([*group.results, mean], target)
    unit, scale = time_unit(group.times)
    if len(group.runs) == 1:
        return f"n = 1, {result_name(track)} {mean:.{d}f}; train time {tmean / scale:.2f} {unit}"
    return (f"n = {len(group.runs)}, mean {result_name(track)} {mean:.{d}f}, std {std:.{d}f}; "
            f"mean train time {tmean / scale:.2f} {unit}, std {tstd / scale:.2f} {unit}")


def summary_table(group, target=None):
    """A group's block: what it is, the per-run table, the mean and std, and the t-test."""
    track, target = target_of(group, target)
    runs = group.runs
    steps = "epochs" if track.metric == "test_acc" else "steps"
    (mean, std), (tmean, tstd) = mean_std(group.results), mean_std(group.times)
    d = decimals([*group.results, mean], target)
    unit, scale = time_unit(group.times)
    width = max(*(len(r.name) for r in runs), len(f"mean of {len(runs)}")) + 2
    rw, tw = max(len(result_name(track)), d + 4) + 2, len(f"train time ({unit})") + 2
    lines = [f"== {group.name}", group.about(),
             f"{'run':<{width}}{result_name(track):>{rw}}{f'train time ({unit})':>{tw}}{steps:>8}  seed"]
    for r in runs:
        lines.append(f"{r.name:<{width}}{r.result:>{rw}.{d}f}{r.time_s / scale:>{tw}.2f}{r.steps:>8}  "
                     f"{'-' if r.seed is None else r.seed}")
    lines.append(f"{f'mean of {len(runs)}':<{width}}{mean:>{rw}.{d}f}{tmean / scale:>{tw}.2f}")
    if len(runs) > 1:
        lines.append(f"{'std':<{width}}{std:>{rw}.{d}f}{tstd / scale:>{tw}.2f}")
    lines.append(test_line(group, target))
    return "\n".join(lines)


def significance_block(group, target=None):
    return "\n".join([f"== {group.name}", group.about(), stats_line(group, target), test_line(group, target)])


# ----------------------------------------------------------------------------- compare

def one_group(path, pool, say=warn):
    groups = grouped([path], pool, say)
    if len(groups) > 1:
        raise RecordError(f"{path} holds {len(groups)} groups ({'; '.join(g.name for g in groups)}): "
                          f"give one of their folders, or --pool")
    return groups[0]


def compare(a, b, target=None, say=print):
    """Welch's t-tests of B against A on the result and on time, and whether B is faster at a result
    that still meets the target. Returns True when it is, at p < ALPHA on both counts."""
    if {r.kind for r in a.runs + b.runs} == {"gpt", "cifar"}:
        raise RecordError("A and B are GPT and CIFAR runs: a loss and an accuracy do not compare")
    if a.track != b.track and target is None:
        raise RecordError(f"A is track {a.track or 'unknown'} and B track {b.track or 'unknown'}: give --target "
                          f"to compare them anyway")
    track, target = target_of(b, target)
    if target is None:
        raise RecordError(f"{b.name}: the track is unknown ({b.how}): give --target")
    if min(len(a.runs), len(b.runs)) < 2:
        raise RecordError(f"a Welch t-test needs at least 2 runs a side; A has {len(a.runs)}, B {len(b.runs)}")
    ra, rb = mean_std(a.results), mean_std(b.results)
    ta, tb = mean_std(a.times), mean_std(b.times)
    d = decimals([*a.results, *b.results, ra[0], rb[0]], target)
    unit, scale = time_unit(a.times + b.times)
    name = result_name(track)
    say(f"A: {a.name}")
    say(f"B: {b.name}")
    rows = [("", "A", "B"), ("runs", len(a.runs), len(b.runs)),
            (name, f"{ra[0]:.{d}f} ± {ra[1]:.{d}f}", f"{rb[0]:.{d}f} ± {rb[1]:.{d}f}"),
            (f"train time ({unit})", f"{ta[0] / scale:.2f} ± {ta[1] / scale:.2f}",
             f"{tb[0] / scale:.2f} ± {tb[1] / scale:.2f}"),
            ("source", a.source, b.source),
            ("hardware", "; ".join(a.hardware), "; ".join(b.hardware))]
    wa = max(len(str(r[1])) for r in rows) + 3
    for label, x, y in rows:
        say(f"{label:<18}{x!s:<{wa}}{y}")
    same_hardware = a.hardware == b.hardware
    if not same_hardware:
        say("warning: A and B ran on different hardware: their times do not compare")
    _, p_result = welch((*ra, len(a.runs)), (*rb, len(b.runs)), "two-sided")
    say(f"{name}, B - A: {rb[0] - ra[0]:+.{d}f} (Welch's t-test, two-sided p = {p_result:.3g})")
    t_time, p_time = welch((*ta, len(a.runs)), (*tb, len(b.runs)), "less")
    relative = f"{(tb[0] - ta[0]) / ta[0]:+.1%}; " if ta[0] else ""
    say(f"train time, B - A: {(tb[0] - ta[0]) / scale:+.2f} {unit} ({relative}Welch's t-test that B is faster: "
        f"t = {t_time:.3f}, one-sided p = {p_time:.3g})")
    _, p_target = significance(b.results, target, track.lower_is_better)
    relation = "<=" if track.lower_is_better else ">="
    say(f"B against the target: mean {name} {relation} {target:.10g}, one-sided p = {p_target:.3g}")
    faster, meets = p_time < ALPHA, p_target < ALPHA
    if not same_hardware:
        say(f"answer: no comparison of speed: A ran on {'; '.join(a.hardware)}, B on {'; '.join(b.hardware)}")
        return False
    if faster and meets:
        say(f"answer: yes. B is faster than A (p = {p_time:.3g}) at a {name} that meets {target:.10g} "
            f"(p = {p_target:.3g}), both below {ALPHA}")
        return True
    reasons = []  # (why not, whether more runs would settle it)
    if not faster:
        if tb[0] >= ta[0]:
            reasons.append(("B is not faster on average: more runs will not make it so", False))
        else:
            k = runs_to_settle(lambda k: welch((*ta, len(a.runs) + k), (*tb, len(b.runs) + k), "less")[1])
            reasons.append((f"B is faster by {(ta[0] - tb[0]) / scale:.2f} {unit} on average, but p = {p_time:.3g} is "
                            f"not below {ALPHA}: " + (f"about {more_runs(k)} of each would settle it" if k else
                                                      "not even 1000 more runs of each would settle it"), bool(k)))
    if not meets:
        if (rb[0] >= target) if track.lower_is_better else (rb[0] <= target):
            reasons.append((f"B's mean {name} {rb[0]:.{d}f} misses {target:.10g}: more runs will not make it meet it",
                            False))
        else:
            k = runs_to_settle(lambda k: one_sample(*rb, len(b.runs) + k, target, track.lower_is_better)[1])
            reasons.append((f"B's mean {name} meets {target:.10g} at p = {p_target:.3g}, not below {ALPHA}: "
                            + (f"about {more_runs(k)} of B would settle it" if k else
                               "not even 1000 more runs of B would settle it"), bool(k)))
    say(f"answer: {'not yet' if all(s for _, s in reasons) else 'no'}. " + "; ".join(r for r, _ in reasons))
    return False


# ----------------------------------------------------------------------------- plots

def plot(groups, out, target=None):
    import matplotlib.pyplot as plt
    fig = draw(groups, target)
    try:
        fig.savefig(out, dpi=120)
    except (OSError, ValueError) as e:
        raise RecordError(f"{out}: cannot write the figure: {e}") from None
    finally:
        plt.close(fig)


def draw(groups, target=None):
    """The figure: one colour per group, each run a thin line; GPT runs: val loss against step and
    against train time, y framed by the curves' second half; CIFAR runs: train loss against epoch, and
    test accuracy against run time. The target line of each track (or the one given)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kind = {r.kind for g in groups for r in g.runs}
    if len(kind) > 1:
        raise RecordError("cannot draw GPT and CIFAR runs on the same axes")
    cifar = kind == {"cifar"}
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(13, 5.6))
    colors = plt.get_cmap("tab10").colors
    all_runs = [r for g in groups for r in g.runs]
    unit, scale = time_unit([r.time_s for r in all_runs])
    lw, alpha = (1.4, 0.9) if len(all_runs) <= 3 else (0.7, 0.55)
    folders = [g.name.split(" [")[0] for g in groups]  # the path the groups share goes in the title, once
    common = os.path.commonpath(folders) if len(groups) > 1 and len({f.startswith("/") for f in folders}) == 1 else ""
    names = [g.name if not common else (Path(f).name if f == common else os.path.relpath(f, common)) + g.name[len(f):]
             for f, g in zip(folders, groups)]
    if common:
        fig.suptitle(f"under {common}/", fontsize=9)
    for g, group in enumerate(groups):
        color = colors[g % len(colors)]
        label = f"{names[g]} ({len(group.runs)} run{'s' * (len(group.runs) > 1)})"
        for i, r in enumerate(group.runs):
            xs, ys = [c[0] for c in r.curve], [c[2] for c in r.curve]
            by_step.plot(xs, ys, color=color, lw=lw, alpha=alpha, label=label if i == 0 else None,
                         marker="." if len(xs) < 30 and len(all_runs) <= 3 else None, ms=3)
            if cifar:
                by_time.scatter([r.time_s / scale], [r.result], color=color, s=12, label=label if i == 0 else None)
            else:
                by_time.plot([c[1] / scale for c in r.curve], ys, color=color, lw=lw, alpha=alpha,
                             label=label if i == 0 else None)
    targets = {}  # target value -> label
    for group in groups:
        value = target_of(group, target)[1]
        if value is not None:
            targets.setdefault(value, f"target {value:g}{'%' if cifar else ''}" + (
                "" if target is not None else f" ({group.track})"))
    # the first evaluations sit far above the rest: frame the curves' second half and the targets
    tail = [c[2] for r in all_runs for c in r.curve if c[0] >= r.curve[-1][0] / 2 and math.isfinite(c[2])]
    framed = tail + ([] if cifar else list(targets))  # CIFAR's target is an accuracy, not a loss
    low, high = min(framed), max(framed)
    pad = 0.08 * (high - low or abs(high) or 1)
    if cifar:
        by_step.set(xlabel="epoch", ylabel="train loss (label-smoothed)", title="train loss by epoch")
        by_step.set_ylim(low - pad, high + pad)
        by_time.set(xlabel=f"run time ({unit})", ylabel="test accuracy (%)", title="accuracy and time per run")
        for value, label in targets.items():
            by_time.axhline(value, color="k", ls="--", lw=0.8, label=label)
    else:
        by_step.set(xlabel="step", ylabel="val loss", title="val loss by step")
        by_time.set(xlabel=f"train time ({unit}, excluding validation)", ylabel="val loss",
                    title="val loss by train time")
        for ax in (by_step, by_time):
            for (value, label), style in zip(targets.items(), ["--", ":", "-."] * 3):
                ax.axhline(value, color="k", ls=style, lw=0.8, label=label)
            ax.set_ylim(low - pad, high + pad)
        # and the same second half along x, where runs that differ come apart
        halves = [next(c for c in r.curve if c[0] >= r.curve[-1][0] / 2) for r in all_runs]
        by_step.set_xlim(min(h[0] for h in halves), 1.02 * max(r.curve[-1][0] for r in all_runs))
        by_time.set_xlim(min(h[1] for h in halves) / scale, 1.02 * max(r.time_s for r in all_runs) / scale)
    for ax in (by_step, by_time):
        ax.grid(alpha=0.3)
    # one legend under both panels, where it covers no curve however many groups there are
    handles, labels = by_time.get_legend_handles_labels()
    columns = 1 if max(map(len, labels)) > 70 else 2 if max(map(len, labels)) > 40 else 3
    rows = -(-len(labels) // columns)
    fig.legend(handles, labels, loc="lower center", ncol=columns, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.02 + 0.045 * rows, 1, 1))
    return fig


# ----------------------------------------------------------------------------- submit

RECORD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
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
        d = decimals([mean], target)
        raise RecordError(f"the runs miss the target: mean {mean:.{d}f} against {target:.10g}, one-sided p = "
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
    mean, std = mean_std([r.result for r in runs])
    tmean, tstd = mean_std([r.time_s for r in runs])
    d = decimals([*(r.result for r in runs), mean], target)
    unit, scale = time_unit([r.time_s for r in runs])
    first = runs[0]
    hardware = sorted({r.log.hardware for r in runs})
    software = sorted({r.log.software for r in runs})
    relation = "≤" if track.lower_is_better else "≥"
    rows = "\n".join(f"| {r.name} | {'-' if r.seed is None else r.seed} | {r.result:.{d}f} | {r.time_s / scale:.2f} | "
                     f"{r.steps} | [log]({r.log.path.name}) |" for r in runs)
    return f"""# {name} ({track_name} track, {date})

{description}

| | {result_name(track)} | train time ({unit}) |
|---|---|---|
| mean over {len(runs)} runs | **{mean:.{d}f}** | **{tmean / scale:.2f}** |
| std | {std:.{d}f} | {tstd / scale:.2f} |

One-sided t-test that the mean {track.metric} is {relation} {target:.10g}: t = {t:.3f}, p = {p:.3g}
({len(runs) - 1} degrees of freedom).

Hardware: {"; ".join(hardware)}. Software: {"; ".join(software)}.

![{result_name(track)} of every run, by step and by train time](curves.png)

## Runs

| run | seed | {result_name(track)} | train time ({unit}) | {"epochs" if track.metric == "test_acc" else "steps"} | log |
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
        plot([Group(name, runs, track_name, "submitted", [code_key(runs[0])])], directory / "curves.png", target)
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
                        len(runs), meta, meta_path.parent, "; ".join(sorted({r.log.hardware for r in runs}))))
    if not entries:
        return "No record measured in this repository yet."
    unit, scale = time_unit([e[0] for e in entries])
    d = decimals([e[1] for e in entries], track.target)
    lines = [f"| # | train time ({unit}) | {result_name(track)} | runs | hardware | description | date | record |",
             "|---|---|---|---|---|---|---|---|"]
    for rank, (seconds, result, n, meta, directory, hardware) in enumerate(sorted(entries, key=lambda e: e[0]), 1):
        link = Path(os.path.relpath(directory, readme_dir)).as_posix()
        description = meta["description"].splitlines()[0].replace("|", "\\|")
        lines.append(f"| {rank} | {seconds / scale:.2f} | {result:.{d}f} | {n} | {hardware} | {description} "
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


def reproduce(path, n_runs=1, out=ROOT / "logs" / "reproduce", say=print, dry_run=False):
    """Rerun a record, or any group of logged runs, from the source in its logs. Our logs rerun their
    first n_runs seeds with the logged config and compare the results with the logged ones; a public log
    is rerun as its author ran it, by torchrun on as many GPUs. Returns the new runs."""
    path = Path(path)
    groups = group_runs(load_runs([path], strict=False))
    if len(groups) > 1:
        raise RecordError(f"{path} holds {len(groups)} groups ({'; '.join(g.name for g in groups)}): "
                          f"reproduce one of their folders or logs")
    runs = groups[0].runs
    if not all(r.log.config for r in runs):
        if n_runs != 1:
            raise RecordError("--runs counts the seeds of our records; a public log reruns once, as it was run")
        return reproduce_public(runs[0], say=say, dry_run=dry_run)
    track = one_track(runs)
    if not 1 <= n_runs <= len(runs):
        raise RecordError(f"--runs must lie in [1, {len(runs)}], the record's runs")
    device = str(runs[0].log.config.get("device", "cpu"))
    env = dict(os.environ)
    if device.startswith("cuda"):
        import torch
        needed = runs[0].log.config.get("world_size", 1)
        if torch.cuda.device_count() < needed and not dry_run:
            raise RecordError(f"{path} ran on {runs[0].log.hardware} with {needed} process(es); this machine "
                              f"has {torch.cuda.device_count()} GPU(s)")
    else:
        env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU record reruns on the CPU, even where there are GPUs
    log_dir = Path(out) / path.name
    new_runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in runs[:n_runs]:
            write_source(run, track.trainer, Path(tmp))
            cmd = reproduce_command(run, Path(tmp) / track.trainer, log_dir)
            say(f"reproducing {run.name} (seed {run.seed}): {shlex.join(cmd)}")
            if dry_run:
                continue
            result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, check=False)
            try:
                if result.returncode:
                    raise ValueError(f"exit status {result.returncode}")
                new = load_runs([ROOT / printed_log_path(result.stdout)])
            except (ValueError, RecordError) as e:
                raise RecordError(f"the rerun of {run.name} failed ({e}):\n"
                                  f"{(result.stderr or result.stdout)[-3000:]}") from None
            if new[0].log.source != run.log.source:
                raise RecordError(f"{new[0].log.path} logged a different source from the record's")
            new_runs += new
            for r in new:
                d = decimals([r.result, run.result], track.target)
                same = "identical" if r.result == run.result else f"recorded {run.result:.{d}f}"
                say(f"  {track.metric} {r.result:.{d}f} ({same}), train time {format_time(r.time_s)} "
                    f"(recorded {format_time(run.time_s)}); log {r.log.path}")
    if dry_run:
        return []
    mean, std = mean_std([r.result for r in runs])
    new_mean = statistics.mean(r.result for r in new_runs)
    gap = new_mean - mean
    verdict = "within 2 std of the record" if abs(gap) <= 2 * std else "NOT within 2 std of the record"
    d = decimals([new_mean, mean], track.target)
    say(f"new mean {track.metric} {new_mean:.{d}f} over {len(new_runs)} run(s); "
        f"the record's: {mean:.{d}f} ± {std:.{d}f} "
        f"over {len(runs)} runs; difference {gap:+.4f}: {verdict}")
    recorded_hw, new_hw = {r.log.hardware for r in runs}, {r.log.hardware for r in new_runs}
    if recorded_hw != new_hw:
        say(f"note: this machine ({', '.join(sorted(new_hw))}) is not the record's "
            f"({', '.join(sorted(recorded_hw))}): compare the loss, not the time")
    return new_runs


def write_source(run, trainer, folder):
    """Write the files a log's source section holds into folder."""
    try:
        files = source_files(run.log.source, trainer)
    except ValueError as e:
        raise RecordError(f"{run.log.path}: {e}") from None
    for name, text in files.items():  # the trainer and the files it ran, such as kernels.py
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text + "\n")


IMPORT = re.compile(r"^(?:from|import)\s+([\w.]+)", re.MULTILINE)  # top-level imports of a logged source
DATA_PATTERN = re.compile(r"""["']([^"'\n]*fineweb[^"'\n]*\.bin)["']""")


def missing_modules(names, folder):
    """Which of these modules the rerun could not import: looked up as a script in folder sees them, not
    with this repository on the path (its kernels.py is not the kernels package some public trainers use)."""
    check = "import importlib.util, sys; print(' '.join(n for n in sys.argv[1:] if importlib.util.find_spec(n) is None))"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", check, *names], cwd=folder, env=env, capture_output=True,
                            text=True, check=False)
    return result.stdout.split()


def reproduce_public(run, say=print, dry_run=False):
    """Write a public log's source to a temporary folder and run it with torchrun on the logged number of
    GPUs, from the repository root, where data/fineweb10B/ is. On a machine with fewer GPUs, or with
    dry_run, it only prints what it would run."""
    import torch
    if not run.log.source:
        raise RecordError(f"{run.log.path} holds no source (a console capture): there is nothing to rerun")
    trainer = "train_gpt_medium.py" if track_of(run) == "medium" else "train_gpt.py"
    folder = Path(tempfile.mkdtemp(prefix="reproduce-"))
    (folder / trainer).write_text(run.log.source + "\n")
    n = run.log.processes
    cmd = ["torchrun", "--standalone", f"--nproc_per_node={n}", str(folder / trainer)]
    logged, here = run.log.torch_version, torch.__version__
    gpus = torch.cuda.device_count()
    say(f"log:     {run.log.path}")
    say(f"logged:  torch {logged or 'unknown'} on {run.log.hardware}, {n} process(es)")
    say(f"here:    torch {here} with {gpus} GPU(s)")
    if logged is None or logged.split("+")[0] != here.split("+")[0]:
        say(f"warning: the log ran on torch {logged or '(not logged)'}, this machine has {here}: public records "
            f"often ran on nightlies that no longer install, and their code may need that build")
    patterns = sorted(set(DATA_PATTERN.findall(run.log.source)))
    if patterns:
        say(f"data:    the source reads {', '.join(patterns)}, relative to {ROOT}; fetch the shards with "
            f"`python data/cached_fineweb10B.py N` (N train shards of 100M tokens: as many as the run reads)")
    packages = sorted({name.split(".")[0] for name in IMPORT.findall(run.log.source)} - {""}
                      - set(sys.stdlib_module_names))
    if packages:
        missing = missing_modules(packages, folder)
        say(f"imports: {', '.join(packages)}" + (f"; not installed here: {', '.join(missing)}" if missing else ""))
    say(f"source:  {folder / trainer}")
    say(f"command: cd {shlex.quote(str(ROOT))} && {shlex.join(cmd)}")
    if dry_run:
        return []
    if gpus < n:
        raise RecordError(f"the log ran {n} process(es) on {run.log.hardware}; this machine has {gpus} GPU(s): "
                          f"run the command above on one with {n}")
    missing = [p for p in patterns if "/" in p and not glob.glob(str(ROOT / p))]  # ROOT / "/abs" is "/abs"
    if missing:
        raise RecordError(f"no file matches {', '.join(missing)} from {ROOT}: fetch the data first")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", *cmd[1:]], cwd=ROOT, check=False)
    if result.returncode:
        raise RecordError(f"the rerun exited with status {result.returncode}")
    return []


# ----------------------------------------------------------------------------- command line

def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tools.records", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    target_help = "default: the track's (gpt 3.28, medium 2.92, cpu 1.88, cifar 94 as accuracy in %%)"
    for command, text in (("summarize", "per group: a table of the runs, mean, std and t-test"),
                          ("significance", "per group: one-sided t-test of the mean against the target")):
        p = sub.add_parser(command, help=text)
        p.add_argument("paths", nargs="+")
        p.add_argument("--target", type=float, help=target_help)
        p.add_argument("--pool", action="store_true", help="treat all runs as one group, even if they differ")
    p = sub.add_parser("compare", help="is B faster than A at a result that still meets the target?")
    p.add_argument("a", help="log or folder of one group (the baseline)")
    p.add_argument("b", help="log or folder of one group (the candidate)")
    p.add_argument("--target", type=float, help=target_help)
    p.add_argument("--pool", action="store_true", help="pool the groups of each side")
    p = sub.add_parser("plot", help="curves of every run; one colour per group")
    p.add_argument("paths", nargs="+")
    p.add_argument("-o", "--out", type=Path, default=Path("curves.png"))
    p.add_argument("--target", type=float, help=target_help)
    p = sub.add_parser("submit", help="make records/<track>/<date>_<name>/ from the logs of finished runs")
    p.add_argument("paths", nargs="+")
    p.add_argument("--track", choices=sorted(TRACKS), required=True)
    p.add_argument("--name", required=True, help="short, in CamelCase: MuonWarmup")
    p.add_argument("--description", required=True, help="what changed, in one line")
    p = sub.add_parser("reproduce", help="rerun a record or a public log from the source in its logs")
    p.add_argument("record", type=Path)
    p.add_argument("--runs", type=int, default=1, help="how many of our record's runs (seeds) to rerun")
    p.add_argument("--dry-run", action="store_true", help="print what would run, and run nothing")
    sub.add_parser("table", help="rewrite the record tables in README.md from records/")
    args = parser.parse_args(argv)
    try:
        if args.command in ("summarize", "significance"):
            block = summary_table if args.command == "summarize" else significance_block
            print("\n\n".join(block(g, args.target) for g in grouped(args.paths, args.pool)))
        elif args.command == "compare":
            compare(one_group(args.a, args.pool), one_group(args.b, args.pool), args.target)
        elif args.command == "plot":
            plot(grouped(args.paths), args.out, args.target)
            print(f"wrote {args.out}")
        elif args.command == "submit":
            directory = submit(args.paths, args.track, args.name, args.description)
            print(f"wrote {directory.relative_to(ROOT) if directory.is_relative_to(ROOT) else directory}; "
                  f"README.md's {args.track} table updated")
        elif args.command == "reproduce":
            reproduce(args.record, args.runs, dry_run=args.dry_run)
        elif args.command == "table":
            update_tables()
            print("README.md tables updated")
    except RecordError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
