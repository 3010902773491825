"""Read training logs: ours (logs/<run>/log.txt) and the public speedrun's, which share a format.

A log is sections separated by lines of 100 '=': the trainer's source first, then whatever the
trainer reports about its environment, then step lines such as
    step:125/1875 val_loss:4.4043 train_time:14281ms step_avg:114.25ms
    step:14/1875 train_loss:6.3346 train_time:602ms step_avg:43.00ms
Our logs also carry a JSON section with the preset and the full config.
"""
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

SEPARATOR = "=" * 100
STEP_LINE = re.compile(r"step:(\d+)/(\d+) (val_loss|train_loss):(\S+) train_time:(\d+)ms step_avg:(\S+)ms")


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


def parse_step(line):
    """A Step from one log line, or None when the line is not a step line."""
    m = STEP_LINE.fullmatch(line.strip())
    if not m:
        return None
    step, total, kind, loss, ms, avg = m.groups()
    return Step(int(step), int(total), kind, float(loss), int(ms), float(avg))


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
