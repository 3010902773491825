"""Checkpoints: exact resume, atomic writes, clear errors on bad files, divergence, and pre-emption."""
import dataclasses
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch

import train_gpt
from conftest import Crash, config_args, cpu_env, run_trainer, tiny_config, train_lines, trainer_command
from tools.logs import parse_step
from train_gpt import UserError, load_checkpoint


def losses(lines):
    """(step, kind, loss) of each step line: everything but the timings."""
    return [(s.step, s.kind, s.loss) for s in map(parse_step, lines)]


def assert_same_state(a, b):
    for key in ("model", "adam"):
        flat_a, flat_b = [torch.utils._pytree.tree_flatten(ckpt[key])[0] for ckpt in (a, b)]
        assert len(flat_a) == len(flat_b) > 0
        for x, y in zip(flat_a, flat_b):
            assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, key
    assert (a["muon"] is None) == (b["muon"] is None)
    assert (a["muon"] or {}).keys() == (b["muon"] or {}).keys()
    for name in a["muon"] or {}:
        assert len(a["muon"][name]) == len(b["muon"][name]) > 0
        for x, y in zip(a["muon"][name], b["muon"][name]):
            assert torch.equal(x, y), name
    assert a["loader"] == b["loader"] and a["step"] == b["step"]


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_resumed_run_matches_uninterrupted(char_shards, tmp_path, optimizer):
    """Stopped after step 4 (the newest checkpoint is from step 3) and resumed: every later loss, and
    the final weights and optimizer state, equal those of a run that never stopped, to the last bit.
    The steps cross the lr cooldown and Muon's momentum warm-up, so the schedules must resume too."""
    cfg = tiny_config(char_shards, tmp_path, optimizer=optimizer, steps=8, cooldown_steps=4, save_every=3,
                      val_every=2)
    whole = train_lines(cfg, tmp_path / "logs/whole")
    assert sorted(p.name for p in (tmp_path / "logs/whole").glob("*.pt")) == ["step_000008.pt"]

    train_lines(cfg, tmp_path / "logs/stopped", crash_at=5)
    assert sorted(p.name for p in (tmp_path / "logs/stopped").iterdir()) == ["step_000003.pt"]
    resumed = train_lines(dataclasses.replace(cfg, resume="latest"), tmp_path / "logs/resumed")

    assert losses(resumed)[0][0] == 4 and len(resumed) == 5 + 3  # train steps 4-8, val at 4, 6 and 8
    assert losses(resumed) == losses(whole)[len(whole) - len(resumed):]
    assert_same_state(load_checkpoint(tmp_path / "logs/whole/step_000008.pt", cfg),
                      load_checkpoint(tmp_path / "logs/resumed/step_000008.pt", cfg))


def saved_checkpoint(char_shards, tmp_path, **overrides):
    cfg = tiny_config(char_shards, tmp_path, steps=2, cooldown_steps=1, save_every=2, **overrides)
    train_lines(cfg, tmp_path / "logs/run")
    return cfg, tmp_path / "logs/run/step_000002.pt"


