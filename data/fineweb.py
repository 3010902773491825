"""Build GPT-2 token shards from raw FineWeb: what cached_fineweb10B.py downloads, made from scratch.

    pip install datasets
    python data/fineweb.py                        # sample-10BT -> data/fineweb10B/, ~1 h on 64 cores
    python data/fineweb.py --sample 100BT --out data/fineweb100B

Each document becomes <|endoftext|> + its GPT-2 BPE tokens (tiktoken), tokenised in parallel and
packed into shards of --shard_size tokens, split across shard boundaries. Shard 0 is val.
"""
import argparse
import multiprocessing as mp
import os
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from train_gpt import write_shard  # noqa: E402

HERE = Path(__file__).resolve().parent
_encoder = None


def _tokenize(text):
    global _encoder
    if _encoder is None:  # one encoder per worker process
        import tiktoken
        _encoder = tiktoken.get_encoding("gpt2")
    eot = _encoder.eot_token
    return np.array([eot] + _encoder.encode_ordinary(text), dtype=np.uint16)


def shard_path(out_dir, prefix, index):
    split = "val" if index == 0 else "train"
    return Path(out_dir) / f"{prefix}_{split}_{index:06d}.bin"


def build_shards(texts, out_dir, prefix="fineweb", shard_size=10**8, workers=None):
    """Tokenise an iterable of documents into shards; return their paths."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    buf, fill, paths = np.empty(shard_size, dtype=np.uint16), 0, []
    progress = tqdm(unit="tok", unit_scale=True, desc=f"{prefix} shard 0")
    with mp.Pool(workers or os.cpu_count()) as pool:
        for tokens in pool.imap(_tokenize, texts, chunksize=16):
            while len(tokens):
                take = min(shard_size - fill, len(tokens))
                buf[fill:fill + take], tokens, fill = tokens[:take], tokens[take:], fill + take
                progress.update(take)
                if fill == shard_size:
                    paths.append(shard_path(out_dir, prefix, len(paths)))
                    write_shard(paths[-1], buf)
                    fill = 0
                    progress.set_description(f"{prefix} shard {len(paths)}")
    if fill:
        paths.append(shard_path(out_dir, prefix, len(paths)))
        write_shard(paths[-1], buf[:fill])
    progress.close()
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", default="10BT", help="FineWeb sample: 10BT, 100BT or 350BT")
    parser.add_argument("--out", type=Path, default=HERE / "fineweb10B")
    parser.add_argument("--shard_size", type=int, default=10**8, help="tokens per shard")
    parser.add_argument("--workers", type=int, default=None, help="tokeniser processes (default: all cores)")
    args = parser.parse_args(argv)
    try:
        from datasets import load_dataset
    except ImportError:
        sys.exit("error: fineweb.py reads the raw dataset with the 'datasets' package: pip install datasets")
    dataset = load_dataset("HuggingFaceFW/fineweb", name=f"sample-{args.sample}", split="train")
    paths = build_shards((row["text"] for row in dataset), args.out, shard_size=args.shard_size,
                         workers=args.workers)
    print(f"{len(paths)} shards in {args.out}")


if __name__ == "__main__":
    main()
