"""The preflight on the CPU: the whole command through run.sh and torchrun, and each check that can fail
made to fail: missing shards, a batch that does not divide, numerics, out of memory, memory and disk
limits, an unpinned torch."""
import dataclasses
import re
import shutil
import subprocess
import sys

import pytest
import torch
from torch.nn.attention.flex_attention import flex_attention

import train_gpt
from conftest import ROOT, cpu_env, tiny_config
from tools import perf, preflight
from tools.logs import parse_log, source_files

FAST = ["--compile=false", "--timed_steps=2"]  # the checks, not the compiler, are under test


def data_flags(char_shards):
    return [f"--train_files={char_shards / 'train_*.bin'}", f"--val_files={char_shards / 'val_*.bin'}"]


def rows(out):
    """{check: (status, reason)} from the table the preflight prints last."""
    lines = out.splitlines()
    first = max(i for i, line in enumerate(lines) if re.fullmatch(r"check\s+status\s+reason", line))
    found = {}
    for line in lines[first + 1:]:
        if re.fullmatch(r"\d+ checks: \d+ PASS, \d+ WARN, \d+ FAIL, \d+ SKIP", line):
            return found
        m = re.fullmatch(r"(\S.*?)\s{2,}(PASS|WARN|FAIL|SKIP)\s{2,}(.*)", line)
        assert m, line
        found[m.group(1)] = (m.group(2), m.group(3))
    raise AssertionError("the table has no summary line")


class Lines(list):
    """A logger that keeps the lines, for checks run one by one."""

    def __init__(self, path):
        super().__init__()
        self.path = path

    def __call__(self, text, echo=True):
        self.append(text)


def checker(cfg, tmp_path, world_size=1, preset="cpu-shakespeare"):
    """A Preflight to run checks one by one, with the batch split checked (the step checks need it)."""
    check = preflight.Preflight(cfg, preset, Lines(tmp_path / "log.txt"), 0, world_size, torch.device("cpu"),
                                timed_steps=2)
    check.check("environment", "batch split", check.batch_split)
    return check


def test_cpu_preset_passes_through_run_sh(char_shards, tmp_path):
    """The command as users run it: a table with every check, no FAIL, and a log that begins like a
    training log (the sources it ran, versions and hardware, the config) and ends with the table."""
    result = subprocess.run(["bash", str(ROOT / "run.sh"), "preflight", *data_flags(char_shards), *FAST,
                             f"--log_dir={tmp_path}"], capture_output=True, text=True, timeout=600,
                            env={**cpu_env(), "PYTHON": sys.executable})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    found = rows(result.stdout)
    assert len(found) == 18 and not [c for c, (status, _) in found.items() if status == "FAIL"], found
    assert found["environment / batch split"][0] == "PASS"
    assert found["data / train shards"][0] == "PASS" and found["checkpoint / round trip"][0] == "PASS"
    assert found["numerics / Triton Gram kernel"] == ("SKIP", "CUDA only (tests/test_triton.py runs the kernel "
                                                              "under Triton's interpreter)")
    assert found["collectives / all-reduce"] == ("SKIP", "one process: nothing to exchange")
    assert re.search(r"falls from 4\.17\d\d to [0-3]\.\d{4} in 4 steps", found["step / loss"][1])
    (log,) = (tmp_path / "preflight").glob("*/log.txt")
    parsed = parse_log(log)
    assert list(source_files(parsed.source, "train_gpt.py")) == list(preflight.SOURCES)
    assert parsed.config["preflight"] == "cpu-shakespeare" and parsed.config["config"]["compile"] is False
    assert log.read_text().rstrip().endswith(result.stdout.rstrip().splitlines()[-2])  # the table's last line
    assert not list(log.parent.glob("*.pt"))  # the round trip's checkpoint is removed


