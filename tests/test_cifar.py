import pickle
import subprocess
import sys

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
    train_x, train_y, test_x, test_y = images
    return (tc.to_device(train_x, CPU, torch.float32), torch.from_numpy(train_y),
            tc.to_device(test_x, CPU, torch.float32), torch.from_numpy(test_y))


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
    with pytest.raises(tc.UserError, match=r"data_batch_1: .*refusing to load (io|builtins)\.open"):
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


def test_tta_is_invariant_to_flipping_the_input():
    torch.manual_seed(0)
    model = tc.Net(tc.Config(widths=(8, 16, 16)))
    images = torch.randn(6, 3, 32, 32)
    model.init_whitening(images, 5e-4)
    torch.testing.assert_close(tc.predict(model, images), tc.predict(model, images.flip(-1)), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(model(images), model(images.flip(-1)), atol=1e-3)  # the net alone is not


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


def test_benchmark_prints_its_figures():
    import re
    lines = []
    images_s = tc.benchmark(tc.Config(batch_size=64), torch.device("cpu"), lines.append, steps=2)
    text = "\n".join(lines)
    assert f"images/s: {images_s:,.0f}" in text and images_s > 0
    flops = float(re.search(r"^model FLOPs per image: ([\d.]+) MFLOP", text, re.M).group(1))
    assert 500 < flops < 1000  # a fixed network: about 0.74 GFLOP per image, forward and backward
    assert re.search(r"^MFU: [\d.]+% of CPU, \d+ threads", text, re.M)
    assert 0 < float(re.search(r"^Muon step: ([\d.]+)% of the step time", text, re.M).group(1)) < 100
