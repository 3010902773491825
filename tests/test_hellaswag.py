"""HellaSwag scoring on tiny files in the official schema, with models whose answers are known."""
import dataclasses
import json

import pytest
import tiktoken
import torch

import evaluate
import train_gpt
from conftest import config_args, tiny_config
from evals import hellaswag
from tools.logs import parse_log

ENC = tiktoken.get_encoding("gpt2")
ITEMS = [  # (context, endings, label); one " violin" per item, in ending 2
    ("A man is sitting on a roof. He", ["starts pulling up roofing.", "is ripping level tiles.",
                                        "holds a violin to his ear.", "is using a pry bar."], 2),
    ("A woman is outside with a bucket and a dog. The dog", ["runs around trying to avoid a bath.",
                                                            "gets into the bath tub.", "sees a violin.",
                                                            "barks."], 0),
    ("Two girls are doing a dance routine. They", ["bow at the end.", "spin in a circle twice.",
                                                   "dress as a violin and jump.", "walk off the stage."], 2),
    ("A chef slices onions on a board. Then he", ["puts them in a pan.", "cries a little.",
                                                  "feeds the violin outside.", "washes the knife."], 1),
]


def write_jsonl(path, items):
    """The official schema: the scorer reads ctx, endings and label; the other keys come along."""
    with open(path, "w") as f:
        for i, (context, endings, label) in enumerate(items):
            ctx_a, _, ctx_b = context.rpartition(". ")
            f.write(json.dumps({"ind": i, "activity_label": "Test", "ctx_a": ctx_a + ".", "ctx_b": ctx_b,
                                "ctx": context, "split": "val", "split_type": "indomain", "label": label,
                                "endings": endings, "source_id": f"test~{i}"}) + "\n")
    return path


class FavourModel(torch.nn.Module):
    """Every target costs 1 nat, except `token`, which costs 0: an ending's mean is below 1 only if it
    holds the token."""

    def __init__(self, token, seq_len=64):
        super().__init__()
        self.token, self.cfg = token, dataclasses.replace(train_gpt.Config(), seq_len=seq_len)
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # the scorer reads the device from a parameter

    def forward(self, x, y, reduction="none", flex=None):
        return torch.where(y == self.token, 0.0, 1.0).masked_fill(y == -100, 0.0).view(-1)


def test_loads_the_official_schema(tmp_path):
    path = write_jsonl(tmp_path / "val.jsonl", ITEMS)
    assert hellaswag.load_items(path) == [(c, e, label) for c, e, label in ITEMS]
    assert len(hellaswag.load_items(path, limit=2)) == 2


@pytest.mark.parametrize("line, message", [
    ("{not json", r"bad\.jsonl:2: not a HellaSwag item \(JSONDecodeError"),
    (json.dumps({"ctx": "x", "label": 0}), r"bad\.jsonl:2: not a HellaSwag item \(KeyError: 'endings'\)"),
    (json.dumps({"ctx": "x", "endings": ["a", "b"], "label": 0}), r"bad\.jsonl:2: 2 endings and label 0"),
])
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", ITEMS[:1])
    with open(path, "a") as f:
        f.write(line + "\n")
    with pytest.raises(ValueError, match=message):
        hellaswag.load_items(path)


def test_a_model_that_favours_a_word_picks_its_ending():
    violin = ENC.encode_ordinary(" violin")
    assert len(violin) == 1
    picks = hellaswag.predict(FavourModel(violin[0]), ITEMS, ENC.encode_ordinary, [50256])
    assert picks == [2, 2, 2, 2]
    assert hellaswag.accuracy(FavourModel(violin[0]), ITEMS, ENC.encode_ordinary, [50256]) == 0.5


def test_the_score_is_normalised_by_length():
    """Every token costs the same: by total log-likelihood the shortest ending would win; by the mean
    all four tie, and the first is picked."""
    items = [("The cat", ["sat on the warm mat by the door.", "slept.", "ran up a very tall tree.", "ate."], 0)]
    assert hellaswag.predict(FavourModel(-1), items, ENC.encode_ordinary, [50256]) == [0]


def test_a_constant_model_scores_the_share_of_label_0():
    """Every token costs the same: all endings tie, the first is picked, and the accuracy is the share
    of items whose answer is ending 0."""
    assert hellaswag.predict(FavourModel(-1), ITEMS, ENC.encode_ordinary, [50256]) == [0, 0, 0, 0]
    assert hellaswag.accuracy(FavourModel(-1), ITEMS, ENC.encode_ordinary, [50256]) == 0.25


