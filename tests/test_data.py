import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import fineweb
import tinyshakespeare
from conftest import ROOT, config_args, cpu_env, tiny_config
from train_gpt import (HEADER_BYTES, PRESETS, SHARD_MAGIC, TrainLoader, UserError, find_shards, load_val_tokens,
                       read_header, read_shard, shards_to_read, write_shard)


def test_shard_round_trip(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 50257, size=10_000)
    write_shard(tmp_path / "s.bin", tokens)
    assert read_header(tmp_path / "s.bin") == len(tokens)
    assert (tmp_path / "s.bin").stat().st_size == HEADER_BYTES + 2 * len(tokens)
    np.testing.assert_array_equal(read_shard(tmp_path / "s.bin", 50304), tokens)


def test_write_shard_rejects_tokens_beyond_uint16(tmp_path):
    with pytest.raises(ValueError, match="uint16"):
        write_shard(tmp_path / "s.bin", [1, 2, 70_000])


def _shard(tmp_path, n=1000, name="s.bin"):
    path = tmp_path / name
    write_shard(path, np.arange(n) % 50)
    return path


def _patch_int(path, index, value):
    data = bytearray(path.read_bytes())
    data[4 * index:4 * index + 4] = np.int32(value).tobytes()
    path.write_bytes(bytes(data))


def test_no_shard_matches(tmp_path):
    with pytest.raises(UserError, match=r"no shard matches '.*nothing_\*\.bin'"):
        find_shards(str(tmp_path / "nothing_*.bin"))


def test_wrong_magic(tmp_path):
    path = _shard(tmp_path)
    _patch_int(path, 0, 12345)
    with pytest.raises(UserError, match=rf"s\.bin: magic number 12345 at byte 0, expected {SHARD_MAGIC}"):
        read_header(path)


def test_wrong_version(tmp_path):
    path = _shard(tmp_path)
    _patch_int(path, 1, 7)
    with pytest.raises(UserError, match=r"s\.bin: shard version 7 at byte 4, expected 1"):
        read_header(path)


def test_count_disagrees_with_size(tmp_path):
    path = _shard(tmp_path, n=1000)
    path.write_bytes(path.read_bytes()[:-10])  # a truncated download
    with pytest.raises(UserError, match=r"header says 1000 tokens \(3024 bytes\) but the file has 3014 bytes"):
        read_header(path)


def test_shorter_than_header(tmp_path):
    (tmp_path / "s.bin").write_bytes(b"\0" * 100)
    with pytest.raises(UserError, match="100 bytes, shorter than the 1024-byte shard header"):
        read_header(tmp_path / "s.bin")


def test_token_outside_vocabulary(tmp_path):
    write_shard(tmp_path / "s.bin", [1, 2, 3, 99, 4])
    with pytest.raises(UserError, match="token 99 at position 3 is outside the vocabulary of 65"):
        read_shard(tmp_path / "s.bin", vocab_size=65)


def test_shard_too_short_for_a_step(char_shards, tmp_path):
    path = _shard(tmp_path, n=200, name="train_000000.bin")
    cfg = tiny_config(char_shards, tmp_path, train_files=str(path))  # one step reads 8 * 32 + 1
    with pytest.raises(UserError, match=r"train_000000\.bin: 200 tokens, but one step reads 257"):
        TrainLoader(cfg, 0, 1, torch.device("cpu"))


def test_bad_data_is_one_line_without_traceback(char_shards, tmp_path):
    """What a user sees: the trainer exits non-zero with one line naming the file and the problem."""
    path = _shard(tmp_path, name="train_000000.bin")
    _patch_int(path, 0, 4)
    cfg = tiny_config(char_shards, tmp_path, train_files=str(path))
    result = subprocess.run([sys.executable, str(ROOT / "train_gpt.py"), *config_args(cfg)],
                            capture_output=True, text=True, env=cpu_env(), timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"error: {path}: magic number 4 at byte 0, "
                                                  f"expected {SHARD_MAGIC}: not a token shard"]
    assert "Traceback" not in result.stdout + result.stderr


def test_token_stream_is_the_same_for_any_world_size(char_shards, tmp_path):
    """Every step's micro-batches, gathered over ranks, are the same set for 1, 2 and 4 processes."""
    cfg = tiny_config(char_shards, tmp_path, batch_size=8, micro_batch_size=2)
    streams = {}
    for world in (1, 2, 4):
        loaders = [TrainLoader(cfg, rank, world, torch.device("cpu")) for rank in range(world)]
        steps = []
        for _ in range(3):
            seqs = [x for loader in loaders for x, _ in loader.next_batches()]
            steps.append(sorted(map(tuple, torch.cat(seqs).tolist())))
        streams[world] = steps
    assert streams[1] == streams[2] == streams[4]
    assert streams[1][0] != streams[1][1]


