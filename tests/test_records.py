import json
import math
import shutil

import numpy as np
import pytest
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


NVIDIA_SMI = """+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 550.54.15              Driver Version: 550.54.15      CUDA Version: 12.4     |
|-----------------------------------------+------------------------+----------------------+
| GPU  Name                 Persistence-M | Bus-Id          Disp.A | Volatile Uncorr. ECC |
|=========================================+========================+======================|
""" + "".join(f"""|   {i}  NVIDIA H100 80GB HBM3          On  |   00000000:{i:02X}:00.0 Off |                    0 |
| N/A   35C    P0            119W /  700W |    1234MiB /  81559MiB |      0%      Default |
+-----------------------------------------+------------------------+----------------------+
""" for i in range(8))


def public_log(path, last_step=1875):
    """A log in the public speedrun's format (REFERENCE §6): source, versions and nvidia-smi, steps."""
    lines = ["step:0/1875 val_loss:10.8258 train_time:0ms step_avg:nanms"]
    for step in range(1, last_step + 1):
        lines.append(f"step:{step}/1875 train_loss:{3.3 + 1 / step:.4f} train_time:{160 * step}ms "
                     f"step_avg:{160.0:.2f}ms")
        if step % 125 == 0 or step == 1875:
            lines.append(f"step:{step}/1875 val_loss:{3.2 + 100 / step:.4f} train_time:{160 * step}ms "
                         f"step_avg:{160.0:.2f}ms")
    lines.append("peak memory allocated: 37653 MiB reserved: 39236 MiB")
    source = "import os\nimport torch\n\nprint('the trainer')"
    return write_log(path, source, ["Running Python 3.12.7\nRunning pytorch 2.6.0\n" + NVIDIA_SMI,
                                    "\n".join(lines)])


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
    (run,) = runs_from_log(parse_log(public_log(tmp_path / "0a1b2c.txt")))
    assert (run.kind, records.track_of(run), run.seed, run.name) == ("gpt", "gpt", None, "0a1b2c")
    assert run.result == pytest.approx(3.2 + 100 / 1875, abs=1e-4)
    assert run.time_s == 300.0 and run.steps == 1875 and len(run.curve) == 1 + 15
    assert run.log.hardware == "8x NVIDIA H100 80GB HBM3"
    assert run.log.source == "import os\nimport torch\n\nprint('the trainer')"


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
    with pytest.raises(records.RecordError, match="empty: no training log"):
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


# ----------------------------------------------------------------------------- plots

def test_plot_compares_two_groups(tiny_logs, tmp_path):
    out = tmp_path / "curves.png"
    assert records.main(["plot", str(tiny_logs[0]), str(tiny_logs[1].parent), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cifar = records.load_runs([cifar_log(tmp_path / "cifar.txt")])
    records.plot([("cifar", cifar)], tmp_path / "cifar.png", 94)
    assert (tmp_path / "cifar.png").stat().st_size > 10_000
    with pytest.raises(records.RecordError, match="GPT and CIFAR"):
        records.plot([("a", records.load_runs([tiny_logs[0]])), ("b", cifar)], tmp_path / "x.png")


# ----------------------------------------------------------------------------- submit

def test_submit_writes_the_record(tiny_logs, tmp_path, readme):
    directory = records.submit(tiny_logs, "cpu", "TinyTest", "a tiny model, for the test", date="2026-01-02",
                               records=tmp_path / "records", readme=readme, target=5.0)
    assert directory == tmp_path / "records" / "cpu" / "2026-01-02_TinyTest"
    for log in tiny_logs:
        assert (directory / f"{log.parent.name}.txt").read_bytes() == log.read_bytes()
    assert (directory / "curves.png").read_bytes()[:4] == b"\x89PNG"
    runs = records.load_runs([directory])
    mean, std = records.describe([r.result for r in runs])
    t, p = records.significance([r.result for r in runs], 5.0)
    text = (directory / "README.md").read_text()
    assert f"**{mean:.4f}**" in text and f"| std | {std:.4f} |" in text and f"p = {p:.3g}" in text
    assert "a tiny model, for the test" in text and "cores" in text
    assert "\npython train_gpt.py --preset cpu-shakespeare '--train_files=" in text and "log_dir" not in text
    assert json.loads((directory / "record.json").read_text())["target"] == 5.0
    table = readme.read_text()
    assert f"| 1 | {records.format_time(np.mean([r.time_s for r in runs]))} | {mean:.4f} | 3 | a tiny model" in table
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

    log = directory / f"{first.name}.txt"  # pretend the record was made elsewhere
    log.write_text(log.read_text().replace("cpu: ", "cpu: Another CPU, 64 cores, torch threads 64 (was ", 1))
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


def test_cifar_rerun_command(tmp_path):
    run = records.load_runs([cifar_log(tmp_path / "cifar.txt")])[1]
    cmd = records.reproduce_command(run, tmp_path / "train_cifar.py", tmp_path / "out")
    assert cmd[1:] == [str(tmp_path / "train_cifar.py"), "--runs", "3", "--runs", "1", "--seed", "6",
                       "--data-dir", "data/cifar10", "--log-dir", str(tmp_path / "out")]
