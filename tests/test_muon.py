import dataclasses

import pytest
import torch

from train_gpt import GPT, PRESETS, Muon, build_optimizers, lr_factor, muon_momentum, newton_schulz


def with_spectrum(rows, cols, singular_values, seed=0):
    """U diag(s) V^T with random orthonormal U and V."""
    g = torch.Generator().manual_seed(seed)
    k = min(rows, cols)
    U, _ = torch.linalg.qr(torch.randn(rows, k, generator=g))
    V, _ = torch.linalg.qr(torch.randn(cols, k, generator=g))
    return U @ torch.diag(singular_values) @ V.T


@pytest.mark.parametrize("shape", [(256, 64), (64, 256), (96, 96), (100, 37)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_newton_schulz_orthogonalises(shape, dtype):
    """The output is U S' V^T: G's singular vectors, with every singular value pushed into ~[0.7, 1.2].
    The spectrum spans two decades, as momentum-averaged gradients do."""
    k = min(shape)
    s = torch.logspace(0, -2, k)
    G = with_spectrum(*shape, s)
    O = newton_schulz(G, steps=5, dtype=dtype)
    assert O.shape == G.shape and O.dtype == dtype
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    M = U.T @ O.float() @ Vh.T  # diagonal when O shares G's singular vectors
    diag = M.diagonal()
    assert diag.min() > 0.6 and diag.max() < 1.25, (diag.min(), diag.max())
    off = (M - torch.diag(diag)).abs().max()
    assert off < (1e-4 if dtype == torch.float32 else 0.05), off
    S_out = torch.linalg.svdvals(O.float())
    assert S_out.min() > 0.6 and S_out.max() < 1.25


def test_newton_schulz_batched_matches_one_by_one():
    G = torch.randn(3, 48, 16)
    batched = newton_schulz(G, dtype=torch.float32)
    for i in range(3):
        torch.testing.assert_close(batched[i], newton_schulz(G[i], dtype=torch.float32), atol=1e-5, rtol=1e-5)


def test_newton_schulz_scale_invariant():
    G = torch.randn(32, 64)
    torch.testing.assert_close(newton_schulz(G, dtype=torch.float32), newton_schulz(1000 * G, dtype=torch.float32),
                               atol=1e-4, rtol=1e-4)


def test_muon_step_is_nesterov_then_orthogonalised():
    torch.manual_seed(0)
    tall, wide = torch.nn.Parameter(torch.randn(64, 16)), torch.nn.Parameter(torch.randn(16, 64))
    start = [tall.detach().clone(), wide.detach().clone()]
    opt = Muon([tall, wide], lr=0.1, momentum=0.9, ns_dtype=torch.float32)
    grads = [[torch.randn_like(p) for p in (tall, wide)] for _ in range(2)]
    for g in grads:
        tall.grad, wide.grad = g
        opt.step()
    for i, (p, p0) in enumerate(zip((tall, wide), start)):
        buf1 = grads[0][i]
        buf2 = 0.9 * buf1 + grads[1][i]
        scale = max(1, p.shape[0] / p.shape[1]) ** 0.5
        expected = p0 - 0.1 * scale * (newton_schulz(grads[0][i] + 0.9 * buf1, dtype=torch.float32)
                                        + newton_schulz(grads[1][i] + 0.9 * buf2, dtype=torch.float32))
        torch.testing.assert_close(p.detach(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(64, 64), (256, 64), (64, 256), (96, 33), (768, 3072)])
def test_rms_matched_update_has_rms_02(shape):
    """rms_match scales the orthogonalised update by 0.2 sqrt(max(rows, cols)). An orthogonal rows x cols
    matrix has RMS 1 / sqrt(max(rows, cols)), so the update's RMS is 0.2 times the RMS of Newton-Schulz's
    singular values: 0.2 for an exact orthogonalisation, 0.16-0.2 for the quintic's ~[0.7, 1.2]. The
    record's scaling, sqrt(max(1, rows / cols)), gives 1 / sqrt(cols) instead."""
    torch.manual_seed(0)
    rows, cols = shape
    G = torch.randn(shape)
    s_rms = torch.linalg.svdvals(newton_schulz(G, dtype=torch.float32)).pow(2).mean().sqrt().item()
    for rms_match, expected in ((True, 0.2 * s_rms), (False, s_rms / cols ** 0.5)):
        w = torch.nn.Parameter(torch.randn(shape))
        before = w.detach().clone()
        w.grad = G.clone()
        Muon([w], lr=0.01, momentum=0.95, rms_match=rms_match, ns_dtype=torch.float32).step()
        rms = ((w.detach() - before) / 0.01).pow(2).mean().sqrt().item()
        assert rms == pytest.approx(expected, rel=1e-3), (rms_match, rms)
        if rms_match:
            assert 0.16 < rms <= 0.2


def test_weight_decay_is_decoupled():
    """W <- W * (1 - lr * wd) - lr * scale * update: with a zero gradient (zero update) only the decay is
    left, and with a gradient the decay and the update simply add."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(32, 48))
    before = w.detach().clone()
    opt = Muon([w], lr=0.1, momentum=0.9, weight_decay=0.5, rms_match=True, ns_dtype=torch.float32)
    w.grad = torch.zeros_like(w)
    opt.step()
    torch.testing.assert_close(w.detach(), before * (1 - 0.1 * 0.5), atol=0, rtol=0)
    g = torch.randn(32, 48)
    w2 = torch.nn.Parameter(before.clone())
    opt2 = Muon([w2], lr=0.1, momentum=0.9, weight_decay=0.5, rms_match=True, ns_dtype=torch.float32)
    w2.grad = g
    opt2.step()
    update = newton_schulz(g + 0.9 * g, dtype=torch.float32) * 0.2 * 48 ** 0.5
    torch.testing.assert_close(w2.detach(), before * 0.95 - 0.1 * update, atol=1e-6, rtol=1e-5)


def test_weight_decay_follows_the_lr_schedule(char_shards, tmp_path):
    """In the cooldown the decay shrinks with the lr: W *= 1 - lr(t) * wd, lr(t) the scheduled lr."""
    from conftest import tiny_config
    cfg = tiny_config(char_shards, tmp_path, muon_weight_decay=0.5, muon_lr=0.1, steps=10, cooldown_steps=5)
    model = GPT(cfg)
    (muon,) = [o for o in build_optimizers(model, cfg, 0, 1, torch.device("cpu")) if isinstance(o, Muon)]
    step = 8  # lr_factor 0.4
    for group in muon.param_groups:
        group["lr"] = group["initial_lr"] * lr_factor(step, cfg)
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    before = [p.detach().clone() for g in muon.param_groups for p in g["params"]]
    muon.step()
    after = [p.detach() for g in muon.param_groups for p in g["params"]]
    for a, b in zip(after, before):
        torch.testing.assert_close(a, b * (1 - 0.1 * 0.4 * 0.5), atol=0, rtol=0)


def test_moonlight_options_are_off_in_the_record():
    cfg = PRESETS["gpt2-speedrun"]
    assert cfg.muon_weight_decay == 0 and not cfg.muon_rms_match
    (muon,) = [o for o in build_optimizers(GPT(dataclasses.replace(cfg, n_layer=2, model_dim=128, vocab_size=128)),
                                           cfg, 0, 1, torch.device("cpu")) if isinstance(o, Muon)]
    assert not muon.rms_match and all(g["weight_decay"] == 0 for g in muon.param_groups)


def test_schedules():
    cfg = dataclasses.replace(PRESETS["gpt2-speedrun"], steps=100, cooldown_steps=40, muon_momentum_warmup=10)
    assert [lr_factor(s, cfg) for s in (0, 60, 80, 100)] == [1.0, 1.0, 0.5, 0.0]
    assert muon_momentum(0, cfg) == 0.85 and muon_momentum(5, cfg) == pytest.approx(0.90)
    assert muon_momentum(10, cfg) == muon_momentum(99, cfg) == 0.95
    warm = dataclasses.replace(cfg, lr_warmup_steps=4)
    assert [lr_factor(s, warm) for s in (0, 1, 3, 60, 80, 100)] == [0.25, 0.5, 1.0, 1.0, 0.5, 0.0]


def test_adamw_baseline_takes_the_matrices():
    """optimizer=adamw: one AdamW, whose extra group holds exactly the matrices Muon would train,
    with their own lr and weight decay; embedding, head and scalars keep their settings and no decay."""
    cfg = dataclasses.replace(PRESETS["cpu-shakespeare"], n_layer=2, model_dim=32, head_dim=16, weight_decay=0.1)
    model = GPT(cfg)
    (muon_adam, muon) = build_optimizers(model, cfg, 0, 1, torch.device("cpu"))
    (adamw,) = build_optimizers(model, dataclasses.replace(cfg, optimizer="adamw"), 0, 1, torch.device("cpu"))
    assert isinstance(muon, Muon) and isinstance(adamw, torch.optim.AdamW)
    ids = lambda groups: [[id(p) for p in g["params"]] for g in groups]
    assert ids(adamw.param_groups[:3]) == ids(muon_adam.param_groups)
    assert sorted(ids(adamw.param_groups[3:])[0]) == sorted(sum(ids(muon.param_groups), []))
    assert [(g["lr"], g["weight_decay"]) for g in adamw.param_groups] == [
        (cfg.embed_lr, 0.0), (cfg.head_lr, 0.0), (cfg.scalar_lr, 0.0), (cfg.adamw_lr, 0.1)]


def test_normuon_divides_each_row_by_its_running_rms_and_keeps_the_norm():
    """After NorMuon's first step the running mean square of each row is 0.05 x the row's own, so every
    row of the update gets one RMS; the update keeps the orthogonalised matrix's Frobenius norm. The
    second step divides by the running average, not the current rows' RMS: rows then differ again."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(24, 40))
    opt = Muon([w], lr=0.1, momentum=0.9, ns_dtype=torch.float32, normuon=True)
    g = torch.randn(24, 40) * torch.linspace(0.1, 3, 24)[:, None]  # rows of very different sizes
    before = w.detach().clone()
    w.grad = g
    opt.step()
    update = (before - w.detach()) / 0.1
    orth = newton_schulz(g + 0.9 * g, dtype=torch.float32)
    rows = update.pow(2).mean(dim=1).sqrt()
    torch.testing.assert_close(rows, torch.full_like(rows, rows.mean().item()), rtol=1e-4, atol=0)
    assert update.norm().item() == pytest.approx(orth.norm().item(), rel=1e-5)
    torch.testing.assert_close(opt.state[w]["neuron_moment"], 0.05 * orth.pow(2).mean(dim=1, keepdim=True))
    assert orth.pow(2).mean(dim=1).sqrt().std() / orth.pow(2).mean(dim=1).sqrt().mean() > 0.01  # the test has teeth
    before = w.detach().clone()
    w.grad = torch.randn(24, 40)
    opt.step()
    rows = (before - w.detach()).pow(2).mean(dim=1).sqrt()
    assert rows.std() / rows.mean() > 0.01



def test_later_records_ideas_are_off_in_the_nov_2024_record():
    """gpt2-speedrun stays the public Nov-2024 record: NorMuon and multi-token prediction, which the CPU
    track adopted, are off there (and in the presets built on its recipe)."""
    for name in ("gpt2-speedrun", "gpt2-medium", "gpt2-large", "gpt2-xl"):
        assert not PRESETS[name].normuon and PRESETS[name].mtp_weight == 0, name
    assert PRESETS["cpu-shakespeare"].normuon and PRESETS["cpu-shakespeare"].mtp_weight == 0.5
