"""What the model and the recipe compute: the value residual, the U-net skips, the logit soft-cap,
which micro-batches each rank trains on, and the RNG state a resumed run continues from.

The model tests re-initialise every weight at random: the record zero-initialises the output
projections and the head, which would make most of these properties invisible."""
import dataclasses
import inspect

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_gpt
from conftest import tiny_config

CPU = torch.device("cpu")


def model_config(tmp_path, **overrides):
    """tiny_config for a model alone: no shards are read, so tmp_path stands in for them."""
    return tiny_config(tmp_path, tmp_path, **overrides)


def random_model(cfg, seed=0):
    """A GPT with every weight random and every scalar distinct, so no term of the sum vanishes."""
    torch.manual_seed(seed)
    model = train_gpt.GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
        model.embed.weight.normal_(0, 1)
        for i, block in enumerate(model.blocks):
            block.attn.value_mix.fill_(0.2 + 0.15 * i)  # mixed v differs from both its parts
            block.lambdas.copy_(torch.tensor([0.9 - 0.05 * i, 0.3 + 0.1 * i]))
        model.skip_weights.copy_(torch.linspace(0.5, 2.0, len(model.skip_weights)))
    return model


def tokens(cfg, batch=2, seed=1):
    return torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len), generator=torch.Generator().manual_seed(seed))


def argument(module, name, args, kwargs):
    """The value a module's forward received for parameter name, passed by position or keyword."""
    return inspect.signature(module.forward).bind(*args, **kwargs).arguments[name]


# ----------------------------------------------------------------------------- value residual

def test_every_block_mixes_in_the_first_blocks_v(tmp_path):
    """Each block's attention gets v_first = block 0's value projection (per head), not the mixed v
    that the block before it attended with."""
    cfg = model_config(tmp_path, n_layer=4)
    model = random_model(cfg)
    own_v, received = {}, {}

    def record(m, args, kwargs, i):  # the block's own value projection, and the v_first it was handed
        own_v[i] = F.linear(argument(m, "x", args, kwargs), m.v.weight).detach()
        received[i] = argument(m, "v_first", args, kwargs)
    for i, block in enumerate(model.blocks):
        block.attn.register_forward_pre_hook(lambda m, args, kwargs, i=i: record(m, args, kwargs, i),
                                             with_kwargs=True)
    x = tokens(cfg)
    with torch.no_grad():
        model(x, x)
    B, T = x.shape
    v0 = own_v[0].view(B, T, -1, cfg.head_dim)
    assert sorted(received) == list(range(cfg.n_layer))
    for i in range(1, cfg.n_layer):
        assert received[i] is not None and received[i].shape == v0.shape, f"block {i}"
        assert torch.allclose(received[i], v0, rtol=1e-5, atol=1e-6), f"block {i} got another v_first"
        # the test has teeth: the block's own v, and so its mixed v, is far from v_first
        assert not torch.allclose(own_v[i].view_as(v0), v0, atol=1e-2)


# ----------------------------------------------------------------------------- U-net skips

@pytest.mark.parametrize("n_layer", [6, 8])
def test_decoder_blocks_add_encoder_outputs_last_first(tmp_path, n_layer):
    """Decoder block k (block n_encoder + k) starts from the previous block's output plus
    skip_weights[k] x the output of encoder block n_encoder - 1 - k; encoder blocks get no skip."""
    cfg = model_config(tmp_path, n_layer=n_layer)
    model = random_model(cfg)
    inputs, outputs = {}, {}
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(
            lambda m, args, kwargs, i=i: inputs.__setitem__(i, argument(m, "x", args, kwargs).detach()),
            with_kwargs=True)
        block.register_forward_hook(lambda m, args, out, i=i: outputs.__setitem__(i, out[0].detach()))
    x = tokens(cfg)
    with torch.no_grad():
        model(x, x)
    n_enc = model.n_encoder
    assert n_enc == n_layer // 2
    w = model.skip_weights.detach()
    for i in range(1, n_enc):
        assert torch.equal(inputs[i], outputs[i - 1]), f"encoder block {i}"
    for k in range(n_layer - n_enc):
        i = n_enc + k
        expected = outputs[i - 1] + w[k] * outputs[n_enc - 1 - k]
        assert torch.allclose(inputs[i], expected, rtol=1e-5, atol=1e-5), f"decoder block {i}"
        # the test has teeth: another encoder output would give another input
        for j in set(range(n_enc)) - {n_enc - 1 - k}:
            assert not torch.allclose(inputs[i], outputs[i - 1] + w[k] * outputs[j], atol=1e-3)


# ----------------------------------------------------------------------------- logit soft-cap

@pytest.mark.parametrize("cap", [30.0, 15.0])
def test_logits_are_soft_capped_at_cfg_logit_cap(tmp_path, cap):
    """logits = cap * tanh(head output / cap), with cap from the config, both for the next-token logits
    and inside the loss. The head is large, so raw logits reach well past the cap."""
    cfg = model_config(tmp_path, logit_cap=cap)
    model = random_model(cfg)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 12)
    raw = []
    model.lm_head.register_forward_hook(lambda m, args, out: raw.append(out.detach().float()))
    x, y = tokens(cfg), tokens(cfg, seed=2)
    with torch.no_grad():
        logits = model(x)
        loss = model(x, y)
    assert raw[0].abs().max() > 3 * cap  # the cap is not a no-op here
    capped = cap * torch.tanh(raw[0] / cap)
    assert logits.shape == (x.size(0), cfg.vocab_size)
    assert torch.allclose(logits, capped, rtol=1e-5, atol=1e-4), "next-token logits are not cap * tanh(raw / cap)"
    assert logits.abs().max() <= cap  # float32 tanh saturates to 1
    capped = cap * torch.tanh(raw[1] / cap)
    expected = F.cross_entropy(capped.reshape(-1, cfg.vocab_size), y.reshape(-1))
    assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-5), "the loss is not that of the capped logits"


