"""CIFAR-10 to 94% test accuracy as fast as possible, with Muon: the CIFAR speedrun in one file.

    python train_cifar.py                       # 1 timed run (after an untimed warm-up on CUDA)
    python train_cifar.py --runs 25 --seed 1    # mean and std over 25 runs
    python train_cifar.py --device cpu --epochs 2 --data-dir /path/with/cifar-10-batches-py

Sections: config, data, augmentation, network, optimizer, training and evaluation, main.
"""
import argparse
import dataclasses
import json
import os
import pickle
import platform
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class UserError(Exception):
    """Bad input the user can fix (a missing or damaged file): reported as one line, no traceback."""


# ----------------------------------------------------------------------------- config

@dataclass
class Config:
    epochs: int = 8  # 25 steps each at batch 2000: 200 steps
    batch_size: int = 2000  # the last partial batch of an epoch is dropped
    widths: tuple = (64, 256, 256)  # the three conv groups
    whiten_eps: float = 5e-4  # added to the patch-covariance eigenvalues
    whiten_images: int = 5000  # training images whose 2x2 patches set the whitening filters
    whiten_bias_epochs: int = 3  # the whitening bias's lr decays to 0 over these epochs, then stays 0
    bn_momentum: float = 0.6  # running statistics keep this share of themselves at each batch
    bn_eps: float = 1e-12
    crop_pad: int = 2  # random crops of the reflect-padded image shift it by up to this much
    label_smoothing: float = 0.2
    muon_lr: float = 0.24  # conv filters
    muon_momentum: float = 0.6
    ns_steps: int = 3
    bias_lr: float = 0.053  # BatchNorm and whitening biases (Nesterov SGD)
    head_lr: float = 0.67
    sgd_momentum: float = 0.85
    weight_decay: float = 2e-6  # per sample: the SGD groups decay by lr x weight_decay x batch_size a step


MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # CIFAR-10 channel statistics


# ----------------------------------------------------------------------------- data

BATCHES_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCH = "test_batch"


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, numbers, bytes and numpy arrays, and refuses anything else, so a
    batch file cannot run code when it is read."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"),
               ("_codecs", "encode")}  # how protocol-2 pickles written by Python 3 store bytes

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def read_batch(path):
    """(images uint8 (N, 32, 32, 3), labels int64 (N,)) from one pickled CIFAR-10 batch."""
    if not path.is_file():
        raise UserError(f"{path}: missing (python data/cifar10.py --dir {path.parent.parent} downloads it)")
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, LookupError,
            MemoryError) as e:
        raise UserError(f"{path}: not a readable CIFAR-10 batch, truncated or corrupt ({e!r})") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise UserError(f"{path}: expected a dict with b'data' and b'labels'")
    data = batch[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", type(data).__name__)
        raise UserError(f"{path}: b'data' is {shape} {getattr(data, 'dtype', '')}, expected uint8 (N, 3072)")
    labels = batch[b"labels"]
    if not (isinstance(labels, list) and len(labels) == len(data)
            and all(type(label) is int and 0 <= label <= 9 for label in labels)):
        raise UserError(f"{path}: b'labels' should be a list of {len(data)} integers in 0..9")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.array(labels, dtype=np.int64)


def load_cifar10(data_dir):
    """The five training batches and the test batch from DIR/cifar-10-batches-py."""
    root = Path(data_dir) / BATCHES_DIR
    train = [read_batch(root / name) for name in TRAIN_BATCHES]
    test_images, test_labels = read_batch(root / TEST_BATCH)
    return (np.concatenate([b[0] for b in train]), np.concatenate([b[1] for b in train]),
            test_images, test_labels)


def to_device(images, device, dtype):
    """uint8 (N, 32, 32, 3) -> (N, 3, 32, 32) in [0, 1], channels-last, on the device, all at once.
    Untimed, like the record's loading; normalize() is left to the timed run."""
    x = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).to(dtype).div(255)
    return x.contiguous(memory_format=torch.channels_last)


