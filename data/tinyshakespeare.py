"""Tiny Shakespeare as token shards: first 90% of the text for train, last 10% for val.

The text runs play after play, and a training step reads one contiguous stretch of its shard, so
an in-order train shard would fill each batch with a single scene. The train split's speeches
(blocks separated by blank lines) are therefore shuffled, with a fixed seed; val stays in order.

    python data/tinyshakespeare.py                      # downloads input.txt first
    python data/tinyshakespeare.py --input path/to/input.txt

Writes two tokenisations under data/ (or --out):
    shakespeare_char/{train,val}_000000.bin + meta.json   one token per character (65 of them)
    shakespeare_gpt2/{train,val}_000000.bin               GPT-2 BPE via tiktoken, <|endoftext|> first
"""
import argparse
import json
import random
import sys
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from train_gpt import write_shard  # noqa: E402  (the shard format lives with its reader)

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
HERE = Path(__file__).resolve().parent
GPT2_EOT = 50256


def fetch_text(path):
    """Read input.txt, downloading it to `path` when it is not there yet."""
    path = Path(path)
    if not path.exists():
        print(f"downloading {URL} -> {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".part")
        urllib.request.urlretrieve(URL, tmp)
        tmp.rename(path)
    return path.read_text(encoding="utf-8")


SHUFFLE_SEED = 0


def split(text):
    """(train, val): the first 90% with its speeches shuffled, and the last 10% as it is."""
    n = int(0.9 * len(text))
    speeches = text[:n].split("\n\n")
    random.Random(SHUFFLE_SEED).shuffle(speeches)
    return "\n\n".join(speeches), text[n:]


def write_char(text, out_dir):
    """Character-level shards; meta.json maps token ids back to characters."""
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, part in zip(("train", "val"), split(text)):
        write_shard(out_dir / f"{name}_000000.bin", np.array([index[c] for c in part], dtype=np.uint16))
    (out_dir / "meta.json").write_text(json.dumps({"vocab_size": len(chars), "chars": chars}))
    return len(chars)


def write_gpt2(text, out_dir):
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, part in zip(("train", "val"), split(text)):
        write_shard(out_dir / f"{name}_000000.bin", [GPT2_EOT] + enc.encode_ordinary(part))


def decode_char(tokens, meta_path):
    chars = json.loads(Path(meta_path).read_text())["chars"]
    return "".join(chars[t] for t in tokens)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", default=HERE / "tinyshakespeare" / "input.txt",
                        help="the text; downloaded here when missing")
    parser.add_argument("--out", type=Path, default=HERE, help="directory for the shard folders")
    args = parser.parse_args(argv)
    text = fetch_text(args.input)
    vocab = write_char(text, args.out / "shakespeare_char")
    write_gpt2(text, args.out / "shakespeare_gpt2")
    train, val = split(text)
    print(f"tiny Shakespeare: {len(train):,} train / {len(val):,} val characters, "
          f"{vocab} distinct -> {args.out / 'shakespeare_char'}, {args.out / 'shakespeare_gpt2'}")


if __name__ == "__main__":
    main()