def test_missing_shards_fail_naming_the_fetch_command_and_the_rest_still_runs(tmp_path, capsys):
    missing = tmp_path / "fineweb10B"
    code = preflight.main(["--preset", "cpu-shakespeare", f"--train_files={missing}/fineweb_train_*.bin",
                           f"--val_files={missing}/fineweb_val_*.bin", *FAST, f"--log_dir={tmp_path}"])
    found = rows(capsys.readouterr().out)
    assert code == 1
    assert found["data / train shards"] == (
        "FAIL", f"no shard matches '{missing}/fineweb_train_*.bin': `python data/cached_fineweb10B.py 1` fetches them")
    assert found["data / val shard"] == (
        "FAIL", f"no shard matches '{missing}/fineweb_val_*.bin': `python data/cached_fineweb10B.py 1` fetches it")
    assert found["step / loss"][0] == "PASS" and found["checkpoint / round trip"][0] == "PASS"  # it kept going


def test_no_data_skips_the_data_checks(tmp_path, capsys):
    assert preflight.main(["--no-data", "--train_files=nowhere/*.bin", *FAST, f"--log_dir={tmp_path}"]) == 0
    found = rows(capsys.readouterr().out)
    assert found["data / train shards"] == found["data / val shard"] == ("SKIP", "--no-data")


@pytest.mark.parametrize("batch_size, micro, world_size, message", [
    (32, 5, 1, "batch_size 32 is not a multiple of micro_batch_size 5 x 1 processes: --micro_batch_size=1 or 2 or "
               "4 or 8 or 16 or 32 divides it over 1"),
    (8, 1, 3, "batch_size 8 is not a multiple of micro_batch_size 1 x 3 processes: with micro_batch_size 1, run on "
              "1 or 2 or 4 or 8 processes in all"),
    (8, 2, 4, None),
])
def test_a_batch_that_does_not_divide_says_what_would(char_shards, tmp_path, batch_size, micro, world_size, message):
    cfg = tiny_config(char_shards, tmp_path, batch_size=batch_size, micro_batch_size=micro)
    check = checker(cfg, tmp_path, world_size)
    (_, _, status, reason), = check.results
    if message is None:
        assert (status, reason) == ("PASS", "batch_size 8 = micro_batch_size 2 x 4 processes x 1 accumulation step(s); "
                                            "256 tokens a step")
    else:
        assert (status, reason) == ("FAIL", message)
        check.check("step", "build and compile", check.build_and_compile)
        assert check.results[-1][2:] == ("SKIP", "the batch does not split over these processes")


def test_a_batch_that_does_not_divide_fails_the_command(char_shards, tmp_path, capsys):
    code = preflight.main(["--micro_batch_size=5", *data_flags(char_shards), *FAST, f"--log_dir={tmp_path}"])
    out = capsys.readouterr().out
    assert code == 1 and rows(out)["environment / batch split"][0] == "FAIL"
    assert "preflight: FAIL (batch split): fix these before the run" in out