def normalize(images):
    """(images - MEAN) / STD per channel, computed in the images' dtype (fp16 on CUDA) as the record's
    Normalize does; part of every timed run, as in the record."""
    mean, std = (torch.tensor(v, dtype=images.dtype, device=images.device).view(1, 3, 1, 1) for v in (MEAN, STD))
    return ((images - mean) / std).contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------- augmentation

def flips_for_epoch(first, epoch):
    """Epoch 0 flips a random half; every odd epoch flips the complement, so across any two
    consecutive epochs each image is seen both ways."""
    return first ^ bool(epoch % 2)


def random_crop(images, pad, generator):
    """Shift each image by up to `pad` pixels in each direction, filling from a reflect padding."""
    if pad == 0:
        return images
    n, size = len(images), images.size(-1)
    padded = F.pad(images, (pad,) * 4, mode="reflect")
    dy, dx = (torch.randint(0, 2 * pad + 1, (n,), device=images.device, generator=generator) for _ in range(2))
    out = torch.empty_like(images)
    for y in range(2 * pad + 1):  # one slice per offset: (2 pad + 1)^2 of them, not one per image
        for x in range(2 * pad + 1):
            sel = (dy == y) & (dx == x)
            out[sel] = padded[sel, :, y:y + size, x:x + size]
    return out