# ----------------------------------------------------------------------------- micro-batches per rank

@pytest.mark.parametrize("micro_batch_size", [1, 2])
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_rank_r_trains_on_micro_batches_r_plus_multiples_of_world_size(tmp_path, world_size, micro_batch_size):
    """Each step reads one contiguous stretch; rank r gets micro-batches r, r + w, r + 2w, ... of it,
    inputs and targets shifted by one. Tokens equal their position in the shard, so every token read
    tells where it came from."""
    cfg = dataclasses.replace(model_config(tmp_path), vocab_size=4096, seq_len=4, batch_size=8,
                              micro_batch_size=micro_batch_size)
    train_gpt.write_shard(tmp_path / "train_000000.bin", np.arange(1000))
    span, micro = cfg.batch_size * cfg.seq_len, micro_batch_size * cfg.seq_len
    n_micro = cfg.batch_size // micro_batch_size
    for rank in range(world_size):
        loader = train_gpt.TrainLoader(cfg, rank, world_size, CPU)
        for step in range(2):
            batches = loader.next_batches()
            wanted = range(rank, n_micro, world_size)
            assert len(batches) == len(wanted), f"rank {rank} step {step}"
            for (x, y), j in zip(batches, wanted):
                start = step * span + j * micro
                expected = torch.arange(start, start + micro).view(micro_batch_size, cfg.seq_len)
                assert torch.equal(x, expected), f"rank {rank} step {step}: not micro-batch {j}"
                assert torch.equal(y, expected + 1), f"rank {rank} step {step}: targets of micro-batch {j}"


# ----------------------------------------------------------------------------- resume and the RNG

def test_resume_restores_the_rng_state_of_the_checkpoint(char_shards, tmp_path):
    """After resume, the CPU generator is where the checkpointed run left it, whatever it was before:
    later random draws continue that run's stream."""
    cfg = tiny_config(char_shards, tmp_path, steps=2, cooldown_steps=1, save_every=2)
    run_dir = tmp_path / "logs/run"
    run_dir.mkdir(parents=True)
    train_gpt.train(cfg, lambda line: None, run_dir=run_dir)
    path = run_dir / "step_000002.pt"
    saved = train_gpt.read_checkpoint(path)["rng"]["cpu"]

    resumed = dataclasses.replace(cfg, resume=str(path))
    raw_model, _, _, optimizers = train_gpt.build(resumed, 0, 1, CPU)
    loader = train_gpt.TrainLoader(resumed, 0, 1, CPU)
    torch.manual_seed(12345)
    assert not torch.equal(torch.get_rng_state(), saved)  # resume has something to restore
    train_gpt.resume(resumed, lambda line: None, raw_model, optimizers, loader, 0, 1, CPU)
    assert torch.equal(torch.get_rng_state(), saved), "resume left the RNG where it was"
    draw = torch.rand(16)
    torch.set_rng_state(saved)
    assert torch.equal(draw, torch.rand(16))


# ----------------------------------------------------------------------------- multi-token prediction

def test_mtp_head_scores_the_token_after_next_and_only_in_training(tmp_path):
    """horizons=2 gives the next token's loss (the same as horizons=1) and mtp_head's cross-entropy at
    position t against the target of t + 1. Without mtp_weight there is no second head at all."""
    cfg = model_config(tmp_path, n_layer=2, mtp_weight=0.5)
    model = random_model(cfg)
    x, y = tokens(cfg), tokens(cfg, seed=2)
    with torch.no_grad():
        loss, second = model(x, y, horizons=2)
        hidden = {}
        model.lm_head.register_forward_hook(lambda m, args, out: hidden.__setitem__("x", args[0]))
        assert loss == model(x, y)
        logits = 30 * torch.tanh(F.linear(hidden["x"][:, :-1], model.mtp_head.weight) / 30)
        expected = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), y[:, 1:].reshape(-1))
    torch.testing.assert_close(second, expected)
    assert abs(second - loss) > 1e-3  # the test has teeth: the two heads differ
    assert train_gpt.GPT(model_config(tmp_path, mtp_weight=0.0)).mtp_head is None


def test_train_step_logs_the_next_token_loss_and_trains_both_heads(tmp_path):
    """The objective is loss + mtp_weight x (1 - step / steps) x second, but the loss a step returns (and
    logs) is the next token's, comparable to val loss; mtp_head gets a gradient, scaled by the weight."""
    cfg = model_config(tmp_path, n_layer=2, mtp_weight=0.5, steps=10)
    batches = [(tokens(cfg), tokens(cfg, seed=2))]
    grads = {}
    for step in (0, 5):
        model = random_model(cfg)
        with torch.no_grad():
            expected = model(*batches[0]).item()
        optimizers = train_gpt.build_optimizers(model, cfg, 0, 1, CPU)
        for opt in optimizers:  # look at the gradients, not the update
            opt.step = lambda: None
        model.zero_grad = lambda set_to_none=True: None
        loss, _ = train_gpt.train_step(step, batches, cfg, model, optimizers, 1)
        assert loss == pytest.approx(expected, rel=1e-6)
        grads[step] = model.mtp_head.weight.grad.clone()
    torch.testing.assert_close(grads[5], grads[0] * 0.5, rtol=1e-4, atol=1e-7)  # weight 0.5 -> 0.25
