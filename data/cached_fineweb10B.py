"""Download FineWeb-10B already tokenised with GPT-2 BPE: the val shard and the first N train shards.

    python data/cached_fineweb10B.py       # 10 train shards: the 1B tokens the record run reads
    python data/cached_fineweb10B.py 103   # all of it

Each shard holds 100M tokens (~200 MB). Complete shards are skipped, interrupted downloads resume,
and every file's header is checked against its size.
"""
import argparse
import sys
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from train_gpt import UserError, read_header  # noqa: E402

REPO_ID = "kjj0/fineweb10B-gpt2"
HERE = Path(__file__).resolve().parent


def shard_names(n_train):
    return ["fineweb_val_000000.bin"] + [f"fineweb_train_{i:06d}.bin" for i in range(1, n_train + 1)]


def is_complete(path):
    try:
        read_header(path)
        return True
    except UserError:
        return False


def fetch(names, local_dir, download):
    """Download each missing or damaged shard with `download(filename, local_dir)` and check it."""
    local_dir.mkdir(parents=True, exist_ok=True)
    for name in tqdm(names, desc="shards", unit="shard"):
        path = local_dir / name
        if path.exists():
            if is_complete(path):
                continue
            tqdm.write(f"{path}: incomplete or damaged, downloading it again")
            path.unlink()
        download(name, local_dir)
        read_header(path)  # raises with the file and the problem


def hf_download(name, local_dir):
    from huggingface_hub import hf_hub_download
    hf_hub_download(repo_id=REPO_ID, filename=name, repo_type="dataset", local_dir=local_dir)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("n_train", nargs="?", type=int, default=10, help="train shards to fetch (default 10)")
    parser.add_argument("--dir", type=Path, default=HERE / "fineweb10B", help="where the shards go")
    args = parser.parse_args(argv)
    try:
        fetch(shard_names(args.n_train), args.dir, hf_download)
    except UserError as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # network and disk failures, huggingface_hub's included
        sys.exit(f"error: download from {REPO_ID} failed: {e}")
    print(f"{args.n_train + 1} shards ready in {args.dir}")


if __name__ == "__main__":
    main()