def epoch_batches(images, labels, first_flips, epoch, cfg, generator):
    """The shuffled, augmented batches of one epoch; the last partial batch is dropped."""
    flips = flips_for_epoch(first_flips, epoch).view(-1, 1, 1, 1)
    augmented = random_crop(torch.where(flips, images.flip(-1), images), cfg.crop_pad, generator)
    order = torch.randperm(len(images), device=images.device, generator=generator)
    for i in range(len(images) // cfg.batch_size):
        idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
        yield augmented[idx], labels[idx]


# ----------------------------------------------------------------------------- network

def whitening_filters(images, eps):
    """2x2 conv filters that whiten the 2x2 patches of `images`: the eigenvectors of the patch
    covariance (second moment: the images are normalised) scaled by 1/sqrt(eigenvalue + eps), and
    their negatives (24 filters for 3 channels)."""
    c = images.size(1)
    patches = images.float().unfold(2, 2, 1).unfold(3, 2, 1)  # (N, C, H-1, W-1, 2, 2)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * 4)
    eigenvalues, eigenvectors = torch.linalg.eigh(patches.T @ patches / len(patches))
    filters = (eigenvectors / (eigenvalues + eps).sqrt()).T.reshape(c * 4, c, 2, 2)
    return torch.cat((filters, -filters))


class BatchNorm(nn.BatchNorm2d):
    """BatchNorm with its scale frozen at 1: only the bias trains."""

    def __init__(self, width, cfg):
        super().__init__(width, momentum=1 - cfg.bn_momentum, eps=cfg.bn_eps)  # torch's momentum: the new share
        self.weight.requires_grad_(False)


def conv3x3(c_in, c_out):
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
    nn.init.dirac_(conv.weight[:c_in])  # the first c_in filters start as the identity
    return conv


class ConvGroup(nn.Module):
    def __init__(self, c_in, c_out, cfg):
        super().__init__()
        self.conv1, self.conv2 = conv3x3(c_in, c_out), conv3x3(c_out, c_out)
        self.norm1, self.norm2 = BatchNorm(c_out, cfg), BatchNorm(c_out, cfg)

    def forward(self, x):
        x = F.gelu(self.norm1(F.max_pool2d(self.conv1(x), 2)))
        return F.gelu(self.norm2(self.conv2(x)))


class Net(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.whiten = nn.Conv2d(3, 24, 2, bias=True)
        self.whiten.weight.requires_grad_(False)  # set from the data by init_whitening, then frozen
        widths = (24, *cfg.widths)
        self.groups = nn.Sequential(*(ConvGroup(a, b, cfg) for a, b in zip(widths, widths[1:])))
        self.head = nn.Linear(widths[-1], 10, bias=False)
        with torch.no_grad():
            self.head.weight /= self.head.weight.std()  # unit-std weights; the forward divides by the width

    def init_whitening(self, images, eps):
        self.whiten.weight.copy_(whitening_filters(images, eps))

    def forward(self, x):
        x = self.groups(F.gelu(self.whiten(x)))
        x = F.adaptive_max_pool2d(x, 1).flatten(1)
        return self.head(x) / x.size(1)  # logits divided by the width (256), with the head's large lr


# ----------------------------------------------------------------------------- optimizer

def newton_schulz(G, steps, dtype):
    """Approximately orthogonalise a matrix (U S V^T -> U S' V^T with S' near 1) by the quintic
    iteration of the Muon write-up."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.to(dtype)
    tall = X.size(0) > X.size(1)
    if tall:
        X = X.T
    X = X / (X.norm() + 1e-7)
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if tall else X


class Muon(torch.optim.Optimizer):
    """Muon for conv filters: Nesterov momentum, and the update orthogonalised as an (out, in*k*k)
    matrix. Before each step the filter bank is renormalised to norm sqrt(out), one unit per filter
    on average: the BatchNorm after every conv makes the weights' scale irrelevant to the function,
    so this keeps the effective step size what lr says."""

    def __init__(self, params, lr, momentum, ns_steps, ns_dtype):
        super().__init__(params, dict(lr=lr, momentum=momentum, ns_steps=ns_steps))
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            mu = group["momentum"]
            for p in group["params"]:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"].mul_(mu).add_(p.grad)
                update = newton_schulz(p.grad.add(buf, alpha=mu).flatten(1), group["ns_steps"], self.ns_dtype)
                p.mul_(p.size(0) ** 0.5 / p.norm())
                p.add_(update.view_as(p).to(p.dtype), alpha=-group["lr"])


def build_optimizers(model, cfg, device):
    convs = [p for group in model.groups for p in group.parameters() if p.ndim == 4]
    bn_biases = [m.bias for m in model.modules() if isinstance(m, BatchNorm)]
    decay = cfg.weight_decay * cfg.batch_size  # per step, with the summed loss
    groups = [dict(params=bn_biases, lr=cfg.bias_lr, name="bn_biases"),
              dict(params=[model.whiten.bias], lr=cfg.bias_lr, name="whiten_bias"),
              dict(params=[model.head.weight], lr=cfg.head_lr, name="head")]
    for g in groups:
        g["weight_decay"] = decay / g["lr"]  # SGD decays by lr x weight_decay
    sgd = torch.optim.SGD(groups, momentum=cfg.sgd_momentum, nesterov=True, fused=device.type == "cuda")
    muon = Muon(convs, lr=cfg.muon_lr, momentum=cfg.muon_momentum, ns_steps=cfg.ns_steps,
                ns_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    for opt in (sgd, muon):
        for g in opt.param_groups:
            g["initial_lr"] = g["lr"]
    return sgd, muon


def lr_factor(step, total, whiten_bias_steps, group):
    """Every rate falls linearly to 0 over the run; the whitening bias's over its own first epochs."""
    if group.get("name") == "whiten_bias":
        return max(0.0, 1 - step / whiten_bias_steps)
    return 1 - step / total


# ----------------------------------------------------------------------------- training and evaluation

def shift(images, dy, dx):
    """Translate by (dy, dx) pixels, filling from a 1-pixel reflect padding."""
    padded = F.pad(images, (1, 1, 1, 1), mode="reflect")
    size = images.size(-1)
    view = padded[..., 1 - dy:1 - dy + size, 1 - dx:1 - dx + size]
    return view.contiguous(memory_format=torch.channels_last)  # the layout the compiled model saw


@torch.no_grad()
def predict(model, images, batch_size=2000):
    """Test-time augmentation as in the record: mirror(v) averages the logits of v and of v flipped;
    the prediction is 1/2 mirror(x) + 1/4 mirror(shift(x, 1, 1)) + 1/4 mirror(shift(x, -1, -1)).
    The shifted views are flipped after shifting, so the six views are not closed under flipping
    and the prediction is not exactly invariant to flipping the input."""
    model.eval()

    def mirror(view):
        return 0.5 * model(view) + 0.5 * model(view.flip(-1))  # flip keeps the channels-last layout
    out = []
    for x in images.split(batch_size):
        logits = 0.5 * mirror(x) + 0.25 * (mirror(shift(x, 1, 1)) + mirror(shift(x, -1, -1)))
        out.append(logits.float())
    model.train()
    return torch.cat(out)


def loss_fn(logits, labels, cfg):
    """Summed cross-entropy in fp32 with the record's label smoothing: the target puts
    1 - label_smoothing + label_smoothing / 10 on the label and label_smoothing / 10 on every class."""
    return F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing, reduction="sum")


def build_model(cfg, device):
    model = Net(cfg).to(device, memory_format=torch.channels_last)  # faster convs on GPU and CPU alike
    if device.type == "cuda":  # fp16 activations and weights, BatchNorm kept in fp32
        model = model.half()
        for m in model.modules():
            if isinstance(m, BatchNorm):
                m.float()
    return model


def train_run(cfg, data, device, seed, model=None, run_model=None):
    """One training run from scratch on images from to_device (in [0, 1], not yet normalised); return
    (test accuracy, seconds, per-epoch stats).

    The time covers everything after the data is on the device, as the record's does: normalising
    the train and test images, whitening set-up, training and the final test-time-augmented
    evaluation. Given a model and its compiled form (CUDA), the run loads fresh initial weights into
    them, so every run reuses the code compiled once."""
    raw_train_x, train_y, raw_test_x, test_y = data
    torch.manual_seed(seed)
    generator = torch.Generator(device=device).manual_seed(seed)
    fresh = build_model(cfg, device)
    if model is None:
        model = run_model = fresh
    else:
        model.load_state_dict(fresh.state_dict())
    sgd, muon = build_optimizers(model, cfg, device)
    steps_per_epoch = len(raw_train_x) // cfg.batch_size
    total = cfg.epochs * steps_per_epoch
    whiten_bias_steps = cfg.whiten_bias_epochs * steps_per_epoch
    if total == 0:
        raise UserError(f"{len(raw_train_x)} training images make no batch of {cfg.batch_size}")

    sync(device)
    start = time.perf_counter()
    train_x = normalize(raw_train_x)  # inside the clock: the record times its normalisation too
    model.init_whitening(train_x[:cfg.whiten_images], cfg.whiten_eps)
    first_flips = torch.rand(len(train_x), device=device, generator=generator) < 0.5
    stats, step = [], 0
    for epoch in range(cfg.epochs):
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        for x, y in epoch_batches(train_x, train_y, first_flips, epoch, cfg, generator):
            for opt in (sgd, muon):
                for g in opt.param_groups:
                    g["lr"] = g["initial_lr"] * lr_factor(step, total, whiten_bias_steps, g)
            logits = run_model(x)
            loss = loss_fn(logits, y, cfg)
            loss.backward()
            sgd.step()
            muon.step()
            model.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
            correct += (logits.argmax(1) == y).sum()
            step += 1
        stats.append((loss_sum, correct))  # read after the clock stops: no sync inside the run
    accuracy = (predict(run_model, normalize(raw_test_x)).argmax(1) == test_y).float().mean()
    sync(device)
    seconds = time.perf_counter() - start
    n = steps_per_epoch * cfg.batch_size
    epochs = [(loss.item() / n, c.item() / n) for loss, c in stats]
    return accuracy.item(), seconds, epochs


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- main

SEPARATOR = "=" * 100


def environment_report(device):
    lines = [f"python {platform.python_version()}  torch {torch.__version__}  cuda {torch.version.cuda or 'none'}"]
    if device.type == "cuda":
        try:
            lines.append(subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout)
        except (OSError, subprocess.TimeoutExpired) as e:
            lines.append(f"nvidia-smi unavailable: {e}")
    else:
        model = platform.processor() or platform.machine()
        if os.path.exists("/proc/cpuinfo"):
            with open("/proc/cpuinfo") as f:
                names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
            model = names[0] if names else model
        lines.append(f"cpu: {model}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    return "\n".join(lines)


def start_log(log_dir, header, device, sources=("train_cifar.py",)):
    """log(text, echo=True), appending to <log_dir>/<date>_<id>/log.txt (log.path), which begins as every
    log of this repository does: the source that runs (each file after the first opened by a line of 100
    '-' and "file: NAME"), versions and hardware, then the header as JSON, each after a line of 100 '='."""
    path = Path(log_dir) / (time.strftime("%Y-%m-%d_%H%M%S") + "_" + uuid.uuid4().hex[:8]) / "log.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"log: {path}", flush=True)

    def log(text, echo=True):
        if echo:
            print(text, flush=True)
        with open(path, "a") as f:
            f.write(text + "\n")
    log.path = path
    here = Path(__file__).resolve().parent
    texts = [(here / name).read_text().rstrip("\n") for name in sources]
    log("\n".join([texts[0], *(f"{'-' * 100}\nfile: {name}\n{text}" for name, text in zip(sources[1:], texts[1:]))]),
        echo=False)
    for text in (environment_report(device), json.dumps(header, indent=2)):
        log(SEPARATOR, echo=False)
        log(text)
    log(SEPARATOR, echo=False)
    return log


def positive(text):
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=positive, default=1, help="timed runs; mean and std are reported")
    parser.add_argument("--epochs", type=positive, default=Config.epochs)
    parser.add_argument("--batch-size", type=positive, default=Config.batch_size,
                        help="lower it for small GPUs or few images; the record uses 2000")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0, help="run k uses seed + k")
    parser.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parent / "data" / "cifar10",
                        help=f"the folder holding {BATCHES_DIR}/")
    parser.add_argument("--log-dir", type=Path, default=Path("logs") / "cifar")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = Config(epochs=args.epochs, batch_size=args.batch_size)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 1
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest convolutions
    log = start_log(args.log_dir, {"device": str(device), "argv": sys.argv if argv is None else [sys.argv[0], *argv],
                                   "runs": args.runs, "seed": args.seed, "data_dir": str(args.data_dir),
                                   "config": dataclasses.asdict(cfg)}, device)
    try:
        run_all(args, cfg, device, log)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        log(f"error: {e}", echo=False)
        return 1
    print(f"log: {log.path}", flush=True)
    return 0


