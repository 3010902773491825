"""Text from a model: the tokens of a config (GPT-2's BPE, or the characters of a meta.json) and sampling.

Imported by train_gpt.py, whose run logs can end with a sample, and by sample.py and evaluate.py. It
imports nothing of ours, and a run's log holds it with the trainer's source.
"""
import json
from pathlib import Path

import tiktoken
import torch


class VocabularyError(ValueError):
    """A vocabulary that cannot be found or cannot encode the text: one line for the user."""


def text_codec(cfg, meta=None):
    """(encode, decode, vocabulary size) of cfg's tokens: GPT-2's BPE for a GPT-2 vocabulary, else the
    characters of the meta.json beside the train shards (or at meta). vocab_size may be larger: it is
    padded for the matmuls."""
    if cfg.vocab_size >= 50257:
        enc = tiktoken.get_encoding("gpt2")
        return enc.encode_ordinary, enc.decode, enc.n_vocab
    meta = Path(meta or Path(cfg.train_files).parent / "meta.json")
    if not meta.is_file():
        raise VocabularyError(f"{meta}: not found; a character-level model decodes with the meta.json written "
                              f"beside its shards")
    chars = json.loads(meta.read_text())["chars"]
    index = {c: i for i, c in enumerate(chars)}

    def encode(text):
        unknown = sorted(set(text) - index.keys())
        if unknown:
            raise VocabularyError(f"{meta}: the vocabulary has no {''.join(unknown)!r}")
        return [index[c] for c in text]
    return encode, lambda ids: "".join(chars[i] for i in ids), len(chars)


def start_of_text(cfg, encode):
    """A prompt to sample from nothing: a document start, or for continuous text a newline."""
    return [cfg.eot_token] if cfg.eot_token >= 0 else encode("\n")


@torch.no_grad()
def generate(model, prompt, n_tokens, vocab, temperature=0.8, top_k=40, seed=0):
    """Sample n_tokens ids after the prompt ids. Each step reruns the whole context (at most seq_len
    tokens): no cache, which short samples do not need. Ids from vocab up, padding, are never drawn."""
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    ids = torch.tensor([prompt], device=device)
    for _ in range(n_tokens):
        logits = model(ids[:, -model.cfg.seq_len:], flex=False)[0, :vocab]
        if temperature == 0:
            token = logits.argmax().view(1)
        else:
            logits = logits / temperature
            if top_k:
                logits = logits.masked_fill(logits < logits.topk(min(top_k, vocab)).values[-1], float("-inf"))
            token = torch.multinomial(logits.softmax(-1), 1, generator=generator)
        ids = torch.cat([ids, token.view(1, 1)], dim=1)
    return ids[0, len(prompt):].tolist()
