"""HellaSwag accuracy of a train_gpt.py checkpoint, on the 10,042 validation items.

    python evaluate.py latest                                  # the newest checkpoint under logs/
    python evaluate.py logs/<run>/step_001875.pt --batch 32 --limit 1000

The scoring (length-normalised completion loss) and the download are in evals/hellaswag.py.
"""
import argparse
import sys
import time

import torch

from evals import hellaswag
from sampling import text_codec
from train_gpt import UserError, load_model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help='a step_*.pt file, or "latest"')
    parser.add_argument("--file", default=str(hellaswag.FILE), help="the HellaSwag jsonl (downloaded when missing)")
    parser.add_argument("--batch", type=int, default=16, help="items per forward pass (4 rows each)")
    parser.add_argument("--limit", type=int, default=0, help="only the first N items (0: all)")
    args = parser.parse_args(argv)
    try:
        cfg, model = load_model(args.checkpoint, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        if cfg.vocab_size < 50257:
            raise UserError(f"HellaSwag is English text: it needs a GPT-2 vocabulary, and this model has "
                            f"{cfg.vocab_size} tokens")
        items = hellaswag.load_items(hellaswag.ensure(args.file), args.limit)
        encode, prefix = text_codec(cfg)[0], hellaswag.context_prefix(cfg.eot_token)
        hellaswag.check_lengths(items, encode, prefix, cfg.seq_len)
        t0 = time.perf_counter()
        acc = hellaswag.accuracy(model, items, encode, prefix, batch_items=args.batch, progress=True)
    except (UserError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"hellaswag acc_norm: {acc:.4f} ({round(acc * len(items))}/{len(items)}) in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
