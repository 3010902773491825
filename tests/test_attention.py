import warnings

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask, flex_attention

from train_gpt import GPT, attend, attention_mask, document_mask
from conftest import tiny_config

EOT = 7
CASES = {  # name: (window, where the end-of-text tokens go); documents and windows cross 128-token blocks
    "causal": (10_000, []),
    "document": (10_000, [5, 40, 41, 90, 250, 400]),
    "window": (200, []),
    "document+window": (200, [30, 100, 300]),
}


def tokens_with_eot(positions, B=2, T=128, seed=0):
    tokens = torch.randint(8, 50, (B, T), generator=torch.Generator().manual_seed(seed))
    for p in positions:
        tokens[0, p % T] = EOT
        tokens[1, (p * 7) % T] = EOT
    return tokens


def brute_force_mask(tokens, window):
    B, T = tokens.shape
    mask = torch.zeros(B, 1, T, T, dtype=torch.bool)
    for b in range(B):
        doc = torch.cumsum(tokens[b] == EOT, 0).tolist()
        for q in range(T):
            for k in range(T):
                mask[b, 0, q, k] = k <= q and q - k < window and doc[q] == doc[k]
    return mask


@pytest.mark.parametrize("case", CASES)
def test_dense_mask_is_the_mask_function(case):
    window, eots = CASES[case]
    tokens = tokens_with_eot(eots, T=64)
    dense = attention_mask(tokens, EOT, window, flex=False)
    assert torch.equal(dense.expand(2, 1, 64, 64), brute_force_mask(tokens, window))
    library = create_mask(document_mask((tokens == EOT).cumsum(-1), window), 2, 1, 64, 64, device="cpu")
    assert torch.equal(dense.expand_as(library), library)


@pytest.mark.parametrize("case", CASES)
def test_sdpa_path_matches_flex_attention(case):
    """T = 512 spans four of FlexAttention's 128-token blocks: full, partial and skipped ones."""
    window, eots = CASES[case]
    tokens = tokens_with_eot(eots, T=512)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 512, 16, generator=g) for _ in range(3))
    dense = attend(q, k, v, attention_mask(tokens, EOT, window, flex=False))
    with warnings.catch_warnings():  # eager FlexAttention warns that it is unfused
        warnings.simplefilter("ignore")
        flex = flex_attention(q, k, v, block_mask=attention_mask(tokens, EOT, window, flex=True))
    torch.testing.assert_close(dense, flex, atol=1e-5, rtol=1e-5)


def test_model_gives_the_same_loss_on_both_paths(char_shards, tmp_path):
    cfg = tiny_config(char_shards, tmp_path, eot_token=EOT, window=150, seq_len=384)
    torch.manual_seed(0)
    model = GPT(cfg, flex=False)
    for p in model.parameters():  # zero-initialised projections would hide the attention
        torch.nn.init.normal_(p, std=0.2)
    tokens = tokens_with_eot([5, 33, 200], B=2, T=385)
    with torch.no_grad(), warnings.catch_warnings():  # FlexAttention has no backward on CPU
        warnings.simplefilter("ignore")
        sdpa_loss = model(tokens[:, :-1], tokens[:, 1:])
        model.flex = True
        flex_loss = model(tokens[:, :-1], tokens[:, 1:])
    torch.testing.assert_close(sdpa_loss, flex_loss, atol=1e-5, rtol=1e-5)
