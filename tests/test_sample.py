"""Sampling: determinism under a seed, the vocabulary bound, decoding, sample.py and the log's sample."""
import dataclasses
import json

import pytest
import torch

import sample
import train_gpt
from conftest import config_args, tiny_config
from tools.logs import SEPARATOR
from sampling import VocabularyError, generate, text_codec
from train_gpt import GPT


def random_model(cfg, seed=0):
    """A tiny model with random weights everywhere (the zero-initialised head would make every token
    equally likely)."""
    torch.manual_seed(seed)
    model = GPT(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return model


@pytest.fixture
def cfg(char_shards, tmp_path):
    return tiny_config(char_shards, tmp_path, vocab_size=80)  # 65 characters, padded to 80


def test_same_seed_same_sample(cfg):
    model = random_model(cfg)
    first = generate(model, [0], 40, vocab=65, seed=1)
    assert first == generate(model, [0], 40, vocab=65, seed=1)
    assert first != generate(model, [0], 40, vocab=65, seed=2)
    assert len(first) == 40


def test_greedy_ignores_the_seed_and_top_1_is_greedy(cfg):
    model = random_model(cfg)
    greedy = generate(model, [3, 4], 30, vocab=65, temperature=0, seed=1)
    assert greedy == generate(model, [3, 4], 30, vocab=65, temperature=0, seed=2)
    assert greedy == generate(model, [3, 4], 30, vocab=65, temperature=1.0, top_k=1, seed=3)


def test_padding_ids_are_never_drawn(cfg):
    """The head is rigged so that ids 65-79 (padding) have by far the largest logits: none is drawn."""
    model = random_model(cfg)
    bonus = torch.cat([torch.zeros(65), torch.full((cfg.vocab_size - 65,), 100.0)])
    model.lm_head.register_forward_hook(lambda module, args, out: out + bonus)  # before the soft-cap
    assert model(torch.tensor([[0, 1, 2]]), flex=False).argmax().item() >= 65
    for temperature, top_k in ((1.0, 0), (2.0, 0), (0.8, 40), (0, 0)):
        ids = generate(model, [0], 50, vocab=65, temperature=temperature, top_k=top_k)
        assert all(0 <= i < 65 for i in ids), (temperature, top_k)


def test_context_longer_than_seq_len_is_cropped(cfg):
    model = random_model(cfg)
    assert len(generate(model, list(range(10)), cfg.seq_len + 10, vocab=65)) == cfg.seq_len + 10


def test_character_codec(cfg, char_shards):
    encode, decode, vocab = text_codec(cfg)
    chars = json.loads((char_shards / "meta.json").read_text())["chars"]
    assert vocab == len(chars) == 65
    assert decode(encode("ROMEO:\nO, she doth teach")) == "ROMEO:\nO, she doth teach"
    with pytest.raises(VocabularyError, match=r"meta\.json: the vocabulary has no '€'"):
        encode("ask €")
    with pytest.raises(VocabularyError, match=r"nowhere/meta\.json: not found"):
        text_codec(dataclasses.replace(cfg, train_files="nowhere/train_*.bin"))


def test_gpt2_codec_offline():
    encode, decode, vocab = text_codec(train_gpt.PRESETS["gpt2-speedrun"])
    assert vocab == 50257 and decode(encode("Hello world")) == "Hello world" and len(encode("Hello world")) == 2


def test_sample_py_continues_a_checkpoint(char_shards, tmp_path, capsys):
    cfg = tiny_config(char_shards, tmp_path, steps=4, save_every=4, cooldown_steps=2)
    assert train_gpt.main(["--preset", "cpu-shakespeare", *config_args(cfg)]) == 0
    (ckpt,) = (tmp_path / "logs").glob("*/step_000004.pt")
    capsys.readouterr()
    outputs = []
    for seed in (5, 5, 6):
        assert sample.main([str(ckpt), "--prompt", "ROMEO:", "--tokens", "30", "--seed", str(seed)]) == 0
        outputs.append(capsys.readouterr().out[:-1])  # print's newline
    assert outputs[0] == outputs[1] != outputs[2]
    chars = set(json.loads((char_shards / "meta.json").read_text())["chars"])
    assert outputs[0].startswith("ROMEO:") and len(outputs[0]) == 6 + 30 and set(outputs[0]) <= chars
    assert sample.main([str(ckpt), "--prompt", "€"]) == 1
    assert "the vocabulary has no '€'" in capsys.readouterr().err


def test_the_log_ends_with_a_sample(char_shards, tmp_path):
    cfg = tiny_config(char_shards, tmp_path, steps=2, cooldown_steps=1, sample_tokens=25)
    assert train_gpt.main(["--preset", "cpu-shakespeare", *config_args(cfg)]) == 0
    (log,) = (tmp_path / "logs").glob("*/log.txt")
    last = log.read_text().rsplit(SEPARATOR + "\n", 1)[1]
    head, text = last.split("\n", 1)
    assert head == "sample: 25 tokens, temperature 0.8, top-k 40, seed 0"
    assert len(text) == 25 + 1  # and the log's final newline
