"""Ablation: the cpu-shakespeare preset trained on the train split in its original order.

    python benchmarks/ablation_in_order.py [--input data/tinyshakespeare/input.txt] [--out DIR]

data/tinyshakespeare.py shuffles the train split's speeches; this writes the same 90% of the text
unshuffled (same characters, same ids), trains the preset on it against the usual val shard, and
prints the final val loss next to the log's path.
"""
import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tools.logs import parse_log, printed_log_path  # noqa: E402
from train_gpt import write_shard  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, default=ROOT / "data/tinyshakespeare/input.txt")
    parser.add_argument("--out", type=Path, default=ROOT / "logs/ablation_in_order")
    args = parser.parse_args(argv)
    text = args.input.read_text(encoding="utf-8")
    index = {c: i for i, c in enumerate(sorted(set(text)))}
    args.out.mkdir(parents=True, exist_ok=True)
    write_shard(args.out / "train_000000.bin", np.array([index[c] for c in text[:int(0.9 * len(text))]]))
    result = subprocess.run([sys.executable, str(ROOT / "train_gpt.py"), "--preset", "cpu-shakespeare",
                             f"--train_files={args.out / 'train_*.bin'}", f"--log_dir={args.out}"],
                            cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        sys.exit(result.stderr[-2000:])
    path = printed_log_path(result.stdout)
    print(f"in-order train split: final val_loss {parse_log(ROOT / path).val[-1].loss:.4f}  ({path})")


if __name__ == "__main__":
    main()
