import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "data"))

import train_gpt  # noqa: E402
import tinyshakespeare  # noqa: E402

# Offline copies: tests never touch the network.
SHARED = ROOT.parent / "shared"
TEXT_CANDIDATES = [os.environ.get("TINYSHAKESPEARE", ""), SHARED / "data/tinyshakespeare/input.txt",
                   ROOT / "data/tinyshakespeare/input.txt"]
if "TIKTOKEN_CACHE_DIR" not in os.environ and (SHARED / "tiktoken").is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED / "tiktoken")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA, skipped without it; `./run.sh test -m gpu` runs these alone")


def cpu_env():
    """Environment for trainer subprocesses: CPU only, whatever the machine has."""
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="session")
def shakespeare_text():
    for candidate in TEXT_CANDIDATES:
        if candidate and Path(candidate).is_file():
            return Path(candidate).read_text(encoding="utf-8")
    pytest.skip("tiny Shakespeare input.txt not found: set TINYSHAKESPEARE or run ./run.sh once")


@pytest.fixture(scope="session")
def char_shards(shakespeare_text, tmp_path_factory):
    out = tmp_path_factory.mktemp("shakespeare_char")
    tinyshakespeare.write_char(shakespeare_text, out)
    return out


def tiny_config(char_shards, tmp_path, **overrides):
    """A CPU-track config small enough for a test to train in seconds."""
    base = dict(train_files=str(char_shards / "train_*.bin"), val_files=str(char_shards / "val_*.bin"),
                val_tokens=4096, seq_len=32, batch_size=8, micro_batch_size=8, n_layer=2, model_dim=32,
                head_dim=16, window=32, steps=6, cooldown_steps=3, muon_momentum_warmup=3, val_every=3,
                dtype="float32", compile=False, warmup_steps=0, sample_tokens=0, log_dir=str(tmp_path / "logs"))
    return dataclasses.replace(train_gpt.PRESETS["cpu-shakespeare"], **{**base, **overrides})


def config_args(cfg):
    """The command-line flags that reproduce a config."""
    return [f"--{k}={v}" for k, v in dataclasses.asdict(cfg).items()]


def trainer_command(nproc):
    """train_gpt.py as users start it: one process, or torchrun with nproc gloo processes."""
    if nproc == 1:
        return [sys.executable, str(ROOT / "train_gpt.py")]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            str(ROOT / "train_gpt.py")]


def run_trainer(cfg, nproc=1, env=None):
    """Run train_gpt.py with cfg's flags, on the CPU unless given another environment; return its parsed log."""
    from tools.logs import parse_log, printed_log_path
    result = subprocess.run([*trainer_command(nproc), *config_args(cfg)], capture_output=True, text=True,
                            env=env or cpu_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return parse_log(printed_log_path(result.stdout))


class Crash(Exception):
    """Stands for a process killed mid-run."""


def train_lines(cfg, run_dir, crash_at=None, device=None):
    """Train in-process (on the CPU unless given a device); return the step lines. crash_at=k raises as
    step k is logged, as a killed process would stop: mid-run, with no chance to save."""
    from tools.logs import parse_step
    lines = []

    def log(line):
        if crash_at is not None and line.startswith(f"step:{crash_at}/"):
            raise Crash
        lines.append(line)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        train_gpt.train(cfg, log, device=device or torch.device("cpu"), run_dir=run_dir)
    except Crash:
        pass
    return [line for line in lines if parse_step(line)]
