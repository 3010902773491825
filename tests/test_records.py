import hashlib
import json
import math
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

import train_gpt
from conftest import config_args, tiny_config
from tools import records
from tools.logs import SEPARATOR, parse_log, runs_from_log, source_files


@pytest.fixture(scope="module")
def tiny_logs(char_shards, tmp_path_factory):
    """Three finished CPU-track runs of a tiny model (seeds 0, 1, 2), logged by the real trainer."""
    tmp = tmp_path_factory.mktemp("runs")
    cfg = tiny_config(char_shards, tmp, steps=8, cooldown_steps=4, val_every=4)
    for seed in range(3):
        assert train_gpt.main(["--preset", "cpu-shakespeare", *config_args(cfg), f"--seed={seed}"]) == 0
    return sorted((tmp / "logs").glob("*/log.txt"), key=lambda p: parse_log(p).config["config"]["seed"])


@pytest.fixture
def readme(tmp_path):
    path = tmp_path / "README.md"
    path.write_text("# speedrun\n\n" + "".join(f"## {t}\n\n{a}\n{b}\n\n" for t in records.TRACKS
                                               for a, b in [records.table_markers(t)]))
    return path


def write_log(path, source, sections):
    path.write_text(source + "".join(f"\n{SEPARATOR}\n{s}" for s in sections) + "\n")
    return path


def nvidia_smi(gpus=8, busy=None, model="NVIDIA H100 80GB HBM3"):
    """nvidia-smi's table as a public log holds it: one row per GPU, then a process on each busy GPU."""
    head = """+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 550.54.15              Driver Version: 550.54.15      CUDA Version: 12.4     |
|-----------------------------------------+------------------------+----------------------+
| GPU  Name                 Persistence-M | Bus-Id          Disp.A | Volatile Uncorr. ECC |
|=========================================+========================+======================|
"""
    rows = "".join(f"""|   {i}  {model:<30}On  |   00000000:{i:02X}:00.0 Off |                    0 |
| N/A   35C    P0            119W /  700W |    1234MiB /  81559MiB |      0%      Default |
+-----------------------------------------+------------------------+----------------------+
""" for i in range(gpus))
    processes = "".join(f"|    {i}   N/A  N/A     {4000 + i:>6}      C   /usr/bin/python3                         0MiB |\n"
                        for i in range(gpus if busy is None else busy))
    return head + rows + f"""
+-----------------------------------------------------------------------------------------+
| Processes:                                                                              |
|  GPU   GI   CI        PID   Type   Process name                              GPU Memory |
|        ID   ID                                                               Usage      |
|=========================================================================================|
{processes}+-----------------------------------------------------------------------------------------+
"""


NVIDIA_SMI = nvidia_smi()


def public_source(width=768, layers=12, tag="record"):
    """A stand-in for a public trainer's source: what the tools read from it is the model's shape and the
    data it reads; the tag makes one version of the code differ from another."""
    return (f"# {tag}\nimport os\nimport torch\n\ntrain_files = 'data/fineweb10B/fineweb_train_*.bin'\n"
            f"val_files = 'data/fineweb10B/fineweb_val_*.bin'\n"
            f"model = GPT(vocab_size=50304, num_layers={layers}, num_heads=6, model_dim={width})\n"
            f"print('the trainer')")


def public_log(path, last_step=1875, final=None, ms_per_step=160.0, source=None, gpus=8, busy=None,
               train_loss=True, torch_version="2.6.0.dev20241203+cu124"):
    """A log in the public speedrun's format (REFERENCE §6): source, versions and nvidia-smi, steps. From
    2025 its train lines carry no loss (train_loss=False). The last val loss is `final` when given."""
    total = 1875
    lines = [f"step:0/{total} val_loss:10.8258 train_time:0ms step_avg:nanms"]
    for step in range(1, last_step + 1):
        ms = round(ms_per_step * step)
        loss = f" train_loss:{3.3 + 1 / step:.4f}" if train_loss else ""
        lines.append(f"step:{step}/{total}{loss} train_time:{ms}ms step_avg:{ms_per_step:.2f}ms")
        if step % 125 == 0 or step == total:
            val = final if step == total and final is not None else 3.2 + 100 / step
            lines.append(f"step:{step}/{total} val_loss:{val:.4f} train_time:{ms}ms step_avg:{ms_per_step:.2f}ms")
    lines.append("peak memory allocated: 37653 MiB reserved: 39236 MiB")
    source = "import os\nimport torch\n\nprint('the trainer')" if source is None else source
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_log(path, source, [f"Running Python 3.12.7\nRunning pytorch {torch_version}\n"
                                    + nvidia_smi(gpus, busy), "\n".join(lines)])


def cifar_log(path, finished=3):
    header = {"device": "cuda", "argv": ["train_cifar.py", "--runs", "3"], "runs": 3, "seed": 5,
              "data_dir": "data/cifar10", "config": {"epochs": 2, "batch_size": 2000}}
    lines = ["data: 50000 train and 10000 test images from data/cifar10/cifar-10-batches-py"]
    for k in range(1, finished + 1):
        lines += [f"run:{k}/3 epoch:1/2 train_loss:1.5{k} train_acc:0.6{k}",
                  f"run:{k}/3 epoch:2/2 train_loss:1.1{k} train_acc:0.8{k}",
                  f"run:{k}/3 test_acc:0.94{k}0 time:3.{k}00s"]
    return write_log(path, "print('cifar')", ["python 3.11.7  torch 2.13.0\n" + NVIDIA_SMI.replace(
        "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB"), json.dumps(header), "\n".join(lines)])


# ----------------------------------------------------------------------------- parsing

