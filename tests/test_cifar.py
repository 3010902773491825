import dataclasses
import pickle
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_cifar as tc
import cifar10
from cifar10 import write_synthetic
from conftest import ROOT, cpu_env

CPU = torch.device("cpu")


def on_device(images):
    """The loaded arrays as run_all puts them on the device: images in [0, 1], not yet normalised."""
    train_x, train_y, test_x, test_y = images
    return (tc.to_device(train_x, CPU, torch.float32), torch.from_numpy(train_y),
            tc.to_device(test_x, CPU, torch.float32), torch.from_numpy(test_y))


# ----------------------------------------------------------------------------- config

def test_config_defaults_are_the_records():
    """Every default is the public airbench94_muon record's (REFERENCE.md section 5)."""
    assert dataclasses.asdict(tc.Config()) == dict(
        epochs=8,  # 8 epochs, 200 steps
        batch_size=2000,
        widths=(64, 256, 256),  # the three conv groups
        whiten_eps=5e-4,  # 1/sqrt(eigenvalue + 5e-4)
        whiten_images=5000,  # patch covariance of 5000 training images
        whiten_bias_epochs=3,  # whitening bias trained for the first 3 epochs
        bn_momentum=0.6,
        bn_eps=1e-12,
        crop_pad=2,  # 2-pixel reflect padding
        label_smoothing=0.2,
        muon_lr=0.24,
        muon_momentum=0.6,
        ns_steps=3,
        bias_lr=0.053,
        head_lr=0.67,
        sgd_momentum=0.85,
        weight_decay=2e-6,  # per sample: 2e-6 x 2000 = 0.004 a step
    )
    assert tc.MEAN == (0.4914, 0.4822, 0.4465)  # the record's normalisation
    assert tc.STD == (0.2470, 0.2435, 0.2616)


# ----------------------------------------------------------------------------- data

def test_loader_round_trip(tmp_path):
    train, test = write_synthetic(tmp_path, n_train=(7, 5, 6, 4, 3), n_test=9)
    train_x, train_y, test_x, test_y = tc.load_cifar10(tmp_path)
    assert train_x.shape == (25, 32, 32, 3) and train_x.dtype == np.uint8 and test_x.shape == (9, 32, 32, 3)
    rows = np.concatenate([d for d, _ in train])
    np.testing.assert_array_equal(train_x, rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(train_y, np.concatenate([l for _, l in train]))
    np.testing.assert_array_equal(test_y, test[1])
    # channel-major rows: the first 1024 bytes of a row are the red plane
    np.testing.assert_array_equal(train_x[0, :, :, 0].ravel(), rows[0, :1024])


def _corrupt(tmp_path, name, how):
    write_synthetic(tmp_path, n_train=(4,) * 5, n_test=4)
    path = tmp_path / tc.BATCHES_DIR / name
    if how == "missing":
        path.unlink()
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[:500])
    else:
        with open(path, "wb") as f:
            pickle.dump(how, f, protocol=2)
    return path


@pytest.mark.parametrize("name, how, message", [
    ("data_batch_3", "missing", r"data_batch_3: missing \(python data/cifar10.py --dir .* downloads it\)"),
    ("data_batch_2", "truncated", r"data_batch_2: not a readable CIFAR-10 batch, truncated or corrupt"),
    ("test_batch", {b"data": np.zeros((4, 1000), np.uint8), b"labels": [0] * 4},
     r"test_batch: b'data' is \(4, 1000\) uint8, expected uint8 \(N, 3072\)"),
    ("data_batch_1", {b"data": np.zeros((4, 3072), np.float32), b"labels": [0] * 4},
     r"data_batch_1: b'data' is \(4, 3072\) float32, expected uint8"),
    ("data_batch_5", {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2]},
     r"data_batch_5: b'labels' should be a list of 4 integers in 0..9"),
    ("data_batch_3", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0.5, 1]},
     r"data_batch_3: b'labels' should be a list of 2 integers in 0..9"),
    ("data_batch_2", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [3, 10]},
     r"data_batch_2: b'labels' should be a list of 2 integers in 0..9"),
    ("data_batch_4", [1, 2, 3], r"data_batch_4: expected a dict with b'data' and b'labels'"),
])
def test_bad_batches_name_the_file(tmp_path, name, how, message):
    _corrupt(tmp_path, name, how)
    with pytest.raises(tc.UserError, match=message):
        tc.load_cifar10(tmp_path)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # what a hostile pickle would do, harmlessly