def broken_newton_schulz(G, steps=5, dtype=torch.bfloat16, triton_gram=True):
    return G.to(dtype) / (G.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # normalised, never orthogonalised


def noisy_attention(q, k, v, block_mask):
    out = flex_attention(q, k, v, block_mask=block_mask)
    return out + 0.01 * torch.randn_like(out)


@pytest.mark.parametrize("target, replacement, failing, message", [
    ("newton_schulz", broken_newton_schulz, ["Newton-Schulz"],
     r"^5 steps in float32: singular values in \[0\.0\d\d, .*\], outside \[0\.6, 1\.25\]$"),
    ("flex_attention", noisy_attention, ["attention paths", "small model, both paths"],
     r"^FlexAttention \(eager\) in float32 is off: output \d\.\de-0\d against the dense path's \d\.\de[-+]\d\d$"),
])
def test_a_numerics_check_made_to_fail(char_shards, tmp_path, capsys, monkeypatch, target, replacement, failing, message):
    monkeypatch.setattr(train_gpt, target, replacement)
    code = preflight.main([*data_flags(char_shards), *FAST, f"--log_dir={tmp_path}"])
    out = capsys.readouterr().out
    found = rows(out)
    assert code == 1 and f"preflight: FAIL ({', '.join(failing)}): fix these before the run" in out
    status, reason = found[f"numerics / {failing[0]}"]
    assert status == "FAIL" and re.search(message, reason), reason
    assert [c for c, (s, _) in found.items() if s == "FAIL"] == [f"numerics / {f}" for f in failing]
    assert found["checkpoint / round trip"][0] == "PASS"  # it kept going to the last check


def test_out_of_memory_names_the_micro_batch_that_fits(char_shards, tmp_path, monkeypatch):
    """A card that holds 8 sequences a micro-batch: at the preset's 32 the step runs out of memory, and
    the check tries smaller micro-batches, largest first."""
    tried = []
    step = train_gpt.train_step

    def limited(s, batches, cfg, *args, **kwargs):
        tried.append(cfg.micro_batch_size)
        if cfg.micro_batch_size > 8:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return step(s, batches, cfg, *args, **kwargs)
    monkeypatch.setattr(train_gpt, "train_step", limited)
    cfg = tiny_config(char_shards, tmp_path, batch_size=32, micro_batch_size=32, seq_len=16)
    check = checker(cfg, tmp_path)
    check.check("step", "build and compile", check.build_and_compile)
    status, reason = check.results[-1][2:]
    assert status == "FAIL" and re.fullmatch(r"out of memory at micro_batch_size 32 \([\d.]+ GiB cards\); "
                                             r"--micro_batch_size=8 fits \(peak [\d.]+ GiB\), with the same updates",
                                             reason), reason
    assert sorted(set(tried), reverse=True) == [32, 16, 8]
    check.check("step", "step time", check.step_time)
    assert check.results[-1][2] == "SKIP"


def test_memory_above_90_percent_warns(char_shards, tmp_path, monkeypatch):
    cfg = tiny_config(char_shards, tmp_path, batch_size=16, micro_batch_size=4)
    check = checker(cfg, tmp_path)
    check.check("step", "build and compile", check.build_and_compile)
    used = check.step["memory"][0]
    for capacity, expected in ((10 * used, "PASS"), (1.05 * used, "WARN")):
        monkeypatch.setattr(perf, "memory_capacity", lambda device, capacity=capacity: capacity)
        check.check("step", "memory", check.memory)
        assert check.results[-1][2] == expected
    assert check.results[-1][3].endswith("above 90%, little room for fragmentation; --micro_batch_size=2 lowers "
                                         "the activations' share with the same updates")


def test_disk_for_checkpoints(char_shards, tmp_path, monkeypatch):
    cfg = tiny_config(char_shards, tmp_path, save_every=10, model_dim=128, head_dim=32)  # megabytes: little overhead
    check = checker(cfg, tmp_path)
    check.check("data", "disk", check.disk)
    assert check.results[-1][2] == "PASS"
    estimate = float(re.search(r"a checkpoint takes about ([\d.]+) MB", check.results[-1][3]).group(1)) * 1e6
    train_gpt.train(dataclasses.replace(cfg, steps=1, cooldown_steps=0, save_every=1), lambda line: None, run_dir=tmp_path)
    (real,) = tmp_path.glob("step_*.pt")
    assert 0.9 < estimate / real.stat().st_size < 1.1  # the estimate is the real size, within 10%
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=real.stat().st_size))
    check.check("data", "disk", check.disk)
    assert check.results[-1][2] == "FAIL"
    check = checker(dataclasses.replace(cfg, save_every=0), tmp_path)
    check.check("data", "disk", check.disk)
    assert check.results[-1][2:] == ("SKIP", "no --save_every: the run writes no checkpoint")


