"""tools/benchmark.py and tools/perf.py: the FLOPs formula against PyTorch's FLOP counter, the peaks, the
printed figures of both trainers' benchmarks, profiling."""
import json
import re
from dataclasses import replace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import train_gpt
from conftest import tiny_config
from tools import benchmark, perf
from tools.logs import parse_log, source_files
from tools.perf import attended_keys, flops_per_token
from train_gpt import GPT


@pytest.mark.parametrize("seq_len, window", [(8, 3), (64, 64), (64, 16), (10, 100)])
def test_attended_keys_is_what_the_mask_allows(seq_len, window):
    """The mean number of keys per query in the model's own mask, on one document."""
    mask = train_gpt.attention_mask(torch.zeros(1, seq_len, dtype=torch.int64), -1, window, flex=False)
    assert attended_keys(seq_len, window) == pytest.approx(mask.sum().item() / seq_len)


@pytest.mark.parametrize("name, tflops", [("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756),
                                          ("NVIDIA H200", 989), ("NVIDIA A100-SXM4-80GB", 312)])
def test_gpu_peaks(monkeypatch, name, tflops):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    peak, text = perf.peak_flops(torch.device("cuda", 0), "bfloat16")
    assert peak == tflops * 1e12 and text == f"{name}, {tflops} TFLOP/s dense bf16"
    assert perf.peak_flops(torch.device("cuda", 0), "float16")[0] == tflops * 1e12
    assert perf.peak_flops(torch.device("cuda", 0), "float32")[0] is None  # not the tensor-core peak


@pytest.mark.parametrize("n_layer, model_dim, mlp_ratio", [(2, 32, 4), (3, 48, 2)])
def test_flops_formula_matches_the_flop_counter(char_shards, tmp_path, n_layer, model_dim, mlp_ratio):
    """PyTorch counts the matrix products of a forward and backward pass. On CPU, attention is a dense
    product over all seq_len keys (the mask zeroes scores, it does not skip them), so the formula,
    given keys=seq_len, must give exactly the counted FLOPs."""
    cfg = tiny_config(char_shards, tmp_path, n_layer=n_layer, model_dim=model_dim, head_dim=16,
                      mlp_ratio=mlp_ratio, vocab_size=80, seq_len=32, window=32)
    model = GPT(cfg)
    x, y = torch.randint(0, 65, (2, 4, 32))
    with FlopCounterMode(display=False) as counter:
        model(x, y, horizons=2).sum().backward()  # training: the multi-token head too
    assert cfg.mtp_weight and counter.get_total_flops() == pytest.approx(
        flops_per_token(cfg, keys=cfg.seq_len) * x.numel(), rel=1e-12)
    with FlopCounterMode(display=False) as counter:
        model(x, y).backward()
    assert counter.get_total_flops() == flops_per_token(replace(cfg, mtp_weight=0), keys=cfg.seq_len) * x.numel()


def within_rounding(mfu, flops, rate, peak, flops_digit=0.0):
    """Whether a printed MFU (%, one decimal) is flops x rate / peak, given that the printed rate is rounded
    to a whole number, the peak to a whole GFLOP/s, and the FLOPs by flops_digit."""
    low = 100 * (flops - flops_digit) * (rate - 0.5) / (peak + 0.5e9) - 0.05
    high = 100 * (flops + flops_digit) * (rate + 0.5) / (peak - 0.5e9) + 0.05
    return low <= mfu <= high


def test_benchmark_prints_its_figures(char_shards, tmp_path):
    cfg = tiny_config(char_shards, tmp_path, warmup_steps=1)
    lines = []
    assert benchmark.gpt(cfg, lines.append, run_dir=tmp_path, steps=3, profile=True) > 0
    text = "\n".join(lines)
    tokens = float(re.search(r"^tokens/s per process: ([\d,]+)$", text, re.M).group(1).replace(",", ""))
    gflop = float(re.search(r"^model FLOPs per token: ([\d.]+) GFLOP = 6 x ", text, re.M).group(1))
    assert gflop == pytest.approx(flops_per_token(cfg) / 1e9, abs=1e-4)
    mfu, peak = re.search(r"^MFU: ([\d.]+)% of CPU, \d+ threads x [\d.]+ GHz x (?:32|64|128) (?:fp32|bf16) FLOP/cycle = "
                          r"(\d+) GFLOP/s$", text, re.M).groups()  # the clock is read when the line is made
    assert within_rounding(float(mfu), flops_per_token(cfg), tokens, float(peak) * 1e9)
    share = float(re.search(r"^Muon step: ([\d.]+)% of the step time .*Gram matrices by torch\)$", text, re.M).group(1))
    assert 0 < share < 100
    assert re.search(r"^peak memory: \d+ MiB resident$", text, re.M)
    assert "Self CPU" in text and (tmp_path / "trace.json").is_file()  # the profile's table and trace
    assert json.loads((tmp_path / "trace.json").read_text())["traceEvents"]


def test_benchmark_from_the_command_line_needs_no_data(tmp_path, capsys):
    """The GPT benchmark as users start it, with the usual log header: the sources it ran and the config."""
    assert benchmark.main(["--preset", "cpu-shakespeare", "--compile=false", "--warmup_steps=1", "--timed_steps=2",
                           "--train_files=nowhere/*.bin", f"--log_dir={tmp_path}"]) == 0
    assert "tokens/s per process:" in capsys.readouterr().out
    (log,) = (tmp_path / "benchmark").glob("*/log.txt")
    parsed = parse_log(log)
    assert list(source_files(parsed.source, "train_gpt.py")) == list(benchmark.SOURCES)
    assert parsed.config["config"]["compile"] is False


def test_cifar_benchmark_prints_its_figures(tmp_path, capsys):
    assert benchmark.main(["cifar", "--batch-size=64", "--device=cpu", "--timed-steps=2", f"--log-dir={tmp_path}"]) == 0
    text = capsys.readouterr().out
    images_s = float(re.search(r"^images/s: ([\d,]+)$", text, re.M).group(1).replace(",", ""))
    flops = float(re.search(r"^model FLOPs per image: ([\d.]+) MFLOP", text, re.M).group(1))
    assert 500 < flops < 1000  # a fixed network: about 0.71 GFLOP per image, forward and backward
    mfu, peak = re.search(r"^MFU: ([\d.]+)% of CPU, \d+ threads x [\d.]+ GHz x (?:32|64) fp32 FLOP/cycle = (\d+) GFLOP/s$",
                          text, re.M).groups()
    assert within_rounding(float(mfu), flops * 1e6, images_s, float(peak) * 1e9, flops_digit=0.05e6)
    assert 0 < float(re.search(r"^Muon step: ([\d.]+)% of the step time", text, re.M).group(1)) < 100
    (log,) = tmp_path.glob("*/log.txt")
    assert list(source_files(parse_log(log).source, "train_cifar.py")) == list(benchmark.CIFAR_SOURCES)
    assert parse_log(log).config["config"]["batch_size"] == 64