def test_pickles_cannot_run_code(tmp_path):
    marker = tmp_path / "ran"
    _corrupt(tmp_path, "data_batch_1", {b"data": _Exploit(str(marker)), b"labels": []})
    with pytest.raises(tc.UserError, match=r"data_batch_1: .*refusing to load (_?io|builtins)\.open"):
        tc.load_cifar10(tmp_path)
    assert not marker.exists()


class _UnknownCodec:
    def __reduce__(self):
        import codecs
        return (codecs.encode, ("x", "no-such-codec"))  # an allowed global, abused


def test_allowed_globals_fail_cleanly(tmp_path):
    _corrupt(tmp_path, "data_batch_1", {b"data": _UnknownCodec(), b"labels": []})
    with pytest.raises(tc.UserError, match=r"data_batch_1: not a readable CIFAR-10 batch.*LookupError"):
        tc.load_cifar10(tmp_path)


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-6), (torch.float16, 1e-2)])
def test_to_device_scales_and_normalize_standardises(dtype, atol):
    """to_device gives [0, 1] NCHW channels-last images in the dtype; normalize standardises them per
    channel, staying in that dtype and layout."""
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    expected = images.transpose(0, 3, 1, 2) / 255.0
    x = tc.to_device(images, CPU, dtype)
    assert x.dtype == dtype and x.shape == (5, 3, 32, 32) and x.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_allclose(x.double().numpy(), expected, atol=atol, rtol=0)
    z = tc.normalize(x)
    assert z.dtype == dtype and z.is_contiguous(memory_format=torch.channels_last)
    mean, std = (np.array(v).reshape(1, 3, 1, 1) for v in ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)))
    np.testing.assert_allclose(z.double().numpy(), (expected - mean) / std, atol=atol, rtol=0)


# ----------------------------------------------------------------------------- augmentation

def test_alternating_flips_show_every_image_both_ways():
    """Channel 0 carries an image's id, channel 1 a left-to-right ramp that shows whether it is
    flipped; labels are id mod 10. Over two epochs each id comes once each way, label intact."""
    n = 40
    ids = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 32, 32)
    ramp = torch.linspace(-1, 1, 32).expand(n, 1, 32, 32)
    images = torch.cat((ids, ramp, torch.zeros(n, 1, 32, 32)), 1)
    labels = torch.arange(n) % 10
    cfg = tc.Config(batch_size=8, crop_pad=0)
    g = torch.Generator().manual_seed(0)
    first = torch.rand(n, generator=g) < 0.5
    seen = {i: [] for i in range(n)}
    for epoch in (0, 1):
        for x, y in tc.epoch_batches(images, labels, first, epoch, cfg, g):
            for img, label in zip(x, y):
                i = int(img[0, 0, 0])
                assert label == i % 10
                seen[i].append(bool(img[1, 0, 0] > 0))  # ramp starts high: flipped
    assert all(sorted(v) == [False, True] for v in seen.values())
    flipped_first = sum(v[0] for v in seen.values())
    assert 0 < flipped_first < n  # epoch 0 flips some images, not all


