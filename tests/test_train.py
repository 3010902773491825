import dataclasses
import math
import warnings

import pytest
import torch

import train_gpt
from conftest import ROOT, config_args, run_trainer, tiny_config
from tools.logs import Step, parse_log, parse_step, source_files


def run_lines(cfg):
    """The step lines a training run logs."""
    lines = []
    train_gpt.train(cfg, lines.append)
    return [line for line in lines if parse_step(line)]


def losses(lines):
    return [parse_step(line).loss for line in lines]


def test_cpu_track_learns(char_shards, tmp_path):
    """A short run of a small model takes the whole-val-split loss from ln(65) = 4.17 to below what the
    character frequencies (3.35) or a bigram table (2.48, measured on these shards) achieve."""
    cfg = tiny_config(char_shards, tmp_path, val_tokens=0, steps=60, cooldown_steps=30, val_every=0,
                      n_layer=2, model_dim=64, head_dim=32, seq_len=64, batch_size=16, micro_batch_size=16,
                      muon_lr=0.04, embed_lr=0.3, dtype="bfloat16", muon_momentum_warmup=20)
    val_loss, _ = train_gpt.train(cfg, lambda line: None)
    assert val_loss < 2.4, val_loss


def test_same_seed_same_losses(char_shards, tmp_path):
    cfg = tiny_config(char_shards, tmp_path)
    first, second = run_lines(cfg), run_lines(cfg)
    other = run_lines(tiny_config(char_shards, tmp_path, seed=1))
    assert losses(first) == losses(second)
    assert losses(first) != losses(other)


def test_warmup_leaves_no_trace(char_shards, tmp_path):
    """The untimed warm-up trains on random tokens, then resets weights and optimizer state."""
    cfg = tiny_config(char_shards, tmp_path)
    assert losses(run_lines(dataclasses.replace(cfg, warmup_steps=2))) == losses(run_lines(cfg))


def test_accumulated_gradient_is_the_batch_gradient(char_shards, tmp_path, monkeypatch):
    """Four micro-batches of 2 sequences give the gradient of one batch of 8: the mean, not the sum.
    Compared at the second step: at the first, the zero-initialised head and output projections
    leave every weight but the head with an exactly zero gradient."""
    seen = []
    for opt_class in (train_gpt.Muon, torch.optim.AdamW):
        def record(self, original=opt_class.step):
            seen.append([p.grad.clone() for group in self.param_groups for p in group["params"]])
            return original(self)
        monkeypatch.setattr(opt_class, "step", record)
    runs = []
    for micro in (8, 2):
        seen.clear()
        cfg = tiny_config(char_shards, tmp_path, micro_batch_size=micro, steps=2, cooldown_steps=1, val_every=0)
        train_gpt.train(cfg, lambda line: None)
        runs.append([g for grads in seen[2:] for g in grads])  # the second step, both optimizers
    whole, accumulated = runs
    assert sum(int(g.count_nonzero()) for g in whole) > 1000
    for a, b in zip(whole, accumulated):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_accumulation_matches_two_processes(char_shards, tmp_path):
    """Batch of 8 sequences, 2 per forward pass: 4 accumulation steps on one process, 2 on each of two
    gloo processes. The tokens and every update are the same, so the losses must be too (to the
    log's 4 decimals). Three layers give Muon groups of 3 matrices, so one rank's share is padded."""
    cfg = tiny_config(char_shards, tmp_path, micro_batch_size=2, steps=5, val_every=2, n_layer=3)
    one, two = run_trainer(cfg, 1), run_trainer(cfg, 2)
    assert one.config["world_size"] == 1 and two.config["world_size"] == 2
    assert [s.kind for s in one.steps] == [s.kind for s in two.steps] and len(one.steps) == 5 + 4
    for a, b in zip(one.steps, two.steps):
        assert a.step == b.step
        assert a.loss == pytest.approx(b.loss, abs=2e-4), (a, b)


def test_log_parses_back(char_shards, tmp_path):
    cfg = tiny_config(char_shards, tmp_path, steps=4, val_every=2)
    assert train_gpt.main(["--preset", "cpu-shakespeare", *config_args(cfg)]) == 0
    (path,) = (tmp_path / "logs").glob("*/log.txt")
    assert path.parent.name[:10].count("-") == 2  # logs/<YYYY-MM-DD_HHMMSS>_<id>/
    log = parse_log(path)
    files = source_files(log.source, "train_gpt.py")  # every file the run executed, the trainer first
    assert list(files) == ["train_gpt.py", "kernels.py", "sampling.py"] == list(train_gpt.SOURCES)
    assert all(files[name] == (ROOT / name).read_text().rstrip("\n") for name in files)
    assert log.config["preset"] == "cpu-shakespeare" and log.config["config"]["steps"] == 4
    assert "torch " + torch.__version__ in log.sections[0]
    assert [(s.step, s.kind) for s in log.steps] == [
        (0, "val_loss"), (1, "train_loss"), (2, "train_loss"), (2, "val_loss"),
        (3, "train_loss"), (4, "train_loss"), (4, "val_loss")]
    assert log.val[0].loss == pytest.approx(math.log(65), abs=1e-3)  # zero-initialised head
    assert all(a.train_time_ms <= b.train_time_ms for a, b in zip(log.steps, log.steps[1:]))


def test_public_log_lines_parse():
    line = "step:125/1393 val_loss:4.4043 train_time:14281ms step_avg:124.19ms"
    assert parse_step(line) == Step(125, 1393, "val_loss", 4.4043, 14281, 124.19)
    assert parse_step("step:14/1875 train_loss:6.3346 train_time:602ms step_avg:150.62ms").loss == 6.3346
    assert parse_step("peak memory allocated: 37653 MiB reserved: 39236 MiB") is None


def test_compiled_training(char_shards, tmp_path):
    """The one torch.compile test. The compiled model's forward and backward agree with eager (in
    float32, so the comparison can be tight); and compiled bfloat16 training with deterministic
    algorithms, as main() runs it on CPU, repeats itself to the last bit. Both heads train, as in the
    CPU preset (multi-token prediction)."""
    cfg = tiny_config(char_shards, tmp_path)
    torch.manual_seed(0)
    model = train_gpt.GPT(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    tokens = torch.randint(0, 65, (4, 33))
    eager = model(tokens[:, :-1], tokens[:, 1:], horizons=2)  # the preset's training path: both heads
    eager.sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = torch.compile(model)(tokens[:, :-1], tokens[:, 1:], horizons=2)
        compiled.sum().backward()
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    for g, p in zip(eager_grads, model.parameters()):
        torch.testing.assert_close(p.grad, g, atol=1e-4, rtol=1e-4)

    cfg = tiny_config(char_shards, tmp_path, compile=True, dtype="bfloat16", warmup_steps=1)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            first, second = run_lines(cfg), run_lines(cfg)
    finally:
        torch.use_deterministic_algorithms(was)
    assert losses(first) == losses(second)