def test_a_crash_while_writing_leaves_the_previous_checkpoint(char_shards, tmp_path, monkeypatch):
    """The write of step 4 dies half-way: its temp file is removed, and the step-2 checkpoint is still
    the latest, whole and loadable. A temp file left by a killed process is never taken for one."""
    cfg = tiny_config(char_shards, tmp_path, steps=6, save_every=2)
    real_save = torch.save

    def dying_save(state, f, *args, **kwargs):
        if state["step"] == 4:
            f.write(b"PK\x03\x04 the first bytes of a zip")
            raise Crash
        return real_save(state, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", dying_save)
    train_lines(cfg, tmp_path / "logs/run")
    run = tmp_path / "logs/run"
    assert sorted(p.name for p in run.iterdir()) == ["step_000002.pt"]
    (run / ".step_000004.pt.tmp").write_bytes(b"PK\x03\x04 the first bytes of a zip")  # as after SIGKILL
    (run / "step_000009.pt").symlink_to(run / "gone.pt")  # a dangling link is skipped too
    assert train_gpt.latest_checkpoint(tmp_path / "logs") == run / "step_000002.pt"
    assert load_checkpoint(run / "step_000002.pt", cfg)["step"] == 2


@pytest.mark.parametrize("content, message", [
    ("half", r"not a readable checkpoint: .* \(truncated, or not written by train_gpt\.py\?\)"),
    (b"\x00" * 100, r"not a readable checkpoint"),
    (b"step,loss\n1,4.17\n", r"not a readable checkpoint"),
    ({"model": {}}, r"not a train_gpt\.py checkpoint"),
    ({"format": train_gpt.CHECKPOINT_FORMAT, "config": {}, "code": Crash()}, r"not a readable checkpoint: Weights only load failed"),
])
def test_unreadable_checkpoints_are_refused(char_shards, tmp_path, content, message):
    cfg, good = saved_checkpoint(char_shards, tmp_path)
    bad = tmp_path / "bad.pt"
    if content == "half":
        bad.write_bytes(good.read_bytes()[:good.stat().st_size // 2])
    elif isinstance(content, bytes):
        bad.write_bytes(content)
    else:
        torch.save(content, bad)
    with pytest.raises(UserError, match=r"bad\.pt: " + message):
        load_checkpoint(bad, cfg)


def test_a_bad_checkpoint_is_one_line_on_the_command_line(char_shards, tmp_path, capsys):
    cfg = tiny_config(char_shards, tmp_path, steps=2, cooldown_steps=1)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    assert train_gpt.main(["--preset", "cpu-shakespeare", *config_args(cfg), f"--resume={tmp_path / 'bad.pt'}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "bad.pt: not a readable checkpoint" in err and "Traceback" not in err
    assert train_gpt.main(["--preset", "cpu-shakespeare", *config_args(cfg), "--resume=latest"]) == 1
    assert "latest: no checkpoint in" in capsys.readouterr().err


def test_another_configuration_is_refused(char_shards, tmp_path):
    cfg, path = saved_checkpoint(char_shards, tmp_path)
    with pytest.raises(UserError, match=r"step_000002\.pt was written by another configuration \(2 fields differ: "
                                        r"model_dim=32 there, 64 here; head_dim=16 there, 32 here\)"):
        load_checkpoint(path, dataclasses.replace(cfg, model_dim=64, head_dim=32))
    with pytest.raises(UserError, match=r"another configuration \(\d+ fields differ: .*vocab_size=65 there, 50304 here"):
        load_checkpoint(path, train_gpt.PRESETS["gpt2-speedrun"])
    # what does not change the updates may differ
    load_checkpoint(path, dataclasses.replace(cfg, val_every=7, log_dir="elsewhere", compile=True, save_every=0))


def test_checkpoints_of_older_versions_and_other_evaluation_settings_resume(char_shards, tmp_path):
    """A field the checkpoint's version did not have counts as its default; a run may change how it is
    evaluated and sampled."""
    cfg, path = saved_checkpoint(char_shards, tmp_path)
    old = torch.load(path, weights_only=True)
    for field in ("muon_weight_decay", "muon_rms_match", "sample_tokens", "hellaswag_every", "hellaswag_file"):
        del old["config"][field]
    torch.save(old, tmp_path / "old.pt")
    load_checkpoint(tmp_path / "old.pt", cfg)
    load_checkpoint(path, dataclasses.replace(cfg, sample_tokens=240, hellaswag_every=100, hellaswag_file="h.jsonl"))
    with pytest.raises(UserError, match="1 fields differ: muon_rms_match=False there, True here"):
        load_checkpoint(tmp_path / "old.pt", dataclasses.replace(cfg, muon_rms_match=True))


def test_other_train_shards_are_refused(char_shards, tmp_path):
    cfg, path = saved_checkpoint(char_shards, tmp_path)
    moved = tmp_path / "renamed"
    moved.mkdir()
    (moved / "shard_a.bin").write_bytes((char_shards / "train_000000.bin").read_bytes())
    with pytest.raises(UserError, match=r"the train shards matching .* \(1: shard_a\.bin\) are not the 1 the "
                                        r"checkpoint was trained on \(train_000000\.bin\)"):
        train_lines(dataclasses.replace(cfg, resume=str(path), train_files=str(moved / "*.bin")), tmp_path / "r")


@pytest.mark.parametrize("change, message", [
    (dict(scalar_lr=1e30), r"step (\d+): train loss nan, the run diverged"),  # activations overflow
    (dict(muon_lr=float("inf")), r"step (\d+): the weights or optimizer moments are not finite, the run diverged"),
])
def test_divergence_stops_the_run_and_saves_nothing_bad(char_shards, tmp_path, change, message):
    cfg = tiny_config(char_shards, tmp_path, steps=8, save_every=1, val_every=0, **change)
    run = tmp_path / "logs/run"
    with pytest.raises(UserError, match=message) as e:
        train_lines(cfg, run)
    step = int(e.value.args[0].split(":")[0].split()[1])
    assert 1 <= step < 8
    for path in run.iterdir():  # what was saved is whole, from before the step that failed, and finite
        assert not path.name.startswith(".")
        ckpt = load_checkpoint(path, cfg)
        assert ckpt["step"] < step
        assert all(t.isfinite().all() for t in ckpt["model"].values())


def sigterm_at_step(cfg, k, nproc=1, rank=0):
    """Start a run; once it logs step k, send SIGTERM to the process of `rank` alone (as when one node
    of several is reclaimed). Return the launcher's exit code, stdout and stderr."""
    proc = subprocess.Popen([*trainer_command(nproc), *config_args(cfg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cpu_env())
    for line in proc.stdout:
        if line.startswith(f"step:{k}/"):
            os.kill(proc.pid if nproc == 1 else worker_pid(proc.pid, rank), signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def worker_pid(launcher, rank):
    """The pid of torchrun's worker process with RANK=rank (Linux /proc)."""
    for child in Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split():
        if f"RANK={rank}".encode() in Path(f"/proc/{child}/environ").read_bytes().split(b"\0"):
            return int(child)
    raise AssertionError(f"torchrun has no worker of rank {rank}")


def stopped_at(out, cfg):
    """The step the run stopped after, from its log; checks the checkpoint it names holds that step."""
    stop = next(line for line in out.splitlines() if line.startswith("SIGTERM"))
    step = int(stop.split("after step ")[1].split(";")[0])
    path = stop.split("--resume=")[1]
    assert os.path.basename(path) == f"step_{step:06d}.pt" and load_checkpoint(path, cfg)["step"] == step
    return step


def test_sigterm_saves_a_checkpoint_and_the_run_resumes_from_it(char_shards, tmp_path):
    """Pre-emption: SIGTERM mid-run. The process finishes its step, saves, and exits with 143; the run
    then resumes from --resume=latest to the same losses as a run never stopped."""
    cfg = tiny_config(char_shards, tmp_path, steps=400, cooldown_steps=50, val_every=0, save_every=1000)
    code, out, err = sigterm_at_step(cfg, 10)
    assert code == 128 + signal.SIGTERM, err[-2000:]
    step = stopped_at(out, cfg)
    assert 10 <= step < 400

    resumed = run_trainer(dataclasses.replace(cfg, resume="latest"))
    whole = run_trainer(dataclasses.replace(cfg, log_dir=str(tmp_path / "whole")))
    assert resumed.steps[0].step == step + 1
    tail = [(s.step, s.kind, s.loss) for s in whole.steps if s.step > step]
    assert [(s.step, s.kind, s.loss) for s in resumed.steps] == tail


def test_sigterm_to_one_rank_stops_all_and_two_processes_resume_exactly(char_shards, tmp_path):
    """SIGTERM to rank 1 alone: the ranks agree on the step (the flag rides on the loss all-reduce), rank 0
    gathers rank 1's share of Muon's momentum and saves, and both stop. Resumed on two processes, the run
    then matches an uninterrupted two-process run to the last bit of its final state. Three layers make
    Muon groups of 3 matrices, so rank 1's share is padded."""
    cfg = tiny_config(char_shards, tmp_path, steps=300, cooldown_steps=50, val_every=0, save_every=1000,
                      micro_batch_size=4, n_layer=3)
    code, out, err = sigterm_at_step(cfg, 10, nproc=2, rank=1)
    assert code != 0 and "exitcode  : 143" in err, err[-3000:]  # torchrun reports its workers' exits
    step = stopped_at(out, cfg)
    assert 10 <= step < 300

    resumed = run_trainer(dataclasses.replace(cfg, resume="latest"), nproc=2)
    whole = run_trainer(dataclasses.replace(cfg, log_dir=str(tmp_path / "whole")), nproc=2)
    assert [(s.step, s.loss) for s in resumed.steps] == [(s.step, s.loss) for s in whole.steps if s.step > step]
    (a,), (b,) = [list(log.path.parent.glob("step_000300.pt")) for log in (resumed, whole)]
    assert_same_state(load_checkpoint(a, cfg), load_checkpoint(b, cfg))
