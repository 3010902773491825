"""Download CIFAR-10 (python version), check its md5, unpack it, and check every batch.

    python data/cifar10.py                  # -> data/cifar10/cifar-10-batches-py/
    python data/cifar10.py --dir /scratch/cifar10
    python data/cifar10.py --synthetic 3000 --dir data/cifar10-synthetic   # no download, see below

The archive is only unpacked, and its pickles only read, after its md5 matches; the trainer's
reader also refuses any pickle that would run code.
"""
import argparse
import hashlib
import pickle
import sys
import tarfile
import urllib.request
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from train_cifar import BATCHES_DIR, TEST_BATCH, TRAIN_BATCHES, UserError, load_cifar10  # noqa: E402

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"
HERE = Path(__file__).resolve().parent


def md5sum(path):
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(url, path):
    """Fetch url to path with a progress bar, through a .part file so a failure leaves no archive."""
    part = path.with_name(path.name + ".part")
    with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as f:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=path.name) as bar:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                f.write(chunk)
                bar.update(len(chunk))
    part.rename(path)


def fetch(out_dir, url=URL, md5=MD5):
    """Make out_dir/cifar-10-batches-py complete and readable; download only what is missing."""
    out_dir.mkdir(parents=True, exist_ok=True)
    archive = out_dir / Path(url).name
    if not archive.exists():
        download(url, archive)
    found = md5sum(archive)
    if found != md5:
        raise UserError(f"{archive}: md5 {found}, expected {md5}: a damaged download (delete it and rerun)")
    with tarfile.open(archive) as tar:
        tar.extractall(out_dir, filter="data")
    return load_cifar10(out_dir)


def write_synthetic(root, n_train=(10000,) * 5, n_test=10000, noise=2.5, seed=0, shuffle_labels=False):
    """A stand-in data set in CIFAR-10's exact layout (pickled dicts with bytes keys, uint8 rows of
    3072 channel-major bytes, protocol 2), for smoke tests and timing where the real one cannot be
    downloaded. Class k is a blocky random template plus noise; with shuffle_labels the labels carry
    no information. Returns [(data, labels)] for the train batches and (data, labels) for test."""
    rng = np.random.default_rng(seed)
    templates = rng.normal(size=(10, 3, 8, 8)).repeat(4, axis=2).repeat(4, axis=3)
    folder = Path(root) / BATCHES_DIR
    folder.mkdir(parents=True, exist_ok=True)

    def write(name, n, batch_label):
        labels = rng.integers(0, 10, n)
        x = templates[labels] + noise * rng.normal(size=(n, 3, 32, 32))
        data = np.clip(128 + 25 * x, 0, 255).astype(np.uint8).reshape(n, 3072)
        if shuffle_labels:
            labels = rng.permutation(labels)
        batch = {b"batch_label": batch_label, b"labels": labels.tolist(), b"data": data,
                 b"filenames": [f"{name}_{i}.png".encode() for i in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
        return data, labels

    train = [write(name, n, f"training batch {i} of 5 (synthetic)".encode())
             for i, (name, n) in enumerate(zip(TRAIN_BATCHES, n_train), 1)]
    return train, write(TEST_BATCH, n_test, b"testing batch 1 of 1 (synthetic)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=HERE / "cifar10", help=f"where {BATCHES_DIR}/ goes")
    parser.add_argument("--synthetic", type=int, metavar="N_TRAIN",
                        help="write a synthetic stand-in of N_TRAIN train and N_TRAIN/5 test images instead")
    args = parser.parse_args(argv)
    if args.synthetic:
        write_synthetic(args.dir, n_train=(args.synthetic // 5,) * 5, n_test=args.synthetic // 5)
        print(f"synthetic CIFAR-10 stand-in (not CIFAR-10) in {args.dir / BATCHES_DIR}")
        return
    try:
        train_x, _, test_x, _ = fetch(args.dir)
    except UserError as e:
        sys.exit(f"error: {e}")
    except OSError as e:
        sys.exit(f"error: downloading {URL} failed: {e}")
    print(f"CIFAR-10 ready in {args.dir / BATCHES_DIR}: {len(train_x)} train, {len(test_x)} test images")


if __name__ == "__main__":
    main()
