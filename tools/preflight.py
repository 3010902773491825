"""Preflight: a node proves in minutes that it can run a preset, before the expensive run starts.

    ./run.sh preflight [--preset NAME] [--no-data] [--key=value ...]

It launches as ./run.sh does (torchrun on every local GPU, several nodes through NNODES, NODE_RANK and
MASTER_ADDR; one process without GPUs), runs every check below and keeps going when one fails, then
prints one table: PASS, WARN, FAIL or SKIP with a one-line reason each. logs/preflight/<date>_<id>/log.txt
holds the table and every check's details after the usual header (source, versions and hardware, config).
It exits with 1 when a check fails.

  environment  versions against the pinned torch; GPUs and processes; how the batch splits over them
  data         the train shards (count, headers, enough tokens), the val shard, disk for checkpoints
  numerics     compiled FlexAttention against dense SDPA, forward and backward; the Triton Gram kernel
               against torch's matmul; Newton-Schulz's singular values; a small model on both paths
  collectives  all-reduce and all-gather bus bandwidth at the sizes training uses
  step         the preset built as training builds it: compile time, step time, tokens/s, MFU, peak
               memory, a finite loss that falls on a repeated batch, the whole run's projected time
  checkpoint   the real model's checkpoint saved and read back identical, and its write time

Without CUDA the checks that need it are skipped with the reason, and the step checks run only for a
preset small enough for the CPU.
"""
import dataclasses
import gc
import glob
import json
import math
import os
import shutil
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

import kernels
import train_gpt
from tools import perf
from train_gpt import UserError

ROOT = Path(__file__).resolve().parent.parent
SOURCES = (*train_gpt.SOURCES, "tools/preflight.py", "tools/perf.py")
OLDEST_TORCH = (2, 11)  # the oldest torch this code is tested on (README: supported versions)
TIMED_STEPS = 20
# Published train times of the presets that have one, beside which the projection is shown.
PUBLISHED = {
    "gpt2-speedrun": "the Nov-2024 record: 301.8 s on 8x H100 (1875 steps of 161.8 ms)",
    "cpu-shakespeare": "this repository's CPU record: 8.26 s on a 2-core Intel Xeon (records/cpu/2026-12-02_NorMuonMTP)",
}
RANK_ORDER = {"FAIL": 3, "WARN": 2, "PASS": 1, "SKIP": 0}  # the outcome of a check over ranks: the worst


class Outcome(Exception):
    """Ends a check early with a status and its reason."""

    def __init__(self, status, reason):
        super().__init__(reason)
        self.status, self.reason = status, reason


def gib(n_bytes):
    return f"{n_bytes / 2**30:.1f} GiB"


def size(n_bytes):
    return f"{n_bytes / 1e9:.2f} GB" if n_bytes >= 1e8 else f"{n_bytes / 1e6:.1f} MB"


def divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def pinned_torch():
    """The torch version requirements.txt pins, or None."""
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        if line.startswith("torch=="):
            return line.split("==", 1)[1].strip()
    return None


def driver_version():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.split()
        return out[0] if out else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (no nvidia-smi)"


def check_digests(files, details):
    """Compare each shard's SHA-256 with the one data/cached_fineweb10B.py recorded in its folder's
    manifest.json when it checked the download against the hub; shards without one are noted."""
    for path in files:
        manifest = Path(path).parent / "manifest.json"
        try:
            recorded = json.loads(manifest.read_text()).get(Path(path).name)
        except (OSError, ValueError):
            recorded = None
        if recorded is None:
            details.append(f"{path}: no SHA-256 recorded in {manifest}: its content is not checked")
            continue
        digest = train_gpt.file_sha256(path)
        if digest != recorded:
            raise train_gpt.bad_shard(path, f"SHA-256 {digest} differs from the hub's {recorded}, "
                                            f"recorded in {manifest} at download: damaged since")
        details.append(f"{path}: SHA-256 matches the hub's")


def fetch_command(cfg):
    """The command that makes the shards cfg reads."""
    if "fineweb10B" in cfg.train_files:
        return f"python data/cached_fineweb10B.py {min(103, train_gpt.shards_to_read(cfg))}"
    if "shakespeare" in cfg.train_files:
        return "python data/tinyshakespeare.py"
    return "a script in data/ (README: Data)"


def bits(t):
    """A tensor's bytes, so that equal means bit for bit equal (NaNs included)."""
    return t.detach().reshape(-1).view(torch.uint8)


def max_error(x, reference):
    """The largest absolute difference, relative to the reference's largest magnitude."""
    return ((x.double() - reference.double()).abs().max() / reference.double().abs().max().clamp_min(1e-30)).item()