def test_random_crops_keep_labels_and_shift_content():
    """Channel 0 is the image's id, channel 1 the column and channel 2 the row index: every crop is
    a shift of up to 2 pixels each way, the two independent, filled by reflection at the edges."""
    n = 400
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 32, 32).clone()
    images[:, 1] = torch.arange(32.0)
    images[:, 2] = torch.arange(32.0).view(32, 1)
    labels = torch.arange(n) % 10
    cfg = tc.Config(batch_size=100, crop_pad=2)
    g = torch.Generator().manual_seed(0)
    shifts = set()
    for x, y in tc.epoch_batches(images, labels, torch.zeros(n, dtype=torch.bool), 0, cfg, g):
        assert torch.equal(x[:, 0, 0, 0].long() % 10, y)  # a constant channel survives the crops
        dx, dy = x[:, 1, 10, 10] - 10, x[:, 2, 10, 10] - 10  # interior pixel: the shift itself
        assert torch.equal(x[:, 1, 10, 0], dx.abs()) and torch.equal(x[:, 2, 0, 10], dy.abs())  # reflected edge
        shifts.update(zip(dy.long().tolist(), dx.long().tolist()))
    assert shifts == {(a, b) for a in range(-2, 3) for b in range(-2, 3)}


# ----------------------------------------------------------------------------- network

