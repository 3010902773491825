import dataclasses

import pytest
import torch

from train_gpt import GPT, PRESETS, UserError, parse_config, validate


def test_preset_then_overrides():
    preset, cfg = parse_config(["--preset", "gpt2-speedrun", "--steps=100", "--muon_lr", "0.05",
                                "--compile=false", "--train_files=x/*.bin"])
    assert preset == "gpt2-speedrun"
    assert (cfg.steps, cfg.muon_lr, cfg.compile, cfg.train_files) == (100, 0.05, False, "x/*.bin")
    assert dataclasses.replace(cfg, steps=1875, muon_lr=0.04, compile=True,
                               train_files=PRESETS["gpt2-speedrun"].train_files) == PRESETS["gpt2-speedrun"]


def test_a_bare_switch_is_true():
    _, cfg = parse_config(["--preset", "gpt2-speedrun", "--muon_rms_match", "--compile", "false"])
    assert cfg.muon_rms_match is True and cfg.compile is False


def test_presets_differ_only_where_set():
    _, cfg = parse_config(["--preset", "cpu-shakespeare"])
    assert cfg == PRESETS["cpu-shakespeare"] and cfg.vocab_size == 65 and cfg.val_tokens == 0


@pytest.mark.parametrize("argv", [["--steps=ten"], ["--compile=maybe"], ["--no_such_key=1"], ["--preset", "nope"]])
def test_bad_flags_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(argv)
    assert e.value.code == 2 and "error:" in capsys.readouterr().err


def test_batch_must_divide_among_processes():
    cfg = dataclasses.replace(PRESETS["gpt2-speedrun"], batch_size=8, micro_batch_size=2)
    validate(cfg, 4)
    with pytest.raises(UserError, match=r"batch_size 8 is not a multiple of micro_batch_size 2 x 8 processes"):
        validate(cfg, 8)
    with pytest.raises(UserError, match=r"\(try --micro_batch_size=2\)"):
        validate(dataclasses.replace(cfg, micro_batch_size=4), 4)


@pytest.mark.parametrize("change, message", [
    (dict(model_dim=100), "model_dim 100 is not a multiple of head_dim 128"),
    (dict(cooldown_steps=5000), r"cooldown_steps 5000 must lie in \[0, steps=1875\]"),
    (dict(steps=0, cooldown_steps=0), "steps must be at least 1"),
    (dict(dtype="float16"), "dtype must be bfloat16 or float32"),
    (dict(optimizer="sgd"), "optimizer must be muon or adamw, got 'sgd'"),
    (dict(lr_warmup_steps=-1), r"lr_warmup_steps -1 must lie in \[0, steps=1875\]"),
    (dict(save_every=-5), "save_every must be 0 or more, got -5"),
    (dict(optimizer="adamw", muon_rms_match=True), "muon_weight_decay and muon_rms_match apply to Muon"),
    (dict(muon_weight_decay=-0.1), r"muon_weight_decay must be 0 or more, .* got -0.1 at lr 0.04"),
    (dict(muon_weight_decay=30.0), r"muon_lr x muon_weight_decay below 1; got 30.0 at lr 0.04"),
])
def test_inconsistent_settings(change, message):
    with pytest.raises(UserError, match=message):
        validate(dataclasses.replace(PRESETS["gpt2-speedrun"], **change), 1)


@pytest.mark.parametrize("preset, published", [
    ("gpt2-speedrun", 124_439_808), ("gpt2-medium", 354_823_168), ("gpt2-large", 774_030_080),
    ("gpt2-xl", 1_557_611_200)])
def test_preset_sizes_are_gpt2s(preset, published):
    """Each preset, built on the meta device (no memory), has the size of its GPT-2. Ours has no position
    table, biases or norm gains, and pads the vocabulary to 50304: without its untied head it is within
    1% of GPT-2's published count, and the head adds vocab x width."""
    cfg = PRESETS[preset]
    with torch.device("meta"):
        model = GPT(cfg)
    body = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("lm_head."))
    assert abs(body - published) / published < 0.01, (body, published)
    assert model.lm_head.weight.numel() == cfg.vocab_size * cfg.model_dim
    validate(cfg, 8)  # and it runs on 8 GPUs