def with_spectrum(shape, singular_values, device, generator):
    """Matrices U diag(s) V^T with random orthonormal U and V, one per leading index of shape."""
    *batch, rows, cols = shape
    U = torch.linalg.qr(torch.randn(*batch, rows, len(singular_values), generator=generator))[0]
    V = torch.linalg.qr(torch.randn(*batch, cols, len(singular_values), generator=generator))[0]
    return (U * singular_values @ V.mT).to(device)


def block_matrix_shapes(cfg):
    """The distinct shapes of the matrices Muon orthogonalises, and how many of each (built on meta)."""
    with torch.device("meta"):
        model = train_gpt.GPT(cfg)
    shapes = {}
    for p in model.blocks.parameters():
        if p.ndim == 2:
            shapes[tuple(p.shape)] = shapes.get(tuple(p.shape), 0) + 1
    return shapes, model


class Preflight:
    def __init__(self, cfg, preset, log, rank, world_size, device, use_data=True, timed_steps=TIMED_STEPS):
        self.cfg, self.preset, self.log = cfg, preset, log
        self.rank, self.world_size, self.device = rank, world_size, device
        self.use_data, self.timed_steps = use_data, timed_steps
        self.on_gpu = device.type == "cuda"
        self.dtype = getattr(torch, cfg.dtype) if self.on_gpu else torch.float32
        self.results = []  # (section, name, status, reason)
        self.batch_ok = False
        self.step = None  # what the real step measured, for the checks after it
        self.node_group = None  # the processes of this node, when there are several nodes
        self.shapes, self.meta_model = block_matrix_shapes(cfg)  # the preset's model, built on meta once
        self.run_dir = log.path.parent if log.path else None

    # ------------------------------------------------------------------------- running checks

    def check(self, section, name, fn):
        """Run fn() -> (status, reason), or its Outcome, on every rank; an error is a FAIL with the
        traceback in the log. The ranks' outcomes are combined: the worst one counts, named by rank."""
        details, started = [], time.perf_counter()
        try:
            status, reason = fn(details)
        except Outcome as o:
            status, reason = o.status, o.reason
        except UserError as e:
            status, reason = "FAIL", str(e)
        except Exception as e:
            status, reason = "FAIL", f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
            details.append(traceback.format_exc())
        if dist.is_initialized():
            everyone = [None] * self.world_size
            dist.all_gather_object(everyone, (status, reason))
            worst = max(range(self.world_size), key=lambda r: (RANK_ORDER[everyone[r][0]], -r))
            status, reason = everyone[worst]
            if worst:
                reason = f"rank {worst}: {reason}"
        seconds = time.perf_counter() - started
        self.results.append((section, name, status, reason))
        self.log(f"[{len(self.results):2d}] {status:<4}  {section} / {name}: {reason}  ({seconds:.1f} s)")
        for text in details:
            self.log(f"    {text}".replace("\n", "\n    ").rstrip(), echo=False)
        return status

    def run(self):
        cfg = self.cfg
        checks = [
            ("environment", "versions", self.versions),
            ("environment", "hardware", self.hardware),
            ("environment", "batch split", self.batch_split),
            ("data", "train shards", self.train_shards),
            ("data", "val shard", self.val_shard),
            ("data", "disk for checkpoints", self.disk),
            ("numerics", "attention paths", self.attention),
            ("numerics", "Triton Gram kernel", self.gram_kernel),
            ("numerics", "Newton-Schulz", self.newton_schulz),
            ("numerics", "small model, both paths", self.small_model),
            ("collectives", "all-reduce", lambda d: self.bandwidth(d, "all-reduce")),
            ("collectives", "all-gather", lambda d: self.bandwidth(d, "all-gather")),
            ("step", "build and compile", self.build_and_compile),
            ("step", "step time", self.step_time),
            ("step", "memory", self.memory),
            ("step", "loss", self.loss),
            ("step", f"projected {cfg.steps} steps", self.projection),
            ("checkpoint", "round trip", self.checkpoint),
        ]
        with warnings.catch_warnings():  # eager FlexAttention on the CPU warns at every call that it is unfused
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile")
            for section, name, fn in checks:
                self.check(section, name, fn)
        return self.results

    def table(self):
        width = max(len(f"{s} / {n}") for s, n, _, _ in self.results)
        lines = [f"{'check':<{width}}  status  reason"]
        lines += [f"{f'{s} / {n}':<{width}}  {status:<6}  {reason}" for s, n, status, reason in self.results]
        counts = {k: sum(r[2] == k for r in self.results) for k in RANK_ORDER}
        summary = ", ".join(f"{counts[k]} {k}" for k in ("PASS", "WARN", "FAIL", "SKIP"))
        lines.append(f"{len(self.results)} checks: {summary}")
        return "\n".join(lines)

    # ------------------------------------------------------------------------- environment

    def versions(self, details):
        have, pinned = torch.__version__.split("+")[0], pinned_torch()
        triton = kernels.triton.__version__ if kernels.triton else None
        parts = [f"torch {torch.__version__}"]
        if self.on_gpu:
            parts += [f"CUDA {torch.version.cuda}", f"driver {driver_version()}",
                      f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}"]
        parts.append(f"Triton {triton or 'not installed'}")
        found = ", ".join(parts)
        details.append(train_gpt.versions())
        release = tuple(int(x) for x in have.split(".")[:2])
        if release < OLDEST_TORCH:
            return "FAIL", f"{found}: this code needs torch {'.'.join(map(str, OLDEST_TORCH))} or newer"
        if self.on_gpu and not triton:
            return "FAIL", f"{found}: torch.compile needs Triton on CUDA"
        if have != pinned:
            return "WARN", (f"{found}; not the pinned {pinned}: records were timed with {pinned}'s compiler and "
                            f"kernels, so times and the last digits of losses may differ (tested on 2.11 and up)")
        return "PASS", f"{found} (the pinned torch)"

    def hardware(self, details):
        local = int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))
        nodes = max(1, self.world_size // local)
        if not self.on_gpu:
            info = train_gpt.cpu_info()
            return "PASS", (f"{self.world_size} process(es) on the CPU: {info.get('model name', 'unknown')}, "
                            f"{os.cpu_count()} cores, {gib(perf.memory_capacity(self.device))} of RAM")
        mine = (torch.cuda.get_device_name(self.device), perf.memory_capacity(self.device))
        everyone = [mine]
        if self.world_size > 1:
            everyone = [None] * self.world_size
            dist.all_gather_object(everyone, mine)
        models = sorted(set(everyone))
        details.extend(f"rank {r}: {name}, {gib(memory)}" for r, (name, memory) in enumerate(everyone))
        cards = " + ".join(f"{sum(e == m for e in everyone)}x {m[0]} ({gib(m[1])})" for m in models)
        found = (f"{self.world_size} processes on {nodes} node(s): {cards}; {torch.cuda.device_count()} GPU(s) on "
                 f"this node")
        if local > torch.cuda.device_count():
            return "WARN", f"{found}: {local} processes per node share them"
        if len(models) > 1:
            return "WARN", f"{found}: different cards, the slowest sets the pace"
        return "PASS", found

    def batch_split(self, details):
        cfg, w = self.cfg, self.world_size
        b, m = cfg.batch_size, cfg.micro_batch_size
        if b % (m * w):
            hints = []
            if b % w == 0:
                hints.append("--micro_batch_size=" + " or ".join(map(str, divisors(b // w))) + f" divides it over {w}")
            counts = [n for n in divisors(b // m)] if b % m == 0 else []
            if counts:
                hints.append(f"with micro_batch_size {m}, run on {' or '.join(map(str, counts))} processes in all")
            raise Outcome("FAIL", f"batch_size {b} is not a multiple of micro_batch_size {m} x {w} processes: "
                                  + ("; ".join(hints) or "change batch_size (which changes the recipe)"))
        train_gpt.validate(cfg, w)
        self.batch_ok = True
        return "PASS", (f"batch_size {b} = micro_batch_size {m} x {w} processes x {b // (m * w)} accumulation "
                        f"step(s); {b * cfg.seq_len:,} tokens a step")

    # ------------------------------------------------------------------------- data

    def no_data(self):
        if not self.use_data:
            raise Outcome("SKIP", "--no-data")

    def train_shards(self, details):
        self.no_data()
        cfg = self.cfg
        files = sorted(glob.glob(cfg.train_files))
        if not files:
            raise Outcome("FAIL", f"no shard matches {cfg.train_files!r}: `{fetch_command(cfg)}` fetches them")
        span = cfg.batch_size * cfg.seq_len
        usable = 0
        for path in files:
            n = train_gpt.read_header(path)
            details.append(f"{path}: {n:,} tokens")
            if n < span + 1:
                raise Outcome("FAIL", f"{path}: {n:,} tokens, but one step reads {span + 1:,}")
            usable += (n - 1) // span * span
        train_gpt.read_shard(files[0], cfg.vocab_size)  # the others are checked as the loader reaches them
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:  # one pass a node over the shards the run reads
            check_digests(files[:train_gpt.shards_to_read(cfg)], details)
        reads = cfg.steps * span
        found = (f"{len(files)} shard(s) with good headers, {usable:,} tokens before the stream wraps; the run "
                 f"reads {reads:,}")
        if reads > usable:
            return "WARN", (f"{found}: it would wrap and see tokens twice; `{fetch_command(cfg)}` fetches the "
                            f"{train_gpt.shards_to_read(cfg)} shards of 100M tokens it reads")
        return "PASS", found

    def val_shard(self, details):
        self.no_data()
        cfg = self.cfg
        if not glob.glob(cfg.val_files):
            raise Outcome("FAIL", f"no shard matches {cfg.val_files!r}: `{fetch_command(cfg)}` fetches it")
        tokens = train_gpt.load_val_tokens(cfg)
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:
            check_digests(sorted(glob.glob(cfg.val_files)), details)
        return "PASS", f"{len(tokens) - 1:,} targets from {cfg.val_files}"

    def disk(self, details):
        cfg = self.cfg
        if not cfg.save_every:
            raise Outcome("SKIP", "no --save_every: the run writes no checkpoint")
        params = sum(p.numel() for p in self.meta_model.parameters())
        matrices = sum(r * c * n for (r, c), n in self.shapes.items())
        adam = params - matrices if cfg.optimizer == "muon" else params
        n_bytes = 4 * params + 8 * adam + 4 * (params - adam)  # fp32 weights, Adam's two moments, Muon's momentum
        where = Path(cfg.log_dir).resolve()
        while not where.exists():
            where = where.parent
        free = shutil.disk_usage(where).free
        found = (f"{size(free)} free under {where}; a checkpoint takes about {size(n_bytes)}, and the next one is "
                 f"written before the previous one is deleted")
        return ("FAIL" if free < 2 * n_bytes else "PASS"), found

    # ------------------------------------------------------------------------- numerics

    def attention(self, details):
        """FlexAttention with the model's block mask against SDPA with the same mask evaluated densely,
        both against a float32 dense reference: documents and a window that cross 128-token blocks."""
        cfg, device = self.cfg, self.device
        g = torch.Generator().manual_seed(0)
        T, window, eot = 1024, 300, 0
        tokens = torch.randint(1, 50, (2, T), generator=g)
        tokens[0, [5, 200, 201, 640, 900]] = eot
        tokens[1, [130, 700]] = eot
        tokens = tokens.to(device)
        q, k, v, grad = (torch.randn(2, 4, T, cfg.head_dim, generator=g).to(device) for _ in range(4))
        dense_mask = train_gpt.attention_mask(tokens, eot, window, flex=False)
        block_mask = train_gpt.attention_mask(tokens, eot, window, flex=True)
        flex = torch.compile(train_gpt.attend) if self.on_gpu else train_gpt.attend  # eager on CPU: forward only

        def run(fn, mask, dtype, backward):
            inputs = [t.to(dtype).requires_grad_(backward) for t in (q, k, v)]
            out = fn(*inputs, mask)
            if not backward:
                return [out.detach()]
            out.backward(grad.to(dtype))
            return [out.detach()] + [t.grad for t in inputs]
        backward = self.on_gpu
        reference = run(train_gpt.attend, dense_mask, torch.float32, backward)
        dense = run(train_gpt.attend, dense_mask, self.dtype, backward)
        flexed = run(flex, block_mask, self.dtype, backward)
        return self.compare(details, ["output", "dq", "dk", "dv"], flexed, dense, reference,
                            "compiled FlexAttention" if self.on_gpu else "FlexAttention (eager)",
                            "" if backward else "; backward: FlexAttention has none on the CPU")

    def compare(self, details, names, candidate, baseline, reference, what, note=""):
        """PASS when the candidate is as close to the reference as the dense path in the run's dtype
        (within 2x, or one bf16 ulp), else FAIL; the errors in the reason."""
        floor = 2 ** -8 if self.dtype != torch.float32 else 1e-5
        worst = []
        for name, c, b, r in zip(names, candidate, baseline, reference):
            c_err, b_err = max_error(c, r), max_error(b, r)
            details.append(f"{name}: {what} {c_err:.2e}, dense {b_err:.2e} (max error relative to fp32)")
            if c_err > max(2 * b_err, floor):
                worst.append(f"{name} {c_err:.1e} against the dense path's {b_err:.1e}")
        dtype = str(self.dtype).removeprefix("torch.")
        if worst:
            return "FAIL", f"{what} in {dtype} is off: " + ", ".join(worst)
        errors = ", ".join(f"{n} {max_error(c, r):.1e}" for n, c, r in zip(names, candidate, reference))
        return "PASS", f"{what} in {dtype} agrees with dense SDPA (errors vs fp32: {errors}){note}"

    def gram_kernel(self, details):
        if not self.on_gpu:
            raise Outcome("SKIP", "CUDA only (tests/test_triton.py runs the kernel under Triton's interpreter)")
        if not self.cfg.muon_triton:
            raise Outcome("SKIP", "--muon_triton=false: Newton-Schulz uses torch's matmul")
        g = torch.Generator().manual_seed(0)
        problems, errors = [], []
        for rows, cols in self.shapes:
            X = torch.randn(2, min(rows, cols), max(rows, cols), generator=g).to(self.device)
            X = (X / X.norm(dim=(-2, -1), keepdim=True)).to(self.dtype)  # as Newton-Schulz feeds it
            A = kernels.gram(X)
            if kernels.failed:
                return "WARN", (f"the kernel failed on this card ({kernels.failed[0]}); training falls back to "
                                f"torch's matmul, which is slower")
            exact = X.double() @ X.double().mT
            kernel_err, torch_err = max_error(A, exact), max_error(X @ X.mT, exact)
            errors.append(kernel_err)
            details.append(f"{tuple(X.shape)}: kernel {kernel_err:.2e}, torch {torch_err:.2e} relative error")
            if kernel_err > max(2 * torch_err, 2 ** -8):
                problems.append(f"{tuple(X.shape)} error {kernel_err:.1e} against torch's {torch_err:.1e}")
            if not torch.equal(A, A.mT):
                problems.append(f"{tuple(X.shape)} not symmetric")
        if problems:
            return "FAIL", "the kernel is off: " + "; ".join(problems)
        return "PASS", (f"X X^T of the preset's {len(errors)} matrix shapes as torch's matmul computes it (max "
                        f"relative error {max(errors):.1e}), exactly symmetric")

    def newton_schulz(self, details):
        """Inputs whose singular values span a decade come out with all of them in the band that tests/
        test_muon.py checks; on CUDA the products go through the kernel, as in training."""
        cfg = self.cfg
        g = torch.Generator().manual_seed(0)
        low, high = [], []
        for rows, cols in self.shapes:
            G = with_spectrum((2, rows, cols), torch.logspace(0, -1, min(rows, cols)), self.device, g)
            O = train_gpt.newton_schulz(G, cfg.ns_steps, self.dtype, cfg.muon_triton)
            s = torch.linalg.svdvals(O.float())
            low.append(s.min().item())
            high.append(s.max().item())
            details.append(f"{rows}x{cols}: singular values in [{low[-1]:.3f}, {high[-1]:.3f}]")
        found = (f"{cfg.ns_steps} steps in {str(self.dtype).removeprefix('torch.')}: singular values in "
                 f"[{min(low):.3f}, {max(high):.3f}]")
        if min(low) < 0.6 or max(high) > 1.25:
            return "FAIL", f"{found}, outside [0.6, 1.25]"
        return "PASS", f"{found}, inside [0.6, 1.25]"

    def small_model(self, details):
        """Per-token losses of a 2-layer model of the preset's width on 1024 tokens with documents and a
        window crossing blocks: FlexAttention (compiled on CUDA) against the dense path."""
        cfg = dataclasses.replace(self.cfg, n_layer=2, seq_len=1024, window=300,
                                  eot_token=max(self.cfg.eot_token, 0), dtype=str(self.dtype).removeprefix("torch."))
        torch.manual_seed(0)
        model = train_gpt.GPT(cfg).to(self.device)
        with torch.no_grad():
            for p in model.parameters():  # zero-initialised projections and head would hide the attention
                if p.ndim == 2:
                    p.normal_(std=p.size(-1) ** -0.5)
        g = torch.Generator().manual_seed(1)
        tokens = torch.randint(1, min(cfg.vocab_size, 1000), (2, 1025), generator=g)
        tokens[0, [5, 200, 640]] = tokens[1, [130, 700]] = cfg.eot_token
        x, y = tokens[:, :-1].to(self.device), tokens[:, 1:].to(self.device)
        with torch.no_grad():
            dense = model(x, y, reduction="none", flex=False)
            model.flex = True
            flexed = (torch.compile(model) if self.on_gpu else model)(x, y, reduction="none")
            model.flex = False
            model.dtype = torch.float32
            reference = model(x, y, reduction="none", flex=False)
        return self.compare(details, ["per-token loss"], [flexed], [dense], [reference],
                            "the FlexAttention path" + (" (compiled)" if self.on_gpu else " (eager)"))

    # ------------------------------------------------------------------------- collectives

    def bandwidth(self, details, op):
        """Bus bandwidth (nccl-tests' definition) at training's sizes: DDP's 25 MiB gradient buckets for the
        all-reduce; each Muon group's gathered updates for the all-gather. Over the node's processes, and
        over all of them when there are several nodes."""
        cfg, w = self.cfg, self.world_size
        if w == 1:
            raise Outcome("SKIP", "one process: nothing to exchange")
        local = int(os.environ.get("LOCAL_WORLD_SIZE", w))
        groups = [("all processes", None, w)]
        if local < w:  # every rank makes every subgroup, once; each measures its own node's
            if self.node_group is None:
                self.node_group = dist.new_subgroups(group_size=local)[0]
            groups.insert(0, ("one node", self.node_group, local))
        if op == "all-reduce":
            sizes = [(25 * 2**20, torch.float32, "a DDP bucket of fp32 gradients")]
        else:
            dtype = getattr(torch, cfg.dtype)
            share = lambda n: -(-n // w)  # noqa: E731  Muon pads each group to a multiple of the processes
            sizes = [(share(n) * w * r * c * dtype.itemsize, dtype, f"Muon's {n} matrices of {r}x{c}")
                     for (r, c), n in self.shapes.items()]
        figures = []
        for name, group, n in groups:
            for n_bytes, dtype, what in sizes:
                busbw = self.bus_bandwidth(op, n_bytes, dtype, group, n)
                details.append(f"{op} over {name} ({n}), {n_bytes / 2**20:.1f} MiB ({what}): {busbw / 1e9:.1f} GB/s")
                figures.append((name, n_bytes, busbw))
        shown = "; ".join(f"{busbw / 1e9:.1f} GB/s at {n_bytes / 2**20:.1f} MiB over {name}"
                          for name, n_bytes, busbw in figures)
        return "PASS", f"bus bandwidth {shown}"

    def bus_bandwidth(self, op, n_bytes, dtype, group, n, iters=10):
        """Bytes per second on the bus: all-reduce moves 2 (n-1)/n of the buffer per rank, all-gather
        (n-1)/n of its output. The slowest rank's time counts."""
        numel = n_bytes // dtype.itemsize
        if op == "all-reduce":
            buf = torch.ones(numel, dtype=dtype, device=self.device)
            call = lambda: dist.all_reduce(buf, group=group)  # noqa: E731
            factor = 2 * (n - 1) / n
        else:
            out = torch.empty(numel - numel % n, dtype=dtype, device=self.device)
            mine = torch.ones(out.numel() // n, dtype=dtype, device=self.device)
            call = lambda: train_gpt.all_gather_single(out, mine, group=group)  # noqa: E731
            factor = (n - 1) / n
        for _ in range(2):
            call()
        dist.barrier()
        seconds = perf.time_steps(lambda i: call(), iters, self.device) / iters
        slowest = torch.tensor(seconds, dtype=torch.float64, device=self.device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        return n_bytes * factor / slowest.item()

    # ------------------------------------------------------------------------- the real step

    def too_big_for_the_cpu(self):
        """The estimated seconds of one step on this CPU at 30% of its peak, when that is over two minutes."""
        if self.on_gpu:
            return None
        cfg = self.cfg
        peak = perf.peak_flops(self.device, cfg.dtype)[0] or 1e11
        seconds = perf.flops_per_token(cfg) * cfg.batch_size * cfg.seq_len / self.world_size / (0.3 * peak)
        return seconds if seconds > 120 else None

    def attempt(self, cfg):
        """Build cfg's model as training does, compile it in a first step on random tokens, then time
        timed_steps more on the same batch."""
        torch._dynamo.reset()  # compile from scratch, as a run does
        gc.collect()
        if self.on_gpu:
            torch.cuda.empty_cache()
        perf.reset_peak_memory(self.device)
        torch.manual_seed(cfg.seed)
        started = time.perf_counter()
        raw_model, model, ddp_model, optimizers = train_gpt.build(cfg, self.rank, self.world_size, self.device)
        batches = train_gpt.random_batches(cfg, self.world_size, self.device)
        losses = []

        def step(i):  # the schedules at step i (short test configs stop at their last step)
            losses.append(train_gpt.train_step(min(i, cfg.steps - 1), batches, cfg, ddp_model, optimizers,
                                               self.world_size)[0])
        compile_s = perf.time_steps(step, 1, self.device) + perf.time_steps(lambda i: step(1), 1, self.device)
        build_s = time.perf_counter() - started
        step_s = perf.time_steps(lambda i: step(2 + i), self.timed_steps, self.device) / self.timed_steps
        return dict(cfg=cfg, raw_model=raw_model, optimizers=optimizers, losses=losses, compile_s=compile_s,
                    build_s=build_s, step_s=step_s, memory=perf.peak_memory(self.device))

    def fitting(self, cfg):
        """attempt(cfg), or None when it runs out of memory. The attempt's tensors are freed on leaving the
        except clause (its traceback holds them), before any other attempt starts."""
        try:
            return self.attempt(cfg)
        except torch.cuda.OutOfMemoryError:
            return None

    def build_and_compile(self, details):
        if not self.batch_ok:
            raise Outcome("SKIP", "the batch does not split over these processes")
        cpu_seconds = self.too_big_for_the_cpu()
        if cpu_seconds:
            raise Outcome("SKIP", f"one step of {self.preset} would take about {cpu_seconds / 60:.0f} min on this CPU: "
                                  f"the step checks need the GPUs it is meant for")
        cfg = self.cfg
        self.step = self.fitting(cfg)
        if self.step is None:
            capacity = gib(perf.memory_capacity(self.device))
            smaller = [m for m in divisors(cfg.batch_size // self.world_size) if m < cfg.micro_batch_size]
            for m in reversed(smaller):  # the largest micro-batch that fits
                fits = self.fitting(dataclasses.replace(cfg, micro_batch_size=m))
                if fits:  # the later checks stay skipped: they are of the configuration asked for
                    raise Outcome("FAIL", f"out of memory at micro_batch_size {cfg.micro_batch_size} ({capacity} "
                                          f"cards); --micro_batch_size={m} fits (peak {gib(fits['memory'][0])}), with "
                                          f"the same updates")
            raise Outcome("FAIL", f"out of memory at micro_batch_size {cfg.micro_batch_size} ({capacity} cards), and "
                                  f"no smaller micro-batch fits: this preset needs cards with more memory")
        s = self.step
        if not cfg.compile:
            return "PASS", (f"built as training does; first two steps {s['compile_s']:.1f} s, uncompiled "
                            f"(--compile=false)")
        return "PASS", (f"built as training does; compiled in the first two steps: {s['compile_s']:.1f} s "
                        f"({s['build_s']:.1f} s with building)")

    def ran(self):
        if self.step is None:
            raise Outcome("SKIP", "the step did not run (see build and compile)")
        return self.step

    def step_time(self, details):
        s, cfg = self.ran(), self.cfg
        per_gpu = cfg.batch_size * cfg.seq_len / s["step_s"] / self.world_size
        mfu = f"MFU {perf.mfu_text(perf.flops_per_token(cfg), per_gpu, self.device, cfg.dtype)}"
        details.append(f"model FLOPs per token: {perf.flops_per_token(cfg) / 1e9:.4f} GFLOP = "
                       f"{perf.flops_formula(cfg)}")
        unit = "GPU" if self.on_gpu else "process"
        return "PASS", (f"{1000 * s['step_s']:.1f} ms a step over {self.timed_steps} steps, {per_gpu:,.0f} tokens/s "
                        f"per {unit}, {mfu}")

    def memory(self, details):
        s = self.ran()
        used, kind = s["memory"]
        capacity = perf.memory_capacity(self.device)
        found = f"peak {gib(used)} {kind} of {gib(capacity)} ({used / capacity:.0%})"
        if used > 0.9 * capacity:
            m = self.cfg.micro_batch_size
            smaller = [d for d in divisors(self.cfg.batch_size // self.world_size) if d < m]
            hint = (f"--micro_batch_size={smaller[-1]} lowers the activations' share with the same updates" if smaller
                    else "micro_batch_size is 1 already")
            return "WARN", f"{found}: above 90%, little room for fragmentation; {hint}"
        return "PASS", found

    def loss(self, details):
        losses = self.ran()["losses"]
        details.append("losses: " + " ".join(f"{x:.4f}" for x in losses))
        if not all(math.isfinite(x) for x in losses):
            bad = next(i for i, x in enumerate(losses) if not math.isfinite(x))
            return "FAIL", f"step {bad + 1} of one repeated batch gave loss {losses[bad]}"
        if not losses[-1] < losses[0]:
            return "FAIL", (f"on one repeated batch the loss went from {losses[0]:.4f} to {losses[-1]:.4f} in "
                            f"{len(losses)} steps: gradients do not flow")
        return "PASS", (f"finite, and on one repeated batch it falls from {losses[0]:.4f} to {losses[-1]:.4f} in "
                        f"{len(losses)} steps")

    def projection(self, details):
        s, cfg = self.ran(), self.cfg
        total = cfg.steps * s["step_s"]
        shown = f"{total / 60:.2f} min" if total >= 600 else f"{total:.1f} s"
        found = (f"{cfg.steps} x {1000 * s['step_s']:.1f} ms = {shown} of train time on {self.world_size} "
                 f"{'GPU(s)' if self.on_gpu else 'process(es)'}, without validation and compilation")
        return "PASS", found + (f"; {PUBLISHED[self.preset]}" if self.preset in PUBLISHED else "")

    # ------------------------------------------------------------------------- checkpoint

    def checkpoint(self, details):
        s = self.ran()
        cfg, model, optimizers = s["cfg"], s["raw_model"], s["optimizers"]
        loader_state = {"shard": 0, "pos": 0, "files": []}  # random tokens: no shards
        state = train_gpt.checkpoint_state(cfg, len(s["losses"]), 0.0, model, optimizers, loader_state,
                                           self.world_size, self.device)  # collective: Muon's momentum
        if self.rank != 0:
            raise Outcome("SKIP", "rank 0 writes the checkpoint")
        expected = torch.utils._pytree.tree_map(
            lambda t: t.detach().to("cpu", copy=True) if isinstance(t, torch.Tensor) else t,
            {k: state[k] for k in ("model", "adam", "muon")})
        path = self.run_dir / "preflight_checkpoint.pt"
        try:
            started = time.perf_counter()
            train_gpt.save_checkpoint(state, path)
            write_s = time.perf_counter() - started
            n_bytes = path.stat().st_size
            ckpt = train_gpt.read_checkpoint(path)
            differ = self.differences(expected, {k: ckpt[k] for k in expected}, "read back")
            model.load_state_dict(ckpt["model"])  # and into the model and optimizer, as --resume does
            adam = optimizers[0]
            adam.load_state_dict({**adam.state_dict(), "state": ckpt["adam"]})
            differ += self.differences({k: expected[k] for k in ("model", "adam")},
                                       {"model": model.state_dict(), "adam": adam.state_dict()["state"]}, "loaded")
        finally:
            path.unlink(missing_ok=True)
        details.extend(differ)
        if differ:
            return "FAIL", f"{len(differ)} tensors changed on the way: {differ[0]}"
        return "PASS", (f"{size(n_bytes)} written in {write_s:.2f} s ({size(n_bytes / write_s)}/s) to {self.run_dir}; "
                        f"weights, Adam moments and Muon momentum read back and loaded identical")

    @staticmethod
    def differences(expected, got, how):
        """'how: <path> differs' for each leaf of expected that got lacks, or holds with other bits."""
        flat = torch.utils._pytree.tree_flatten_with_path
        theirs, found = dict(flat(got)[0]), []
        for key, value in flat(expected)[0]:
            other = theirs.get(key)
            if isinstance(value, torch.Tensor):
                same = (isinstance(other, torch.Tensor) and other.shape == value.shape and other.dtype == value.dtype
                        and torch.equal(bits(other.cpu()), bits(value)))
            else:
                same = other == value
            if not same:
                found.append(f"{how}: {torch.utils._pytree.keystr(key)} differs")
        return found


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = train_gpt.config_parser("Check that this node can run a preset, in minutes.")
    parser.add_argument("--no-data", action="store_true", help="skip the checks of the train and val shards")
    parser.add_argument("--timed_steps", type=int, default=TIMED_STEPS, help="training steps timed after compiling")
    args = parser.parse_args(argv)
    preset, cfg = train_gpt.config_from(args)
    if args.timed_steps < 1:
        parser.error("--timed_steps must be at least 1")
    distributed, rank, world_size, device = train_gpt.init_process()
    failed = []
    try:
        log = train_gpt.start_log(Path(cfg.log_dir) / "preflight", rank, {
            "preflight": preset, "no_data": args.no_data, "world_size": world_size, "device": str(device),
            "argv": [sys.argv[0], *argv], "config": dataclasses.asdict(cfg)}, device, SOURCES)
        preflight = Preflight(cfg, preset, log, rank, world_size, device, not args.no_data, args.timed_steps)
        results = preflight.run()
        log(train_gpt.SEPARATOR, echo=False)
        log(preflight.table())
        failed = [name for _, name, status, _ in results if status == "FAIL"]
        if failed:
            log(f"preflight: FAIL ({', '.join(failed)}): fix these before the run")
        if log.path:
            print(f"log: {log.path}", flush=True)
        if distributed:
            dist.barrier()
    finally:
        if distributed:
            dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
