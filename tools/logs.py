"""Read training logs: ours (train_gpt.py, train_cifar.py) and the public speedrun's.

A log is sections separated by lines of 100 '=': the trainer's source first, then whatever the
trainer reports about its environment, then its progress. GPT logs (ours and the public ones) have
step lines such as
    step:125/1875 val_loss:4.4043 train_time:14281ms step_avg:114.25ms
    step:14/1875 train_loss:6.3346 train_time:602ms step_avg:43.00ms
and CIFAR logs hold several runs each, as
    run:2/5 epoch:8/8 train_loss:0.9981 train_acc:0.9733
    run:2/5 test_acc:0.9412 time:3.021s
Our logs also carry a JSON section with the full config. When a trainer runs code from other files of
this repository (train_gpt.py's kernels.py and sampling.py), its source section holds each of them after the trainer's
own source, opened by a line of 100 '-' and "file: NAME".
"""
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

SEPARATOR = "=" * 100
FILE_MARK = "-" * 100
FILE_NAME = re.compile(r"[\w.-]+(/[\w.-]+)*\.py")  # relative, no "..": a path under the repository
STEP_LINE = re.compile(r"step:(\d+)/(\d+) (val_loss|train_loss):(\S+) train_time:(\d+)ms step_avg:(\S+)ms")
EPOCH_LINE = re.compile(r"run:(\d+)/(\d+) epoch:(\d+)/(\d+) train_loss:(\S+) train_acc:(\S+)")
TEST_LINE = re.compile(r"run:(\d+)/(\d+) test_acc:(\S+) time:(\S+)s")
GPU_LINE = re.compile(r"\|\s+\d+\s+(NVIDIA .+?)\s+(?:On|Off)\s+\|")  # a GPU's row in nvidia-smi's table


@dataclass
class Step:
    step: int
    total: int
    kind: str  # "val_loss" or "train_loss"
    loss: float
    train_time_ms: int
    step_avg_ms: float


@dataclass
class RunLog:
    path: Path
    source: str
    sections: list  # the sections after the source, as text
    config: dict = field(default_factory=dict)  # our JSON section, {} for public logs
    steps: list = field(default_factory=list)

    @property
    def val(self):
        return [s for s in self.steps if s.kind == "val_loss"]

    @property
    def train(self):
        return [s for s in self.steps if s.kind == "train_loss"]

    @property
    def run_id(self):
        """The run's name: its folder for our logs/<run>/log.txt, else the file's stem."""
        return self.path.parent.name if self.path.name == "log.txt" else self.path.stem

    @property
    def environment(self):
        return self.sections[0] if self.sections else ""

    @property
    def hardware(self):
        """'8x NVIDIA H100 80GB HBM3' from nvidia-smi's table, or our 'cpu: ...' line up to the thread count."""
        gpus = GPU_LINE.findall(self.environment)
        if gpus:
            return " + ".join(f"{gpus.count(name)}x {name}" for name in dict.fromkeys(gpus))
        for line in self.environment.splitlines():
            if line.startswith("cpu: "):
                return line[5:].split(", torch threads")[0]
        return "unknown"

    @property
    def software(self):
        """The first line of the environment section: python, torch and cuda versions."""
        return self.environment.strip().splitlines()[0] if self.environment.strip() else "unknown"


def source_files(source, trainer):
    """{path: text} of the files in a log's source section, the trainer first; ValueError for a file name
    that is not a plain relative path."""
    first, *others = source.split(f"\n{FILE_MARK}\nfile: ")
    files = {trainer: first}
    for part in others:
        name, _, text = part.partition("\n")
        if not FILE_NAME.fullmatch(name) or ".." in name.split("/"):
            raise ValueError(f"the logged source names a file {name!r}: expected a relative path to a .py file")
        files[name] = text
    return files


def parse_step(line):
    """A Step from one log line, or None when the line is not a step line."""
    m = STEP_LINE.fullmatch(line.strip())
    if not m:
        return None
    step, total, kind, loss, ms, avg = m.groups()
    return Step(int(step), int(total), kind, float(loss), int(ms), float(avg))


def printed_log_path(stdout):
    """The log a trainer wrote, from the `log: PATH` line it prints last; ValueError when there is none."""
    paths = [line[5:] for line in stdout.splitlines() if line.startswith("log: ")]
    if not paths:
        raise ValueError("the trainer printed no 'log: PATH' line")
    return paths[-1]


def parse_log(path):
    path = Path(path)
    text = path.read_text()
    source, sep, rest = text.partition("\n" + SEPARATOR + "\n")
    if not sep:
        raise ValueError(f"{path}: no line of 100 '=' after the source: not a training log")
    sections = rest.split("\n" + SEPARATOR + "\n")
    log = RunLog(path, source, sections)
    for section in sections:
        if section.lstrip().startswith("{"):
            try:
                log.config = json.loads(section)
            except json.JSONDecodeError:
                pass
    log.steps = [s for section in sections for s in map(parse_step, section.splitlines()) if s]
    return log


@dataclass
class Run:
    """One training run's outcome. A GPT log holds one run; a CIFAR log holds several."""
    log: RunLog
    index: int  # 1-based position in its log
    kind: str  # "gpt" or "cifar"
    result: float  # the final val loss, or the test accuracy in percent
    time_s: float  # train time
    steps: int  # optimizer steps (GPT) or epochs (CIFAR)
    seed: object  # an int, or None when the log does not say (public logs)
    curve: list  # (step, train seconds, val loss) for GPT; (epoch, None, train loss) for CIFAR

    @property
    def name(self):
        return self.log.run_id if self.kind == "gpt" else f"{self.log.run_id} run {self.index}"


def runs_from_log(log):
    """The finished runs of a log; ValueError, naming the file, for a run that did not finish."""
    lines = [line.strip() for section in log.sections for line in section.splitlines()]
    tests = [m.groups() for m in map(TEST_LINE.fullmatch, lines) if m]
    if tests:
        epochs = [m.groups() for m in map(EPOCH_LINE.fullmatch, lines) if m]
        declared = max(int(total) for _, total, *_ in tests + epochs)
        done = {int(k): (float(acc), float(seconds)) for k, _, acc, seconds in tests}
        missing = [k for k in range(1, declared + 1) if k not in done]
        if missing:
            raise ValueError(f"{log.path}: run {missing[0]}/{declared} has no test_acc line: it did not finish")
        seed = log.config.get("seed")
        runs = []
        for k, (acc, seconds) in sorted(done.items()):
            curve = [(int(e), None, float(loss)) for run, _, e, _, loss, _ in epochs if int(run) == k]
            runs.append(Run(log, k, "cifar", 100 * acc, seconds, len(curve),
                            None if seed is None else seed + k - 1, curve))
        return runs
    if not log.val:
        raise ValueError(f"{log.path}: no val_loss step line and no test_acc run line: not a finished run")
    last = log.val[-1]
    if last.step != last.total:
        raise ValueError(f"{log.path}: the last val_loss is at step {last.step} of {last.total}: "
                         f"the run did not finish")
    curve = [(s.step, s.train_time_ms / 1000, s.loss) for s in log.val]
    seed = log.config.get("config", {}).get("seed")
    return [Run(log, 1, "gpt", last.loss, last.train_time_ms / 1000, last.step, seed, curve)]