def test_our_gpt_log(tiny_logs):
    log = parse_log(tiny_logs[0])
    (run,) = runs_from_log(log)
    assert run.kind == "gpt" and records.track_of(run) == "cpu"
    assert run.result == log.val[-1].loss and run.steps == 8 and run.seed in (0, 1, 2)
    assert run.time_s == log.val[-1].train_time_ms / 1000
    assert [c[0] for c in run.curve] == [0, 4, 8]
    assert "cores" in log.hardware and log.software.startswith("python ")
    assert run.name == tiny_logs[0].parent.name


def test_public_log(tmp_path):
    (run,) = runs_from_log(parse_log(public_log(tmp_path / "0a1b2c.txt", source=public_source())))
    assert (run.kind, records.track_of(run), run.seed, run.name) == ("gpt", "gpt", None, "0a1b2c")
    assert run.result == pytest.approx(3.2 + 100 / 1875, abs=1e-4)
    assert run.time_s == 300.0 and run.steps == 1875 and len(run.curve) == 1 + 15
    assert run.log.hardware == "8x NVIDIA H100 80GB HBM3" and run.log.torch_version == "2.6.0.dev20241203+cu124"
    assert run.log.source == public_source() and run.log.digest == hashlib.sha256(public_source().encode()).hexdigest()[:8]


def test_public_formats_of_later_years(tmp_path):
    """Train lines without a loss (2025 on); one process on a node of 8 GPUs; the optimization track's
    device line and seconds; a console capture (.log) with step lines but no source."""
    (run,) = runs_from_log(parse_log(public_log(tmp_path / "a.txt", train_loss=False, gpus=8, busy=1,
                                                source=public_source(width=1024, layers=16))))
    assert run.log.hardware == "1x NVIDIA H100 80GB HBM3" and run.log.processes == 1
    assert len(run.log.train) == 1875 and math.isnan(run.log.train[0].loss) and records.track_of(run) == "medium"
    versions = ("Running PyTorch 2.7.0+cu128 compiled for CUDA 12.8\n"
                "Running on device_name=NVIDIA A800-SXM4-80GB with world_size=1")
    steps = ("step:0/3148 val_loss:10.82581 train_time:0.000s step_avg:nanms\n"
             "step:3148/3148 val_loss:3.27951 train_time:3148.500s step_avg:1000.16ms")
    optimization = write_log(tmp_path / "seed1.txt", public_source(), [versions, steps])
    (run,) = runs_from_log(parse_log(optimization))
    assert (run.result, run.time_s, run.log.hardware) == (3.27951, 3148.5, "1x NVIDIA A800-SXM4-80GB")
    assert run.log.torch_version == "2.7.0+cu128"
    capture = tmp_path / "track_1_short" / "2026-01-01_X" / "baseline" / "run1.log"
    capture.parent.mkdir(parents=True)
    capture.write_text("W0331 13:01:01.874000 190183 torch/distributed/run.py:852] Setting OMP_NUM_THREADS\n"
                       "[Gloo] Rank 6 is connected to 7 peer ranks. Expected number of connected peer ranks is : 7\n"
                       "step:0/1490 val_loss:10.8284 train_time:0ms step_avg:0.03ms\n"
                       "step:1490/1490 train_time:85501ms step_avg:57.38ms\n"
                       "step:1490/1490 val_loss:3.2786 train_time:85603ms step_avg:57.45ms\n")
    (run,) = runs_from_log(parse_log(capture))
    assert (run.result, run.time_s, run.log.source, run.log.digest) == (3.2786, 85.603, "", None)
    assert run.log.hardware == "8 processes, device not logged" and run.log.software == "not logged"
    assert records.infer_track(run) == ("gpt", "the folder name track_1_short")


def test_unfinished_logs_name_the_file(tmp_path):
    with pytest.raises(ValueError, match=r"stopped\.txt: the last val_loss is at step 1000 of 1875"):
        runs_from_log(parse_log(public_log(tmp_path / "stopped.txt", last_step=1000)))
    with pytest.raises(ValueError, match=r"cifar\.txt: run 3/3 has no test_acc line"):
        runs_from_log(parse_log(cifar_log(tmp_path / "cifar.txt", finished=2)))
    (tmp_path / "notes.txt").write_text("no separator here\n")
    with pytest.raises(ValueError, match="not a training log"):
        parse_log(tmp_path / "notes.txt")


def test_cifar_log(tmp_path):
    runs = runs_from_log(parse_log(cifar_log(tmp_path / "cifar.txt")))
    assert [r.seed for r in runs] == [5, 6, 7] and [r.index for r in runs] == [1, 2, 3]
    assert [r.result for r in runs] == pytest.approx([94.1, 94.2, 94.3])
    assert [r.time_s for r in runs] == [3.1, 3.2, 3.3] and {r.steps for r in runs} == {2}
    assert runs[1].curve == [(1, None, 1.52), (2, None, 1.12)]
    assert runs[0].log.hardware == "8x NVIDIA A100-SXM4-40GB" and records.track_of(runs[0]) == "cifar"


