"""Sample text from a train_gpt.py checkpoint.

    python sample.py latest                          # the newest checkpoint under logs/
    python sample.py logs/<run>/step_000150.pt --prompt "ROMEO:" --tokens 500 --temperature 0.9 --top_k 20

Character-level models decode with the meta.json beside their train shards (or --meta); GPT-2
vocabularies with tiktoken. The same seed gives the same text.
"""
import argparse
import sys

import torch

from sampling import VocabularyError, generate, start_of_text, text_codec
from train_gpt import UserError, load_model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help='a step_*.pt file, or "latest"')
    parser.add_argument("--prompt", default=None, help="text to continue (default: the start of a document)")
    parser.add_argument("--tokens", type=int, default=300, help="how many tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    parser.add_argument("--top_k", type=int, default=40, help="sample among the k likeliest (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--meta", default=None, help="the character vocabulary, if not beside the train shards")
    args = parser.parse_args(argv)
    if args.tokens < 0 or args.temperature < 0 or args.top_k < 0:
        parser.error("--tokens, --temperature and --top_k must not be negative")
    try:
        cfg, model = load_model(args.checkpoint, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        encode, decode, vocab = text_codec(cfg, args.meta)
        prompt = encode(args.prompt) if args.prompt else start_of_text(cfg, encode)
        if not prompt:
            raise UserError("the prompt encodes to no tokens")
        ids = generate(model, prompt, args.tokens, vocab, args.temperature, args.top_k, args.seed)
    except (UserError, VocabularyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print((args.prompt or "") + decode(ids))
    return 0


if __name__ == "__main__":
    sys.exit(main())