def run_all(args, cfg, device, log):
    """Load the data once (to the device, in [0, 1]; each run normalises it inside its clock), then the
    warm-up (CUDA) and the timed runs; log each and the summary."""
    images = load_cifar10(args.data_dir)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    data = (to_device(images[0], device, dtype), torch.from_numpy(images[1]).to(device),
            to_device(images[2], device, dtype), torch.from_numpy(images[3]).to(device))
    log(f"data: {len(images[0])} train and {len(images[2])} test images from {args.data_dir / BATCHES_DIR}")

    model = run_model = None
    if device.type == "cuda":  # compile in an untimed warm-up run; the timed runs reuse its code
        model = build_model(cfg, device)
        run_model = torch.compile(model)
        accuracy, seconds, _ = train_run(cfg, data, device, args.seed - 1, model, run_model)
        log(f"warm-up run (untimed, compiles): test_acc:{accuracy:.4f} time:{seconds:.2f}s")
    results = []
    for k in range(args.runs):
        accuracy, seconds, epochs = train_run(cfg, data, device, args.seed + k, model, run_model)
        for e, (loss, acc) in enumerate(epochs, 1):
            log(f"run:{k + 1}/{args.runs} epoch:{e}/{cfg.epochs} train_loss:{loss:.4f} train_acc:{acc:.4f}")
        log(f"run:{k + 1}/{args.runs} test_acc:{accuracy:.4f} time:{seconds:.3f}s")
        results.append((accuracy, seconds))
    accs, times = [r[0] for r in results], [r[1] for r in results]
    std = statistics.stdev(accs) if len(accs) > 1 else 0.0
    log(f"runs:{len(results)} test_acc_mean:{statistics.mean(accs):.4f} test_acc_std:{std:.4f} "
        f"time_mean:{statistics.mean(times):.3f}s")
    if device.type == "cuda":
        log(f"peak memory allocated: {torch.cuda.max_memory_allocated() // 2**20} MiB")


if __name__ == "__main__":
    sys.exit(main())
