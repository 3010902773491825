"""HellaSwag accuracy of a model, on the 10,042 validation items: scoring and the data.

An item is a context and four endings. The model picks the ending with the lowest mean cross-entropy
per token, given the context: the completion's log-likelihood normalised by its length in tokens, as
llm.c's and nanoGPT's evaluations do (lm-eval-harness's acc_norm divides by bytes instead).
Contexts start with <|endoftext|>, as documents do in training.
The official jsonl is downloaded to data/hellaswag/ the first time, with a progress bar.

This module does not import the trainer: `train_gpt.py --hellaswag_every=K` imports it, and
`python evaluate.py CHECKPOINT` scores a checkpoint.
"""
import json
import os
import urllib.request
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
FILE = Path(__file__).resolve().parent.parent / "data/hellaswag/hellaswag_val.jsonl"


def download(path, url=URL):
    """Fetch url to path through a temp file, so an interrupted download leaves nothing at path.
    OSError when it fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")  # ranks on one node may race: own temp files
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f, \
                tqdm(total=int(response.headers.get("Content-Length") or 0) or None, unit="B", unit_scale=True,
                     desc=f"downloading {path.name}") as bar:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(f"{url}: download failed ({e}); fetch it by hand to {path}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def ensure(path):
    return Path(path) if Path(path).is_file() else download(path)


def load_items(path, limit=0):
    """(context, four endings, label) for each line of a HellaSwag jsonl; ValueError naming the line."""
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                context, endings, label = item["ctx"], list(item["endings"]), int(item["label"])
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: not a HellaSwag item ({type(e).__name__}: {e}); expected the "
                                f"keys ctx, endings and label") from None
            if len(endings) != 4 or not 0 <= label < 4:
                raise ValueError(f"{path}:{n}: {len(endings)} endings and label {label}; expected 4 and 0-3")
            items.append((context, endings, label))
            if len(items) == limit:
                break
    if not items:
        raise ValueError(f"{path}: no items")
    return items


def context_prefix(eot_token):
    """Contexts start as training documents do: with <|endoftext|>, where the data has one."""
    return [eot_token] if eot_token >= 0 else []


def rows(item, encode, prefix):
    """The item's four token rows, context then ending, and where the endings start."""
    context, endings, _ = item
    ctx = prefix + encode(context)
    return [ctx + encode(" " + ending) for ending in endings], len(ctx)


def check_lengths(items, encode, prefix, seq_len):
    """ValueError if an item's longest row does not fit the model's context."""
    longest = max(len(row) for item in items for row in rows(item, encode, prefix)[0])
    if longest - 1 > seq_len:
        raise ValueError(f"a HellaSwag item takes {longest} tokens, more than the model's seq_len {seq_len} + 1")


@torch.no_grad()
def ending_losses(model, items, encode, prefix, batch_items=16, progress=False):
    """(items, 4): each ending's mean cross-entropy per token, given its context."""
    device = next(model.parameters()).device
    out = []
    for start in tqdm(range(0, len(items), batch_items), desc="hellaswag", disable=not progress):
        batch, first = [], []
        for item in items[start:start + batch_items]:
            item_rows, ending_start = rows(item, encode, prefix)
            batch += item_rows
            first += [ending_start] * 4
        T = max(map(len, batch)) - 1
        x = torch.zeros(len(batch), T, dtype=torch.int64)
        y = torch.full((len(batch), T), -100, dtype=torch.int64)  # padding: ignored
        ending = torch.zeros(len(batch), T, dtype=torch.bool)
        for i, (row, f) in enumerate(zip(batch, first)):
            x[i, :len(row) - 1], y[i, :len(row) - 1] = torch.tensor(row[:-1]), torch.tensor(row[1:])
            ending[i, f - 1:len(row) - 1] = True  # the positions whose targets are the ending's tokens
        losses = model(x.to(device), y.to(device), reduction="none", flex=False).view(len(batch), T).cpu()
        out.append(((losses * ending).sum(1) / ending.sum(1)).view(-1, 4))
    return torch.cat(out)


def predict(model, items, encode, prefix, batch_items=16, progress=False):
    """The ending each item's context leads the model to (0-3; the first of equals)."""
    return ending_losses(model, items, encode, prefix, batch_items, progress).argmin(1).tolist()


def accuracy(model, items, encode, prefix, rank=0, world_size=1, batch_items=16, progress=False):
    """The share of items answered right; ranks split the items and add up their counts."""
    mine = items[rank::world_size]
    picks = predict(model, mine, encode, prefix, batch_items, progress)
    correct = torch.tensor(float(sum(p == label for p, (_, _, label) in zip(picks, mine))),
                           device=next(model.parameters()).device)
    if world_size > 1:
        dist.all_reduce(correct)
    return correct.item() / len(items)