def test_directories_are_searched_for_logs(tiny_logs, tmp_path):
    shutil.copytree(tiny_logs[0].parent, tmp_path / "a" / tiny_logs[0].parent.name)
    (tmp_path / "a" / "summary.txt").write_text("not a log\n")
    assert [r.name for r in records.load_runs([tmp_path / "a"])] == [tiny_logs[0].parent.name]
    with pytest.raises(records.RecordError, match="missing: no such file"):
        records.load_runs([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(records.RecordError, match="empty: no finished run in any .txt or .log file"):
        records.load_runs([tmp_path / "empty"])


# ----------------------------------------------------------------------------- statistics

def test_t_test_on_known_numbers():
    # Two runs leave 1 degree of freedom, where Student's t is the Cauchy distribution:
    # [0, 2] has mean 1 and standard error 1, so against 2 the statistic is -1 and p = 1/4.
    assert records.significance([0.0, 2.0], 2.0) == pytest.approx((-1.0, 0.25))
    assert records.significance([0.0, 2.0], 0.0, lower_is_better=False) == pytest.approx((1.0, 0.25))
    # With 2 degrees of freedom the CDF is 1/2 + t / (2 sqrt(2 + t^2)): at t = -1, 1/2 - 1/(2 sqrt 3).
    t, p = records.significance([0.0, 1.0, 2.0], 1 + 1 / math.sqrt(3))
    assert t == pytest.approx(-1.0) and p == pytest.approx(0.5 - 1 / (2 * math.sqrt(3)))


def test_t_test_matches_scipy():
    values = list(np.random.default_rng(0).normal(3.275, 0.004, size=7))
    expected = stats.ttest_1samp(values, 3.28, alternative="less")
    assert records.significance(values, 3.28) == pytest.approx((expected.statistic, expected.pvalue))
    accuracies = [94.1, 93.9, 94.3, 94.2, 94.05]
    expected = stats.ttest_1samp(accuracies, 94, alternative="greater")
    assert records.significance(accuracies, 94, False) == pytest.approx((expected.statistic, expected.pvalue))
    assert records.significance([1.5, 1.5], 1.88)[1] == 0.0  # no spread, below target
    assert records.significance([2.0, 2.0], 1.88)[1] == 1.0
    with pytest.raises(records.RecordError, match="at least 2 runs"):
        records.significance([1.8], 1.88)


def test_summarize_and_significance_commands(tiny_logs, capsys):
    assert records.main(["summarize", *map(str, tiny_logs)]) == 0
    out = capsys.readouterr().out
    losses = [runs_from_log(parse_log(p))[0].result for p in tiny_logs]
    assert "mean of 3" in out and f"{np.mean(losses):.4f}" in out and f"{np.std(losses, ddof=1):.4f}" in out
    assert records.main(["significance", *map(str, tiny_logs), "--target", "5"]) == 0
    p = stats.ttest_1samp(losses, 5.0, alternative="less").pvalue
    assert f"p = {p:.3g}" in capsys.readouterr().out


# ----------------------------------------------------------------------------- groups

def public_folder(root, rng=None):
    """A public record folder as the speedrun keeps them: baseline/ and this_pr/ of different code on 8 GPUs,
    this_pr's code again on 1 GPU, a GPT-2 Medium run pair, two console captures (.log), llm.c's main.log, a
    run that did not finish, and a stray binary file."""
    rng = rng or np.random.default_rng(0)
    base, new = public_source(tag="baseline"), public_source(tag="this_pr")
    for i in range(4):
        public_log(root / "baseline" / f"b{i}.txt", final=3.2790 + rng.normal(0, 0.001), source=base, ms_per_step=100)
        public_log(root / "this_pr" / f"p{i}.txt", final=3.2770 + rng.normal(0, 0.001), source=new, ms_per_step=95)
    for i in range(2):
        public_log(root / "this_pr" / f"single{i}.txt", final=3.2770 + rng.normal(0, 0.001), source=new, busy=1,
                   ms_per_step=700)
        public_log(root / "medium" / f"m{i}.txt", final=2.9160 + 0.001 * i, source=public_source(1024, 16),
                   ms_per_step=220)
    for i in range(2):  # console captures: torchrun's output, step lines, no source
        (root / "captures" / f"run{i}.log").parent.mkdir(parents=True, exist_ok=True)
        (root / "captures" / f"run{i}.log").write_text(
            "[Gloo] Rank 3 is connected to 7 peer ranks. Expected number of connected peer ranks is : 7\n"
            "step:0/1490 val_loss:10.8284 train_time:0ms step_avg:0.03ms\n"
            f"step:1490/1490 val_loss:{3.2786 - i / 1000:.4f} train_time:{85600 + i}ms step_avg:57.45ms\n")
    (root / "medium" / "main.log").write_text("".join(f"s:{s} tel:{4 - s / 1e5:.4f}\n" for s in range(0, 60001, 250)))
    public_log(root / "this_pr" / "stopped.txt", last_step=1000, source=new)
    (root / "junk.txt").write_bytes(bytes(range(256)) * 4)
    return root


def test_groups_split_source_hardware_and_track(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = public_folder(tmp_path / "2026-01-01_Record")
    groups = records.group_runs(records.load_runs([root], strict=False))
    names = {g.name: g for g in groups}
    assert sorted(names) == ["2026-01-01_Record/baseline", "2026-01-01_Record/captures", "2026-01-01_Record/medium",
                             "2026-01-01_Record/this_pr [on 1x NVIDIA H100 80GB HBM3]",
                             "2026-01-01_Record/this_pr [on 8x NVIDIA H100 80GB HBM3]"]
    assert sorted(len(g.runs) for g in groups) == [2, 2, 2, 4, 4]
    assert names["2026-01-01_Record/medium"].track == "medium"
    captures = names["2026-01-01_Record/captures"]
    assert captures.hardware == ["8 processes, device not logged"] and captures.results == [3.2786, 3.2776]
    assert captures.about().startswith("source not logged: its folder stands for one version of the code")
    assert {g.track for g in groups} == {"gpt", "medium", None}  # a capture's folder must name its track
    capsys.readouterr()

    assert records.main(["significance", str(root)]) == 0
    out, err = capsys.readouterr()
    blocks = out.split("\n\n")
    assert len(blocks) == 5 and all(b.startswith("== 2026-01-01_Record/") for b in blocks)
    medium = next(b for b in blocks if "medium" in b.splitlines()[0])
    finals = [2.916, 2.917]
    p = stats.ttest_1samp(finals, 2.92, alternative="less").pvalue
    assert "one-sided t-test of mean <= 2.92: t = " in medium and f"p = {p:.3g}" in medium
    assert "track medium (model_dim 1024 in its source)" in medium
    for line in err.splitlines():  # one line for each file that holds no finished run, and nothing else
        assert line.startswith("skipped ")
    assert len(err.splitlines()) == 3
    assert "main.log: llm.c's format ('s:N tel:LOSS' lines)" in err and "junk.txt: " in err
    assert "stopped.txt: the last val_loss is at step 1000 of 1875: the run did not finish" in err


def test_our_runs_group_by_config_too(tiny_logs, tmp_path):
    """Our trainer runs one source with many configs: runs of another config are another group, named apart."""
    other = tmp_path / "logs" / "wider" / "log.txt"
    other.parent.mkdir(parents=True)
    other.write_text(tiny_logs[1].read_text().replace('"model_dim": 32', '"model_dim": 48'))
    for log in tiny_logs:
        shutil.copytree(log.parent, tmp_path / "logs" / log.parent.name)
    groups = records.group_runs(records.load_runs([tmp_path / "logs"]))
    assert sorted(len(g.runs) for g in groups) == [1, 3]
    assert len({g.sources[0].split()[0] for g in groups}) == 1  # one source, two configs
    assert all(g.name.startswith(f"{records.shown(tmp_path / 'logs')} [source ") and " config " in g.name for g in groups)


def test_a_group_of_unknown_track_needs_a_target(tmp_path, capsys):
    public_log(tmp_path / "wide" / "a.txt", source=public_source(width=1280), final=3.1)
    public_log(tmp_path / "wide" / "b.txt", source=public_source(width=1280), final=3.2)
    assert records.main(["significance", str(tmp_path / "wide")]) == 0
    out = capsys.readouterr().out
    assert "track unknown (model_dim 1280 in its source: no track of that width)" in out
    assert out.rstrip().endswith("no t-test: the track is unknown (model_dim 1280 in its source: no track of that "
                                 "width); give --target")
    assert records.main(["significance", str(tmp_path / "wide"), "--target", "3.3"]) == 0
    p = stats.ttest_1samp([3.1, 3.2], 3.3, alternative="less").pvalue
    assert f"p = {p:.3g}" in capsys.readouterr().out
    # the val tokens: the tracks' 10,485,760 however written, and anything else is no track of ours
    for line, track in (("val_tokens = 20 * 524288", "gpt"), ("    val_tokens: int = 10485760 # fixed", "gpt"),
                        ("val_tokens = 5 * 524288", None)):
        (run,) = records.load_runs([public_log(tmp_path / "v.txt", source=f"{line}\n{public_source()}")])
        assert records.track_of(run) == track, line


def test_pooling_takes_a_flag_and_warns(tmp_path, capsys):
    root = public_folder(tmp_path / "r")
    shutil.rmtree(root / "medium")
    shutil.move(root / "captures", root / "this_pr" / "track_1_short")  # a capture's folder names its track
    assert records.main(["significance", str(root), "--pool"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("== pooled: ") and "n = 12" in out and "p = " in out
    warning = next(line for line in err.splitlines() if line.startswith("warning:"))
    assert "pooling 4 groups" in warning and "not logged (" in warning
    assert "differ in source (" in warning and "hardware (" in warning
    assert "hardware (1x NVIDIA H100 80GB HBM3; 8 processes, device not logged; 8x NVIDIA H100 80GB HBM3)" in warning


def test_no_input_gives_a_traceback(tmp_path, capsys, tiny_logs):
    (tmp_path / "empty").mkdir()
    unfinished = tmp_path / "unfinished"
    shutil.copytree(tiny_logs[0].parent, unfinished / "run")
    log = unfinished / "run" / "log.txt"
    log.write_text(log.read_text().rsplit("step:8/8 val_loss", 1)[0])  # killed before its last evaluation
    truncated = tmp_path / "truncated.txt"
    truncated.write_text(public_log(tmp_path / "whole.txt", source=public_source()).read_text()[:30_000])
    (tmp_path / "binary.txt").write_bytes(b"\x00\x01\xff" * 100)
    (tmp_path / "latin1.log").write_bytes("step:1/2 caf\xe9".encode("latin-1"))
    cases = {"empty": "no finished run in any .txt or .log file", "unfinished": "no finished run",
             "truncated.txt": "the run did not finish", "binary.txt": "binary data, not a text log",
             "latin1.log": "byte 12 is not UTF-8", "missing": "no such file or directory"}
    for name, reason in cases.items():
        for command in (["summarize"], ["significance"], ["plot", "-o", str(tmp_path / "x.png")],
                        ["reproduce", "--dry-run"], ["compare", str(tmp_path / name)]):
            assert records.main([*command, str(tmp_path / name)]) == 1
            err = capsys.readouterr().err.splitlines()
            assert err[-1].startswith("error: ") and reason in err[-1], (command, name, err)
            assert not any("Traceback" in line for line in err)


def test_odd_logs_are_read_or_named(tmp_path, capsys, monkeypatch):
    """A diverged run, an unparsable number, a log with Windows line ends, a copy of a log, a folder name that
    merely contains a track's name, and a figure that cannot be written."""
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "odd"
    good = public_log(root / "good.txt", source=public_source(), final=3.27)
    public_log(root / "good2.txt", source=public_source(), final=3.275)
    diverged = public_log(root / "diverged.txt", source=public_source())
    diverged.write_text(diverged.read_text().replace("step:1875/1875 val_loss:3.2533", "step:1875/1875 val_loss:nan"))
    shutil.copyfile(good, root / "copy.txt")
    bad_number = cifar_log(root / "cifar.txt")
    bad_number.write_text(bad_number.read_text().replace("test_acc:0.9420", "test_acc:0.94x0"))
    assert records.main(["summarize", str(root)]) == 0
    out, err = capsys.readouterr()
    assert "n = 2" not in out and "mean of 2" in out
    assert "diverged.txt: the final result is nan: the run diverged" in err
    assert "good.txt: the same bytes as" in err and "cifar.txt: could not convert string to float: '0.94x0'" in err
    windows = tmp_path / "crlf.txt"
    windows.write_bytes(good.read_bytes().replace(b"\n", b"\r\n"))
    (run,) = records.load_runs([windows])
    assert run.log.source == public_source() and run.result == 3.27
    (tmp_path / "my-cifar-notes").mkdir()
    shutil.copyfile(good, tmp_path / "my-cifar-notes" / "x.txt")
    assert records.track_of(records.load_runs([tmp_path / "my-cifar-notes"])[0]) == "gpt"
    assert records.main(["plot", str(root), "-o", str(tmp_path / "no" / "such" / "dir.png")]) == 1
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("error: ") and "dir.png: cannot write the figure: " in last


def test_review_cases_of_compare_pool_and_reproduce(tmp_path, capsys, monkeypatch):
    a, b = two_groups(tmp_path / "hw", (3.279, 0.001), (3.276, 0.001), 100, 90)
    for log in (tmp_path / "hw" / "b").glob("*.txt"):  # B on other GPUs
        log.write_text(log.read_text().replace("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"))
    b = records.one_group(tmp_path / "hw" / "b", False)
    said = []
    assert records.compare(a, b, say=said.append) is False
    assert said[-1] == ("answer: no comparison of speed: A ran on 8x NVIDIA H100 80GB HBM3, B on 8x NVIDIA "
                        "A100-SXM4-80GB")
    mixed = tmp_path / "mixed"
    public_log(mixed / "gpt" / "a.txt", source=public_source())
    (mixed / "cifar").mkdir()
    cifar_log(mixed / "cifar" / "c.txt")
    assert records.main(["significance", str(mixed), "--pool"]) == 1
    assert "GPT and CIFAR runs do not pool" in capsys.readouterr().err
    odd = public_log(tmp_path / "o" / "x.txt", source="from . import helpers\nx = '/abs/fineweb_train_*.bin'\n"
                     + public_source())
    assert records.main(["reproduce", str(odd), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "imports: torch" in out and "/abs/fineweb_train_*.bin" in out
    assert records.main(["reproduce", str(odd), "--runs", "2"]) == 1
    assert "a public log reruns once" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert records.main(["reproduce", str(odd)]) == 1
    assert "no file matches /abs/fineweb_train_*.bin" in capsys.readouterr().err


def test_figures_never_round_onto_the_target(tmp_path, capsys):
    assert records.decimals([2.919956], 2.92) == 5 and f"{2.919956:.5f}" == "2.91996"
    assert records.decimals([3.2799999], 3.28) == 7 and records.decimals([3.2751, 3.2849], 3.28) == 4
    assert records.decimals([94.00004], 94.0) == 5 and records.decimals([2.92], 2.92) == 4
    source = public_source(1024, 16)
    for i, final in enumerate([2.919956, 2.919951]):
        public_log(tmp_path / "m" / f"{i}.txt", source=source, final=final, ms_per_step=400)
    text = (tmp_path / "m" / "0.txt").read_text()
    (tmp_path / "m" / "0.txt").write_text(text.replace("val_loss:2.9200 ", "val_loss:2.919956 "))
    (tmp_path / "m" / "1.txt").write_text(text.replace("val_loss:2.9200 ", "val_loss:2.919951 "))
    assert records.main(["summarize", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "2.9200" not in out and "2.91996" in out and "2.91995" in out
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("run "))
    assert "train time (min)" in header  # 1875 x 400 ms = 12.5 min: the whole column in minutes
    assert "12.50" in next(line for line in lines if line.startswith("0 "))


# ----------------------------------------------------------------------------- compare

def two_groups(root, a, b, time_a, time_b, seed=0):
    rng = np.random.default_rng(seed)
    for name, (mean, std), ms, tag in (("a", a, time_a, "A"), ("b", b, time_b, "B")):
        for i, (loss, t) in enumerate(zip(rng.normal(mean, std, 5), rng.normal(ms, ms * 0.01, 5))):
            public_log(root / name / f"{i}.txt", final=loss, ms_per_step=t, source=public_source(tag=tag))
    return records.one_group(root / "a", False), records.one_group(root / "b", False)


def test_compare_answers_the_reviewers_question(tmp_path):
    a, b = two_groups(tmp_path / "yes", (3.279, 0.001), (3.276, 0.001), 100, 90)
    said = []
    assert records.compare(a, b, say=said.append) is True
    text = "\n".join(said)
    welch = stats.ttest_ind(b.times, a.times, equal_var=False, alternative="less")
    assert f"one-sided p = {welch.pvalue:.3g})" in text
    loss = stats.ttest_ind(b.results, a.results, equal_var=False)
    assert f"two-sided p = {loss.pvalue:.3g})" in text
    target = stats.ttest_1samp(b.results, 3.28, alternative="less")
    assert f"B against the target: mean val loss <= 3.28, one-sided p = {target.pvalue:.3g}" in text
    assert said[-1].startswith("answer: yes. B is faster than A")

    a, b = two_groups(tmp_path / "slower", (3.279, 0.001), (3.276, 0.001), 100, 110)
    said.clear()
    assert records.compare(a, b, say=said.append) is False
    assert said[-1] == "answer: no. B is not faster on average: more runs will not make it so"


def test_compare_says_how_many_runs_would_settle_it(tmp_path):
    a, b = two_groups(tmp_path, (3.279, 0.001), (3.2796, 0.001), 100, 99.5, seed=1)
    said = []
    assert records.compare(a, b, say=said.append) is False
    answer = said[-1]
    assert answer.startswith("answer: not yet. B is faster by ")
    runs = [int(m) for m in re.findall(r"about (\d+) more runs?", answer)]
    assert len(runs) == 2
    # the estimate is the least k for which the measured means and stds would give p < 0.01
    (ma, sa), (mb, sb), n = records.mean_std(a.times), records.mean_std(b.times), len(a.runs)
    def p_time(k):
        return stats.ttest_ind_from_stats(mb, sb, n + k, ma, sa, n + k, equal_var=False, alternative="less").pvalue
    assert p_time(runs[0]) < 0.01 <= p_time(runs[0] - 1)
    (mr, sr) = records.mean_std(b.results)
    def p_loss(k):
        return stats.t.cdf((mr - 3.28) / (sr / math.sqrt(n + k)), n + k - 1)
    assert p_loss(runs[1]) < 0.01 <= p_loss(runs[1] - 1)


def test_compare_command_needs_one_group_a_side(tmp_path, capsys):
    root = public_folder(tmp_path / "r")
    assert records.main(["compare", str(root / "baseline"), str(root / "this_pr")]) == 1
    err = capsys.readouterr().err
    assert "this_pr holds 2 groups" in err and "give one of their folders, or --pool" in err
    (root / "this_pr" / "single0.txt").unlink()
    (root / "this_pr" / "single1.txt").unlink()
    assert records.main(["compare", str(root / "baseline"), str(root / "this_pr")]) == 0
    out = capsys.readouterr().out
    assert "answer: " in out and "r/baseline" in out and "r/this_pr" in out


# ----------------------------------------------------------------------------- plots

def test_plot_compares_two_groups(tiny_logs, tmp_path):
    out = tmp_path / "curves.png"
    assert records.main(["plot", str(tiny_logs[0]), str(tiny_logs[1].parent), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cifar = records.group_runs(records.load_runs([cifar_log(tmp_path / "cifar.txt")]))
    records.plot(cifar, tmp_path / "cifar.png")
    assert (tmp_path / "cifar.png").stat().st_size > 10_000
    with pytest.raises(records.RecordError, match="GPT and CIFAR"):
        records.plot(records.group_runs(records.load_runs([tiny_logs[0]])) + cifar, tmp_path / "x.png")


def test_plot_stays_readable_with_many_runs(tmp_path):
    """40 runs in 3 groups of two tracks: one legend entry per group, thin lines in the group's colour, y framed
    by the curves' second half (not step 0's 10.8), and each track's target line."""
    rng = np.random.default_rng(0)
    for i in range(16):  # each run its own time: two equal logs would be one run
        public_log(tmp_path / "a" / f"{i}.txt", final=3.279 + rng.normal(0, 0.002), source=public_source(tag="a"),
                   ms_per_step=160 + i / 10)
        public_log(tmp_path / "b" / f"{i}.txt", final=3.276 + rng.normal(0, 0.002), source=public_source(tag="b"),
                   ms_per_step=150 + i / 10)
    for i in range(8):
        public_log(tmp_path / "m" / f"{i}.txt", final=2.918 + rng.normal(0, 0.002), source=public_source(1024, 16),
                   ms_per_step=400 + i / 10)
    groups = records.group_runs(records.load_runs([tmp_path]))
    assert sorted(len(g.runs) for g in groups) == [8, 16, 16]
    fig = records.draw(groups)
    by_step, by_time = fig.axes
    (legend,) = fig.legends
    legend = [t.get_text() for t in legend.get_texts()]
    assert len(legend) == 3 + 2 and "target 3.28 (gpt)" in legend and "target 2.92 (medium)" in legend
    runs = [line for line in by_step.get_lines() if len(line.get_xdata()) > 2]
    assert len(runs) == 40 and all(line.get_linewidth() <= 1 for line in runs)
    assert len({line.get_color() for line in runs}) == 3
    low, high = by_step.get_ylim()
    assert low < 2.92 and 3.2 + 100 / 1000 < high < 4  # step 0's 10.83 and step 125's 4.0 are left out
    targets = [line.get_ydata()[0] for line in by_step.get_lines() if len(line.get_xdata()) == 2]
    assert sorted(targets) == [2.92, 3.28]
    assert by_time.get_xlabel().startswith("train time (min")  # the medium runs take 12.5 min
    records.plot(groups, tmp_path / "many.png")
    assert (tmp_path / "many.png").stat().st_size > 30_000


# ----------------------------------------------------------------------------- submit

def test_submit_writes_the_record(tiny_logs, tmp_path, readme):
    directory = records.submit(tiny_logs, "cpu", "TinyTest", "a tiny model, for the test", date="2026-01-02",
                               records=tmp_path / "records", readme=readme, target=5.0)
    assert directory == tmp_path / "records" / "cpu" / "2026-01-02_TinyTest"
    for log in tiny_logs:
        assert (directory / f"{log.parent.name}.txt").read_bytes() == log.read_bytes()
    assert (directory / "curves.png").read_bytes()[:4] == b"\x89PNG"
    runs = records.load_runs([directory])
    mean, std = records.mean_std([r.result for r in runs])
    t, p = records.significance([r.result for r in runs], 5.0)
    text = (directory / "README.md").read_text()
    assert f"**{mean:.4f}**" in text and f"| std | {std:.4f} |" in text and f"p = {p:.3g}" in text
    assert "a tiny model, for the test" in text and "cores" in text
    assert "\npython train_gpt.py --preset cpu-shakespeare '--train_files=" in text and "log_dir" not in text
    assert json.loads((directory / "record.json").read_text())["target"] == 5.0
    table = readme.read_text()
    assert "| # | train time (s) | val loss | runs |" in table
    assert f"| 1 | {np.mean([r.time_s for r in runs]):.2f} | {mean:.4f} | 3 | {runs[0].log.hardware} | a tiny model" in table
    assert "cores" in runs[0].log.hardware  # the CPU's line: times compare only on the same hardware
    assert "[TinyTest](records/cpu/2026-01-02_TinyTest/)" in table
    with pytest.raises(records.RecordError, match="exists already"):
        records.submit(tiny_logs, "cpu", "TinyTest", "again", date="2026-01-02", records=tmp_path / "records",
                       readme=readme, target=5.0)


def test_submit_refuses_mismatched_sources(tiny_logs, tmp_path, readme):
    edited = tmp_path / "edited" / "log.txt"
    edited.parent.mkdir()
    edited.write_text("# one changed line\n" + tiny_logs[1].read_text())
    with pytest.raises(records.RecordError, match="2 different versions of the source code"):
        records.submit([tiny_logs[0], edited, tiny_logs[2]], "cpu", "Mixed", "x", records=tmp_path / "records",
                       readme=readme, target=5.0)
    assert not (tmp_path / "records").exists()


def test_submit_refuses_what_is_no_record(tiny_logs, tmp_path, readme):
    kwargs = dict(records=tmp_path / "records", readme=readme)
    with pytest.raises(records.RecordError, match="miss the target"):
        records.submit(tiny_logs, "cpu", "Short", "x", target=1.0, **kwargs)
    again = tmp_path / "again" / "log.txt"  # the same run under another name
    again.parent.mkdir()
    shutil.copyfile(tiny_logs[0], again)
    with pytest.raises(records.RecordError, match=r"again/log\.txt is a copy of .*: a run counts once"):
        records.submit([*tiny_logs, again], "cpu", "Copied", "x", target=5.0, **kwargs)
    again.write_text(again.read_text() + "\n")  # the same seed in a log that differs
    seed = records.load_runs([again])[0].seed
    with pytest.raises(records.RecordError, match=f"seed {seed} appears in more than one run"):
        records.submit([*tiny_logs, again], "cpu", "Twice", "x", target=5.0, **kwargs)
    with pytest.raises(records.RecordError, match="at least 2 runs"):  # one log, given twice, is one run
        records.submit([tiny_logs[0], tiny_logs[0].parent], "cpu", "Once", "x", target=5.0, **kwargs)
    other = tmp_path / "other" / "log.txt"
    other.parent.mkdir()
    other.write_text(tiny_logs[1].read_text().replace('"model_dim": 32', '"model_dim": 48'))
    with pytest.raises(records.RecordError, match="differ in config.model_dim: a record is one config"):
        records.submit([tiny_logs[0], other], "cpu", "Mixed", "x", target=5.0, **kwargs)
    resumed = tmp_path / "resumed" / "log.txt"
    resumed.parent.mkdir()
    resumed.write_text(tiny_logs[1].read_text().replace('"resume": ""', '"resume": "logs/x/step_000002.pt"'))
    with pytest.raises(records.RecordError, match="resumed continues a checkpoint: a record's runs each train from"):
        records.submit([tiny_logs[0], resumed, tiny_logs[2]], "cpu", "Resumed", "x", target=5.0, **kwargs)
    with pytest.raises(records.RecordError, match="not gpt"):
        records.submit(tiny_logs, "gpt", "Wrong", "x", target=5.0, **kwargs)
    with pytest.raises(records.RecordError, match="letters, digits and dashes"):
        records.submit(tiny_logs, "cpu", "../up", "x", target=5.0, **kwargs)
    assert not (tmp_path / "records").exists()


# ----------------------------------------------------------------------------- reproduce

def test_reproduce_a_tiny_record(tiny_logs, tmp_path, readme):
    directory = records.submit(tiny_logs, "cpu", "Tiny", "tiny", records=tmp_path / "records", readme=readme,
                               target=5.0)
    said = []
    (new,) = records.reproduce(directory, n_runs=1, out=tmp_path / "rerun", say=said.append)
    first = records.load_runs([directory])[0]
    assert new.result == first.result and new.seed == first.seed  # CPU runs are deterministic
    assert new.log.source == first.log.source and new.log.path.is_relative_to(tmp_path / "rerun")
    assert "(identical)" in said[1] and said[2].endswith(": within 2 std of the record")
    assert not any(line.startswith("note:") for line in said)

    for log in directory.glob("*.txt"):  # pretend the record was made elsewhere
        log.write_text(log.read_text().replace("\ncpu: ", "\ncpu: Another CPU, 64 cores, torch threads 64 (was ", 1))
    said.clear()
    records.reproduce(directory, n_runs=1, out=tmp_path / "rerun", say=said.append)
    assert said[-1].startswith("note: this machine") and "Another CPU, 64 cores" in said[-1]


def test_reproduce_restores_every_logged_file(tiny_logs, tmp_path, readme):
    """The rerun imports the kernels.py its log holds, not the checkout's; a file name that would leave
    the temporary folder is refused."""
    directory = records.submit(tiny_logs, "cpu", "Tiny", "tiny", records=tmp_path / "records", readme=readme,
                               target=5.0)
    logs = sorted(directory.glob("*.txt"))
    for log in logs:
        text = log.read_text()
        assert text.count(f"\n{'-' * 100}\nfile: kernels.py\n") == 1
        log.write_text(text.replace("\nfile: kernels.py\n", "\nfile: kernels.py\n# the logged copy\n"))
    (new,) = records.reproduce(directory, n_runs=1, out=tmp_path / "rerun", say=lambda line: None)
    assert source_files(new.log.source, "train_gpt.py")["kernels.py"].startswith("# the logged copy\n")
    for log in logs:
        log.write_text(log.read_text().replace("\nfile: kernels.py\n", "\nfile: ../kernels.py\n"))
    with pytest.raises(records.RecordError, match=r"names a file '\.\./kernels\.py': expected a relative path"):
        records.reproduce(directory, n_runs=1, out=tmp_path / "rerun", say=lambda line: None)


def test_reproduce_a_public_log(tmp_path, capsys):
    """--dry-run writes the logged source and prints the torchrun command with the logged GPU count, the data
    and both torch versions; without enough GPUs it says why and exits non-zero."""
    log = public_log(tmp_path / "r" / "0a1b.txt", source=public_source(), torch_version="2.6.0.dev20241203+cu124")
    assert records.main(["reproduce", str(log), "--dry-run"]) == 0
    out = capsys.readouterr().out
    lines = dict(line.split(":", 1) for line in out.splitlines())
    assert lines["logged"].strip() == "torch 2.6.0.dev20241203+cu124 on 8x NVIDIA H100 80GB HBM3, 8 process(es)"
    assert lines["here"].strip() == f"torch {torch.__version__} with {torch.cuda.device_count()} GPU(s)"
    assert "warning: the log ran on torch 2.6.0.dev20241203+cu124" in out
    assert "data/fineweb10B/fineweb_train_*.bin, data/fineweb10B/fineweb_val_*.bin" in lines["data"]
    source = Path(lines["source"].strip())
    assert source.name == "train_gpt.py" and source.read_text() == public_source() + "\n"
    command = shlex.split(lines["command"].split("&&")[1])
    assert command == ["torchrun", "--standalone", "--nproc_per_node=8", str(source)]
    assert shlex.split(lines["command"].split("&&")[0]) == ["cd", str(records.ROOT)]

    single = public_log(tmp_path / "s" / "medium.txt", source=public_source(1024, 16), busy=1,
                        torch_version=torch.__version__)
    assert records.main(["reproduce", str(single), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "--nproc_per_node=1 " in out and "train_gpt_medium.py" in out and "warning" not in out

    # the packages a trainer imports, and which of them the rerun could not import, this repository's
    # kernels.py included: the public trainers' `kernels` is another package
    needy = public_log(tmp_path / "n" / "x.txt", source="import numpy\nfrom kernels import get_kernel\n"
                       "import no_such_module_here.sub\n" + public_source())
    assert records.main(["reproduce", str(needy), "--dry-run"]) == 0
    imports = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("imports:"))
    assert imports == "imports: kernels, no_such_module_here, numpy, torch; not installed here: kernels, no_such_module_here"

    capture = tmp_path / "c" / "run.log"
    capture.parent.mkdir()
    capture.write_text("step:0/10 val_loss:10.8 train_time:0ms step_avg:nanms\n"
                       "step:10/10 val_loss:3.27 train_time:1000ms step_avg:100.00ms\n")
    assert records.main(["reproduce", str(capture), "--dry-run"]) == 1
    assert "holds no source (a console capture): there is nothing to rerun" in capsys.readouterr().err

    if torch.cuda.device_count() < 8:
        assert records.main(["reproduce", str(log)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: the log ran 8 process(es) on 8x NVIDIA H100 80GB HBM3; this machine has "
                              f"{torch.cuda.device_count()} GPU(s)")
    assert records.main(["reproduce", str(tmp_path)]) == 1
    assert "holds 4 groups" in capsys.readouterr().err


def test_reproduce_runs_a_public_log_where_there_are_enough_gpus(tmp_path, capfd, monkeypatch):
    """The rerun itself, by real torchrun: a stand-in trainer that logged 2 busy GPUs reruns as 2 processes, on a
    machine that says it has 2 GPUs."""
    source = ("import os\n# model_dim=768\nprint(f\"rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']} "
              "in {os.getcwd()}\", flush=True)")
    log = public_log(tmp_path / "x.txt", source=source, busy=2)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert records.main(["reproduce", str(log)]) == 0
    out = capfd.readouterr().out
    assert f"rank 0 of 2 in {records.ROOT}" in out and f"rank 1 of 2 in {records.ROOT}" in out
    failing = public_log(tmp_path / "y.txt", source="# model_dim=768\nraise SystemExit(3)", busy=1)
    assert records.main(["reproduce", str(failing)]) == 1
    assert "error: the rerun exited with status" in capfd.readouterr().err


def test_reproduce_dry_run_of_our_record_runs_nothing(tiny_logs, tmp_path, readme, capsys):
    directory = records.submit(tiny_logs, "cpu", "Tiny", "tiny", records=tmp_path / "records", readme=readme,
                               target=5.0)
    said = []
    assert records.reproduce(directory, n_runs=2, out=tmp_path / "rerun", say=said.append, dry_run=True) == []
    assert len(said) == 2 and all(line.startswith("reproducing ") for line in said)
    assert "--preset cpu-shakespeare" in said[0] and not (tmp_path / "rerun").exists()


def test_cifar_rerun_command(tmp_path):
    run = records.load_runs([cifar_log(tmp_path / "cifar.txt")])[1]
    cmd = records.reproduce_command(run, tmp_path / "train_cifar.py", tmp_path / "out")
    assert cmd[1:] == [str(tmp_path / "train_cifar.py"), "--runs", "3", "--runs", "1", "--seed", "6",
                       "--data-dir", "data/cifar10", "--log-dir", str(tmp_path / "out")]
