"""Read training logs: ours (train_gpt.py, train_cifar.py) and the public speedrun's.

A log is sections separated by lines of 100 '=': the trainer's source first, then whatever the
trainer reports about its environment, then its progress. GPT logs (ours and the public ones) have
step lines such as
    step:125/1875 val_loss:4.4043 train_time:14281ms step_avg:114.25ms
    step:14/1875 train_loss:6.3346 train_time:602ms step_avg:43.00ms
    step:14/1875 train_time:602ms step_avg:43.00ms      (public train lines from 2025 on)
    step:125/3148 val_loss:4.54643 train_time:125.376s step_avg:1003.01ms    (public optimization track)
and CIFAR logs hold several runs each, as
    run:2/5 epoch:8/8 train_loss:0.9981 train_acc:0.9733
    run:2/5 test_acc:0.9412 time:3.021s
Some public records keep console captures instead (.log files: torchrun's output with the step lines,
no source and no separators); they are read too, as runs without a source.
Our logs also carry a JSON section with the full config. When a trainer runs code from other files of
this repository (train_gpt.py's kernels.py and sampling.py), its source section holds each of them after
the trainer's own source, opened by a line of 100 '-' and "file: NAME".

Every reason a file cannot be read is a LogError naming the file, in one line.
"""
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

SEPARATOR = "=" * 100
FILE_MARK = "-" * 100
FILE_NAME = re.compile(r"[\w.-]+(/[\w.-]+)*\.py")  # relative, no "..": a path under the repository
STEP_FIELD = re.compile(r"(\w+):(\S*)")
EPOCH_LINE = re.compile(r"run:(\d+)/(\d+) epoch:(\d+)/(\d+) train_loss:(\S+) train_acc:(\S+)")
TEST_LINE = re.compile(r"run:(\d+)/(\d+) test_acc:(\S+) time:(\S+)s")
LLMC_LINE = re.compile(r"s:\d+ t[re]l:\S+")  # llm.c's main.log: "s:250 tel:6.3097"
GPU_ROW = re.compile(r"^\|\s+(\d+)\s+(NVIDIA .+?)\s+(?:On|Off)\s+\|", re.MULTILINE)  # a GPU in nvidia-smi's table
GPU_PROCESS = re.compile(r"^\|\s+(\d+)\s+\S+\s+\S+\s+\d+\s+C\S*\s", re.MULTILINE)  # a compute process on GPU n
DEVICE_LINE = re.compile(r"device_name=(.+?) with world_size=(\d+)")  # the public optimization track's
GLOO_PEERS = re.compile(r"Rank \d+ is connected to (\d+) peer ranks")  # a console capture's torchrun output
TORCH_VERSION = re.compile(r"(?:torch|pytorch) (\d+\.\d+\S*)", re.IGNORECASE)


class LogError(ValueError):
    """A file that holds no finished run, and why, in one line that names it."""


class NotALog(LogError):
    """A file that is no training log this module reads: binary, not UTF-8, llm.c's format, other text."""


@dataclass
class Step:
    step: int
    total: int
    kind: str  # "val_loss" or "train_loss"
    loss: float  # nan for public train lines, which stopped logging the loss in 2025
    train_time_ms: float
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
        """What the trainer reported before training: the section after the source; all of a console
        capture, which has no sections."""
        return self.sections[0] if self.sections and self.source else "\n".join(self.sections)

    @property
    def digest(self):
        """The first 8 hex digits of the source's SHA-256: runs of the same code share it. None for a
        console capture, which holds no source."""
        return hashlib.sha256(self.source.encode()).hexdigest()[:8] if self.source else None

    @property
    def processes(self):
        """How many processes trained: our logged world size; in a public log, the GPUs that nvidia-smi shows
        running a process (all its GPUs when it lists none)."""
        if "world_size" in self.config:
            return self.config["world_size"]
        device = DEVICE_LINE.search(self.environment)
        if device:
            return int(device[2])
        peers = GLOO_PEERS.search(self.environment)
        if peers:
            return int(peers[1]) + 1
        busy = set(GPU_PROCESS.findall(self.environment))
        return len(busy) or len(GPU_ROW.findall(self.environment)) or 1

    @property
    def hardware(self):
        """'8x NVIDIA H100 80GB HBM3': the processes and the GPU model nvidia-smi names; or our 'cpu: ...' line
        up to the thread count, with the process count when there were several."""
        gpus = [name for _, name in GPU_ROW.findall(self.environment)]
        device = DEVICE_LINE.search(self.environment)
        if device:
            gpus = [device[1]]
        if gpus:
            return " + ".join(f"{self.processes if len(set(gpus)) == 1 else gpus.count(name)}x {name}"
                              for name in dict.fromkeys(gpus))
        for line in self.environment.splitlines():
            if line.startswith("cpu: "):
                cpu = line[5:].split(", torch threads")[0]
                return cpu if self.processes == 1 else f"{cpu}, {self.processes} processes"
        if GLOO_PEERS.search(self.environment):
            return f"{self.processes} processes, device not logged"
        return "not logged"

    @property
    def software(self):
        """The first line of the environment section: python, torch and cuda versions."""
        if not self.source or not self.environment.strip():
            return "not logged"
        return self.environment.strip().splitlines()[0]

    @property
    def torch_version(self):
        """The torch version the log reports ('2.6.0.dev20241203+cu124'), or None."""
        m = TORCH_VERSION.search(self.environment)
        return m.group(1) if m else None


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
    """A Step from one log line, or None when the line is not a step line. Fields other than step,
    val_loss or train_loss, train_time and step_avg (later public logs add some) are ignored."""
    line = line.strip()
    if not line.startswith("step:"):
        return None
    fields = dict(STEP_FIELD.findall(line))
    step = re.fullmatch(r"(\d+)/(\d+)", fields.get("step", ""))
    train_time = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s)", fields.get("train_time", ""))
    if not step or not train_time:
        return None
    kind = "val_loss" if "val_loss" in fields else "train_loss"
    try:
        loss = float(fields.get(kind, "nan"))
        avg = float(fields.get("step_avg", "nanms").removesuffix("ms"))
    except ValueError:
        return None
    ms = float(train_time[1]) * (1 if train_time[2] == "ms" else 1000)
    return Step(int(step[1]), int(step[2]), kind, loss, ms, avg)