def test_scores_are_each_endings_mean_loss_after_its_context(char_shards, tmp_path):
    """Against a reference built token by token, without batches, padding or masks: for each ending
    token, the model's loss on it given <|endoftext|>, the context, " " and the ending so far."""
    cfg = tiny_config(char_shards, tmp_path, vocab_size=50304, eot_token=50256, seq_len=64)
    torch.manual_seed(0)
    model = train_gpt.GPT(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    scores = hellaswag.ending_losses(model, ITEMS[:2], ENC.encode_ordinary, [50256], batch_items=2)
    for i, (context, endings, _) in enumerate(ITEMS[:2]):
        for j, ending in enumerate(endings):
            ctx, end = [50256] + ENC.encode_ordinary(context), ENC.encode_ordinary(" " + ending)
            losses = []
            for k, token in enumerate(end):
                logits = model(torch.tensor([ctx + end[:k]]), flex=False)[0]
                losses.append(-torch.log_softmax(logits, -1)[token])
            assert scores[i, j].item() == pytest.approx(torch.stack(losses).mean().item(), rel=1e-4), (i, j)


def test_batches_and_padding_do_not_change_the_picks(char_shards, tmp_path):
    cfg = tiny_config(char_shards, tmp_path, vocab_size=50304, eot_token=50256, seq_len=64)
    torch.manual_seed(0)
    model = train_gpt.GPT(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    one = hellaswag.predict(model, ITEMS, ENC.encode_ordinary, [50256], batch_items=1)
    assert one == hellaswag.predict(model, ITEMS, ENC.encode_ordinary, [50256], batch_items=3)
    assert len(set(one)) > 1  # not a constant model


def test_download_goes_through_a_temp_file(tmp_path):
    source = write_jsonl(tmp_path / "source.jsonl", ITEMS)
    target = tmp_path / "data" / "hellaswag_val.jsonl"
    hellaswag.download(target, url=source.as_uri())
    assert target.read_bytes() == source.read_bytes() and sorted(p.name for p in target.parent.iterdir()) == [target.name]
    with pytest.raises(OSError, match="download failed"):
        hellaswag.download(tmp_path / "data" / "other.jsonl", url=(tmp_path / "missing.jsonl").as_uri())
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]


def test_the_trainer_logs_hellaswag_accuracy(tmp_path, shakespeare_text, capsys):
    """A GPT-2-vocabulary run on tiny Shakespeare's BPE shards logs the accuracy at steps 0, 2 and 4.
    The command line, on the final checkpoint, gives the accuracy logged at the last step."""
    import tinyshakespeare
    tinyshakespeare.write_gpt2(shakespeare_text, tmp_path / "bpe")
    cfg = dataclasses.replace(tiny_config(tmp_path, tmp_path, steps=4, cooldown_steps=2, val_every=0),
                              train_files=str(tmp_path / "bpe/train_*.bin"), val_files=str(tmp_path / "bpe/val_*.bin"),
                              vocab_size=50304, eot_token=50256, seq_len=64, window=64, val_tokens=1024,
                              hellaswag_every=2, hellaswag_file=str(write_jsonl(tmp_path / "h.jsonl", ITEMS)),
                              save_every=4)
    assert train_gpt.main(["--preset", "gpt2-speedrun", *config_args(cfg)]) == 0
    (log,) = (tmp_path / "logs").glob("*/log.txt")
    lines = [line for line in log.read_text().splitlines() if "hellaswag_acc:" in line]
    assert [line.split()[0] for line in lines] == ["step:0/4", "step:2/4", "step:4/4"]
    assert parse_log(log).val[-1].step == 4  # the val lines still parse
    capsys.readouterr()
    assert evaluate.main([str(log.parent / "step_000004.pt"), "--file", cfg.hellaswag_file]) == 0
    assert capsys.readouterr().out.startswith(f"hellaswag acc_norm: {lines[-1].split()[1].split(':')[1]} (")


def test_refused_for_a_character_model(char_shards, tmp_path):
    with pytest.raises(train_gpt.UserError, match="needs a GPT-2 vocabulary, not vocab_size 65"):
        train_gpt.validate(tiny_config(char_shards, tmp_path, hellaswag_every=10), 1)