def test_train_loader_moves_through_shards_in_order(tmp_path, char_shards):
    for i in range(2):
        write_shard(tmp_path / f"train_{i:06d}.bin", np.full(600, i))
    cfg = tiny_config(char_shards, tmp_path, train_files=str(tmp_path / "train_*.bin"))
    loader = TrainLoader(cfg, 0, 1, torch.device("cpu"))  # 600 tokens: two steps of 257 per shard
    firsts = [loader.next_batches()[0][0][0, 0].item() for _ in range(5)]
    assert firsts == [0, 0, 1, 1, 0]


@pytest.mark.parametrize("steps", [7, 8, 9])
def test_shards_to_read_is_what_the_loader_reads(tmp_path, char_shards, steps):
    """With shards_to_read(cfg) shards the loader reaches the last step without wrapping to the first
    shard; one shard fewer, it wraps. Shards of 1000 tokens hold 3 steps of 257 (the tail is skipped)."""
    cfg = tiny_config(char_shards, tmp_path, steps=steps, train_files=str(tmp_path / "train_*.bin"))
    n = shards_to_read(cfg, shard_tokens=1000)
    assert n == -(-steps // 3)
    for shards, wraps in ((n, False), (n - 1, True)):
        for old in tmp_path.glob("train_*.bin"):
            old.unlink()
        for i in range(shards):
            write_shard(tmp_path / f"train_{i:06d}.bin", np.full(1000, i))
        loader = TrainLoader(cfg, 0, 1, torch.device("cpu"))
        visited = []
        for _ in range(steps):
            loader.next_batches()
            visited.append(loader.shard)
        assert (visited != sorted(visited)) == wraps, visited


def test_fineweb_presets_fit_in_fineweb10b():
    """FineWeb-10B has 103 train shards of 100M tokens: every GPT preset reads them without wrapping."""
    assert {name: shards_to_read(cfg) for name, cfg in PRESETS.items() if "fineweb" in cfg.train_files} == {
        "gpt2-speedrun": 10, "gpt2-medium": 27, "gpt2-large": 85, "gpt2-xl": 100}


def test_val_tokens_are_the_first_of_the_split(tmp_path, char_shards):
    write_shard(tmp_path / "val_000000.bin", np.arange(60))
    write_shard(tmp_path / "val_000001.bin", np.arange(60, 64))
    cfg = tiny_config(char_shards, tmp_path, val_files=str(tmp_path / "val_*.bin"), val_tokens=0)
    assert load_val_tokens(cfg).tolist() == list(range(64))
    cfg = tiny_config(char_shards, tmp_path, val_files=str(tmp_path / "val_*.bin"), val_tokens=10)
    assert load_val_tokens(cfg).tolist() == list(range(11))
    cfg = tiny_config(char_shards, tmp_path, val_files=str(tmp_path / "val_*.bin"), val_tokens=64)
    with pytest.raises(UserError, match="hold 64 tokens; val_tokens=64 needs 65"):
        load_val_tokens(cfg)


def test_tinyshakespeare_char_shards(shakespeare_text, char_shards):
    meta = json.loads((char_shards / "meta.json").read_text())
    assert meta["vocab_size"] == len(meta["chars"]) == 65
    train = read_shard(char_shards / "train_000000.bin", 65)
    val = read_shard(char_shards / "val_000000.bin", 65)
    n = int(0.9 * len(shakespeare_text))
    assert (len(train), len(val)) == (n, len(shakespeare_text) - n)
    assert tinyshakespeare.decode_char(val, char_shards / "meta.json") == shakespeare_text[n:]


def test_tinyshakespeare_train_split_is_its_speeches_shuffled(shakespeare_text, char_shards):
    """The first 90%, speech for speech, in a fixed shuffled order (so batches mix plays)."""
    train = tinyshakespeare.decode_char(read_shard(char_shards / "train_000000.bin", 65), char_shards / "meta.json")
    original = shakespeare_text[:int(0.9 * len(shakespeare_text))]
    assert train != original
    assert sorted(train.split("\n\n")) == sorted(original.split("\n\n"))
    assert tinyshakespeare.split(shakespeare_text)[0] == train  # the same order every time


def test_tinyshakespeare_gpt2_shards(shakespeare_text, tmp_path):
    import tiktoken
    tinyshakespeare.write_gpt2(shakespeare_text, tmp_path)
    enc = tiktoken.get_encoding("gpt2")
    val = read_shard(tmp_path / "val_000000.bin", 50304)
    assert val[0] == enc.eot_token
    assert enc.decode(val[1:].tolist()) == shakespeare_text[int(0.9 * len(shakespeare_text)):]


def test_fineweb_build_shards(shakespeare_text, tmp_path):
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    docs = [d for d in shakespeare_text[:20_000].split("\n\n") if d]
    paths = fineweb.build_shards(iter(docs), tmp_path, shard_size=1000, workers=2)
    names = [p.name for p in paths]
    assert names[0] == "fineweb_val_000000.bin" and names[1] == "fineweb_train_000001.bin"
    assert all(read_header(p) == 1000 for p in paths[:-1]) and 0 < read_header(paths[-1]) <= 1000
    tokens = np.concatenate([read_shard(p, 50304) for p in paths]).tolist()
    expected = [t for d in docs for t in [enc.eot_token] + enc.encode_ordinary(d)]
    assert tokens == expected