def printed_log_path(stdout):
    """The log a trainer wrote, from the `log: PATH` line it prints last; ValueError when there is none."""
    paths = [line[5:] for line in stdout.splitlines() if line.startswith("log: ")]
    if not paths:
        raise ValueError("the trainer printed no 'log: PATH' line")
    return paths[-1]


def read_text(path):
    """A file's text; LogError for a file that is binary or not UTF-8."""
    data = Path(path).read_bytes()
    if b"\0" in data[:1 << 20]:
        raise NotALog(f"{path}: binary data, not a text log")
    try:
        return data.decode().replace("\r\n", "\n")  # a log saved on Windows is the same log
    except UnicodeDecodeError as e:
        raise NotALog(f"{path}: byte {e.start} is not UTF-8: not a text log") from None


def parse_log(path):
    path = Path(path)
    text = read_text(path)
    source, sep, rest = text.partition("\n" + SEPARATOR + "\n")
    if sep:
        sections = rest.split("\n" + SEPARATOR + "\n")
    else:  # a console capture holds step lines but no source; anything else is no log of ours
        lines = text.splitlines()
        if lines and sum(map(bool, map(LLMC_LINE.fullmatch, lines))) > len(lines) / 2:
            raise NotALog(f"{path}: llm.c's format ('s:N tel:LOSS' lines): val loss by step, with no train "
                           f"time, hardware or source to compare; not read")
        if not any(map(parse_step, lines)):
            raise NotALog(f"{path}: no line of 100 '=' after a source and no step lines: not a training log")
        source, sections = "", [text]
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
    """The finished runs of a log; LogError, naming the file, for a run that did not finish or whose
    result is not a number."""
    try:
        runs = finished_runs(log)
    except LogError:
        raise
    except ValueError as e:  # a number that does not parse, in a line of the right shape
        raise LogError(f"{log.path}: {e}") from None
    for run in runs:
        if not math.isfinite(run.result):
            raise LogError(f"{log.path}: the final result is {run.result}: the run diverged")
    return runs


def finished_runs(log):
    lines = [line.strip() for section in log.sections for line in section.splitlines()]
    tests = [m.groups() for m in map(TEST_LINE.fullmatch, lines) if m]
    if tests:
        epochs = [m.groups() for m in map(EPOCH_LINE.fullmatch, lines) if m]
        declared = max(int(total) for _, total, *_ in tests + epochs)
        done = {int(k): (float(acc), float(seconds)) for k, _, acc, seconds in tests}
        missing = [k for k in range(1, declared + 1) if k not in done]
        if missing:
            raise LogError(f"{log.path}: run {missing[0]}/{declared} has no test_acc line: it did not finish")
        seed = log.config.get("seed")
        runs = []
        for k, (acc, seconds) in sorted(done.items()):
            curve = [(int(e), None, float(loss)) for run, _, e, _, loss, _ in epochs if int(run) == k]
            runs.append(Run(log, k, "cifar", 100 * acc, seconds, len(curve),
                            None if seed is None else seed + k - 1, curve))
        return runs
    if not log.val:
        raise LogError(f"{log.path}: no val_loss step line and no test_acc run line: not a finished run")
    last = log.val[-1]
    if last.step != last.total:
        raise LogError(f"{log.path}: the last val_loss is at step {last.step} of {last.total}: "
                       f"the run did not finish")
    curve = [(s.step, s.train_time_ms / 1000, s.loss) for s in log.val]
    seed = log.config.get("config", {}).get("seed")
    return [Run(log, 1, "gpt", last.loss, last.train_time_ms / 1000, last.step, seed, curve)]