def test_a_torch_other_than_the_pinned_one_warns(char_shards, tmp_path, monkeypatch):
    check = checker(tiny_config(char_shards, tmp_path), tmp_path)
    monkeypatch.setattr(preflight, "pinned_torch", lambda: torch.__version__.split("+")[0])  # CI's case
    check.check("environment", "versions", check.versions)
    assert check.results[-1][2:] == ("PASS", f"torch {torch.__version__}, Triton "
                                             f"{preflight.kernels.triton.__version__ if preflight.kernels.triton else 'not installed'} "
                                             f"(the pinned torch)")
    monkeypatch.setattr(preflight, "pinned_torch", lambda: "9.9.0")
    check.check("environment", "versions", check.versions)
    status, reason = check.results[-1][2:]
    assert status == "WARN" and "not the pinned 9.9.0: records were timed with 9.9.0's compiler" in reason
    monkeypatch.setattr(torch, "__version__", "2.10.0")
    check.check("environment", "versions", check.versions)
    assert check.results[-1][2] == "FAIL" and check.results[-1][3].endswith("this code needs torch 2.11 or newer")


def test_gpu_presets_skip_the_step_on_a_cpu(tmp_path):
    check = checker(train_gpt.PRESETS["gpt2-speedrun"], tmp_path, preset="gpt2-speedrun")
    check.check("step", "build and compile", check.build_and_compile)
    status, reason = check.results[-1][2:]
    assert status == "SKIP" and re.fullmatch(r"one step of gpt2-speedrun would take about \d+ min on this CPU: the "
                                             r"step checks need the GPUs it is meant for", reason)


def test_two_processes_measure_collectives_and_agree(char_shards, tmp_path):
    """Under torchrun (two gloo processes, as run.sh launches them): bus bandwidth at training's sizes, and
    one table from rank 0 in which each check is the worst of both ranks."""
    result = subprocess.run(["bash", str(ROOT / "run.sh"), "preflight", *data_flags(char_shards), *FAST,
                             "--batch_size=4", "--micro_batch_size=2", f"--log_dir={tmp_path}"],
                            capture_output=True, text=True, timeout=600,
                            env={**cpu_env(), "PYTHON": sys.executable, "NPROC_PER_NODE": "2"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    found = rows(result.stdout)
    assert result.stdout.count("checks: ") == 1  # rank 0 alone prints
    for op in ("all-reduce", "all-gather"):
        status, reason = found[f"collectives / {op}"]
        assert status == "PASS" and re.fullmatch(r"bus bandwidth [\d.]+ GB/s at [\d.]+ MiB over all processes.*", reason)
    assert found["environment / batch split"] == ("PASS", "batch_size 4 = micro_batch_size 2 x 2 processes x 1 "
                                                          "accumulation step(s); 256 tokens a step")
    assert found["checkpoint / round trip"][0] == "PASS"  # rank 0's; rank 1 only gathers its Muon share
    assert "hardware" in result.stdout and "2 process(es) on the CPU" in found["environment / hardware"][1]


def test_a_checkpoint_that_comes_back_changed_fails(char_shards, tmp_path, monkeypatch):
    read = train_gpt.read_checkpoint

    def flipped(path):  # one bit of one weight, as a faulty disk or filesystem would return it
        ckpt = read(path)
        ckpt["model"]["skip_weights"] = ckpt["model"]["skip_weights"].clone()
        ckpt["model"]["skip_weights"].view(torch.int32)[0] ^= 1
        return ckpt
    monkeypatch.setattr(train_gpt, "read_checkpoint", flipped)
    check = checker(tiny_config(char_shards, tmp_path), tmp_path)
    for name, fn in (("build and compile", check.build_and_compile), ("round trip", check.checkpoint)):
        check.check("step", name, fn)
    assert check.results[-1][2:] == ("FAIL", "2 tensors changed on the way: read back: ['model']['skip_weights'] "
                                             "differs")