def test_whitening_whitens():
    """The 2x2 patches of the whitened images have (nearly) identity covariance, and the second
    half of the filters are the negatives of the first."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(200, 3, 16, 16, generator=g)
    images = base + 0.8 * base.roll(1, dims=-1) + 0.5 * base[:, [1, 2, 0]]  # correlated pixels and channels
    filters = tc.whitening_filters(images, eps=5e-4)
    assert filters.shape == (24, 3, 2, 2)
    torch.testing.assert_close(filters[12:], -filters[:12])
    out = F.conv2d(images, filters[:12])
    cov = torch.cov(out.permute(1, 0, 2, 3).reshape(12, -1))
    torch.testing.assert_close(cov, torch.eye(12), atol=0.02, rtol=0)
    raw = torch.cov(images.unfold(2, 2, 1).unfold(3, 2, 1).permute(1, 4, 5, 0, 2, 3).reshape(12, -1))
    assert (raw - torch.eye(12)).abs().max() > 0.5  # the input was far from white


class _ViewRecorder(torch.nn.Module):
    """Stands in for the net: keeps every input, and answers its k-th call with the one-hot row e_k,
    so column k of the prediction is the weight given to view k."""

    def __init__(self):
        super().__init__()
        self.views = []

    def forward(self, x):
        self.views.append(x.clone())
        out = torch.zeros(len(x), 10)
        out[:, len(self.views) - 1] = 1
        return out


def test_tta_averages_the_records_six_views():
    """The record's views: x and its flip (1/4 each), and the two 1-pixel diagonal shifts from a
    1-pixel reflect padding, each flipped after shifting (1/8 each)."""
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    x = x.contiguous(memory_format=torch.channels_last)
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    a, b = padded[..., 0:32, 0:32], padded[..., 2:34, 2:34]
    expected = {"x": (x, 1 / 4), "flip(x)": (x.flip(-1), 1 / 4),
                "shift(x,1,1)": (a, 1 / 8), "flip(shift(x,1,1))": (a.flip(-1), 1 / 8),
                "shift(x,-1,-1)": (b, 1 / 8), "flip(shift(x,-1,-1))": (b.flip(-1), 1 / 8)}
    stub = _ViewRecorder()
    weights = tc.predict(stub, x)
    assert torch.equal(weights, weights[:1].expand_as(weights))  # the same weights for every image
    got = {}
    for k, view in enumerate(stub.views):
        names = [name for name, (v, _) in expected.items() if torch.equal(view, v)]
        assert len(names) == 1, f"view {k} is none of the record's views"
        got[names[0]] = weights[0, k].item()
        assert view.is_contiguous(memory_format=torch.channels_last)  # the layout the compiled model saw
    assert got == {name: pytest.approx(w) for name, (_, w) in expected.items()}
    assert len(stub.views) == 6


# ----------------------------------------------------------------------------- optimizer

def test_optimizer_groups_cover_every_trainable_parameter_once():
    cfg = tc.Config(widths=(8, 16, 16))
    model = tc.Net(cfg)
    sgd, muon = tc.build_optimizers(model, cfg, CPU)
    owned = [p for opt in (sgd, muon) for g in opt.param_groups for p in g["params"]]
    assert sorted(map(id, owned)) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    assert all(p.ndim == 4 for g in muon.param_groups for p in g["params"]) and len(muon.param_groups[0]["params"]) == 6
    by_name = {g["name"]: g for g in sgd.param_groups}
    assert by_name["whiten_bias"]["params"] == [model.whiten.bias]
    for g in sgd.param_groups:  # each step decays by lr x weight_decay = 2e-6 x 2000 = 0.004 at full lr
        assert g["lr"] * g["weight_decay"] == pytest.approx(0.004)


def test_learning_rate_schedules():
    bias, other = {"name": "whiten_bias"}, {"name": "head"}
    assert [tc.lr_factor(s, 200, 75, other) for s in (0, 100, 199)] == pytest.approx([1.0, 0.5, 0.005])
    assert [tc.lr_factor(s, 200, 75, bias) for s in (0, 30, 75, 150)] == pytest.approx([1.0, 0.6, 0.0, 0.0])


def test_muon_ignores_the_scale_of_the_filters():
    """BatchNorm follows every conv, so Muon renormalises before stepping: the same gradient moves a
    filter bank and a 5x copy of it to the same weights, by an orthogonalised step of size lr."""
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3)
    w *= 16 ** 0.5 / w.norm()
    grad = torch.randn_like(w)
    params = [torch.nn.Parameter(w.clone()), torch.nn.Parameter(5 * w.clone())]
    opt = tc.Muon(params, lr=0.1, momentum=0.0, ns_steps=3, ns_dtype=torch.float32)
    for p in params:
        p.grad = grad.clone()
    opt.step()
    torch.testing.assert_close(params[0], params[1])
    step = (params[0] - w).flatten(1) / -0.1
    singular = torch.linalg.svdvals(step)
    assert singular.min() > 0.3 and singular.max() < 1.3  # three Newton-Schulz steps: roughly orthogonal


# ----------------------------------------------------------------------------- training

def _smoothed_cross_entropy(logits, labels, smoothing):
    """By hand: the target is (1 - smoothing) one-hot + smoothing / 10 everywhere; summed over the batch."""
    target = (1 - smoothing) * F.one_hot(labels, 10).double() + smoothing / 10
    return -(target * logits.double().log_softmax(1)).sum().item()


def test_loss_is_cross_entropy_smoothed_at_0_2():
    g = torch.Generator().manual_seed(0)
    logits, labels = 3 * torch.randn(64, 10, generator=g), torch.randint(0, 10, (64,), generator=g)
    loss = tc.loss_fn(logits, labels, tc.Config()).item()
    assert loss == pytest.approx(_smoothed_cross_entropy(logits, labels, 0.2), rel=1e-6)
    assert loss != pytest.approx(_smoothed_cross_entropy(logits, labels, 0.0), rel=1e-2)  # smoothing shows here


def test_train_run_reports_the_label_smoothed_loss(tmp_path, monkeypatch):
    """The per-epoch loss train_run reports is the cross-entropy smoothed at 0.2 of the logits and
    labels it trained on, whatever Config or train_run say."""
    cfg = tc.Config(widths=(8, 16, 16), batch_size=100, epochs=2)
    write_synthetic(tmp_path, n_train=(100,) * 5, n_test=100)
    batches, real_loss_fn = [], tc.loss_fn

    def spy(logits, labels, cfg):
        batches.append((logits.detach().clone(), labels.clone()))
        return real_loss_fn(logits, labels, cfg)
    monkeypatch.setattr(tc, "loss_fn", spy)
    _, _, epochs = tc.train_run(cfg, on_device(tc.load_cifar10(tmp_path)), CPU, seed=0)
    assert len(batches) == 10, "train_run should compute its loss with loss_fn, once a step"
    for e, (reported, _) in enumerate(epochs):
        epoch = batches[5 * e:5 * (e + 1)]
        smoothed = sum(_smoothed_cross_entropy(logits, y, 0.2) for logits, y in epoch) / 500
        plain = sum(_smoothed_cross_entropy(logits, y, 0.0) for logits, y in epoch) / 500
        assert reported == pytest.approx(smoothed, rel=1e-5)
        assert abs(plain - smoothed) > 1e-3 * smoothed  # the check can tell smoothing from none


def test_each_run_normalises_the_raw_images_inside_its_clock(tmp_path, monkeypatch):
    """train_run takes the [0, 1] images of to_device and normalises the train and test sets between
    starting and stopping its clock, as the record times it; the whitening filters and the
    evaluation see the normalised images."""
    cfg = tc.Config(widths=(8, 16, 16), batch_size=250, epochs=1)
    write_synthetic(tmp_path, n_train=(100,) * 5, n_test=100)
    data = on_device(tc.load_cifar10(tmp_path))
    assert data[0].min() >= 0 and data[0].max() <= 1
    events, real_normalize, real_predict, real_clock = [], tc.normalize, tc.predict, time.perf_counter

    def normalize(images):
        events.append(("normalize", images))
        return real_normalize(images)

    def predict(model, images):
        events.append(("predict", images))
        return real_predict(model, images)

    def clock():
        events.append(("clock", None))
        return real_clock()
    monkeypatch.setattr(tc, "normalize", normalize)
    monkeypatch.setattr(tc, "predict", predict)
    monkeypatch.setattr(tc, "time", types.SimpleNamespace(perf_counter=clock))
    model = tc.build_model(cfg, CPU)
    tc.train_run(cfg, data, CPU, seed=0, model=model, run_model=model)
    kinds = [kind for kind, _ in events]
    assert kinds[0] == kinds[-1] == "clock" and kinds.count("clock") == 2, kinds
    normalized = [images for kind, images in events if kind == "normalize"]
    assert any(images is data[0] for images in normalized) and any(images is data[2] for images in normalized)
    (evaluated,) = [images for kind, images in events if kind == "predict"]
    torch.testing.assert_close(evaluated, real_normalize(data[2]), rtol=0, atol=0)
    whitened = tc.whitening_filters(real_normalize(data[0])[:cfg.whiten_images], cfg.whiten_eps)
    torch.testing.assert_close(model.whiten.weight, whitened)
    assert not torch.allclose(whitened, tc.whitening_filters(data[0][:cfg.whiten_images], cfg.whiten_eps))


def test_short_training_learns(tmp_path):
    """Noisy templates: 4 epochs of a narrow net reach high test accuracy; with shuffled labels the
    same run stays near chance, so the accuracy comes from learning."""
    cfg = tc.Config(widths=(16, 32, 32), batch_size=150, epochs=4)
    write_synthetic(tmp_path / "real", n_train=(300,) * 5, n_test=300)
    accuracy, seconds, epochs = tc.train_run(cfg, on_device(tc.load_cifar10(tmp_path / "real")), CPU, seed=0)
    assert accuracy > 0.9, accuracy
    assert epochs[-1][1] > epochs[0][1] and seconds > 0
    write_synthetic(tmp_path / "noise", n_train=(300,) * 5, n_test=300, shuffle_labels=True)
    chance, _, _ = tc.train_run(cfg, on_device(tc.load_cifar10(tmp_path / "noise")), CPU, seed=0)
    assert chance < 0.25, chance


def test_same_seed_same_run(tmp_path):
    cfg = tc.Config(widths=(8, 16, 16), batch_size=250, epochs=1)
    write_synthetic(tmp_path, n_train=(100,) * 5, n_test=100)
    data = on_device(tc.load_cifar10(tmp_path))
    first, second = tc.train_run(cfg, data, CPU, seed=3), tc.train_run(cfg, data, CPU, seed=3)
    assert first[0] == second[0] and first[2] == second[2]


def test_command_line_through_data_dir(tmp_path):
    """The trainer as users run it, with the record's network, on 500 images in the real layout."""
    write_synthetic(tmp_path / "cifar", n_train=(100,) * 5, n_test=100)
    result = subprocess.run([sys.executable, str(ROOT / "train_cifar.py"), "--data-dir", str(tmp_path / "cifar"),
                             "--device", "cpu", "--epochs", "1", "--batch-size", "250", "--runs", "2",
                             "--log-dir", str(tmp_path / "logs")],
                            capture_output=True, text=True, env=cpu_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    (log,) = (tmp_path / "logs").glob("*/log.txt")
    text = log.read_text()
    assert text.startswith((ROOT / "train_cifar.py").read_text().rstrip("\n"))
    assert "data: 500 train and 100 test images" in text
    runs = [line for line in text.splitlines() if " test_acc:" in line and line.startswith("run:")]
    assert [line.split()[0] for line in runs] == ["run:1/2", "run:2/2"]
    assert "runs:2 test_acc_mean:" in text.splitlines()[-1]


def test_command_line_missing_data_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "train_cifar.py"), "--data-dir", str(tmp_path),
                             "--device", "cpu", "--log-dir", str(tmp_path / "logs")],
                            capture_output=True, text=True, env=cpu_env(), timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / tc.BATCHES_DIR / 'data_batch_1'}: missing "
        f"(python data/cifar10.py --dir {tmp_path} downloads it)"]


# ----------------------------------------------------------------------------- download script

def _archive(tmp_path):
    import tarfile
    write_synthetic(tmp_path / "src", n_train=(3,) * 5, n_test=3)
    archive = tmp_path / "out" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / tc.BATCHES_DIR, arcname=tc.BATCHES_DIR)
    return archive


def test_fetch_unpacks_only_after_the_checksum(tmp_path):
    archive = _archive(tmp_path)
    with pytest.raises(tc.UserError, match=r"cifar-10-python.tar.gz: md5 [0-9a-f]{32}, expected 0{32}"):
        cifar10.fetch(archive.parent, md5="0" * 32)
    assert not (archive.parent / tc.BATCHES_DIR).exists()
    train_x, _, test_x, _ = cifar10.fetch(archive.parent, md5=cifar10.md5sum(archive))
    assert (len(train_x), len(test_x)) == (15, 3)


def test_a_reused_model_starts_each_run_afresh(tmp_path):
    """On CUDA one compiled model serves every run; loading fresh weights must make that identical
    to building a new model, whatever the previous run left in it."""
    cfg = tc.Config(widths=(8, 16, 16), batch_size=250, epochs=1)
    write_synthetic(tmp_path, n_train=(100,) * 5, n_test=100)
    data = on_device(tc.load_cifar10(tmp_path))
    model = tc.build_model(cfg, CPU)
    tc.train_run(cfg, data, CPU, seed=1, model=model, run_model=model)
    reused = tc.train_run(cfg, data, CPU, seed=2, model=model, run_model=model)
    new = tc.train_run(cfg, data, CPU, seed=2)
    assert (reused[0], reused[2]) == (new[0], new[2])  # accuracy and per-epoch stats; times differ


@pytest.mark.parametrize("flag", ["--runs=0", "--epochs=-1", "--batch-size=many"])
def test_counts_must_be_positive(flag, capsys):
    with pytest.raises(SystemExit) as e:
        tc.parse_args([flag])
    assert e.value.code == 2 and "expected a positive integer" in capsys.readouterr().err
