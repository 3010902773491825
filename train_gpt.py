"""Train a GPT on token shards, fast: the NanoGPT speedrun in one file.

    torchrun --standalone --nproc_per_node=8 train_gpt.py           # the 8xH100 record
    python train_gpt.py                                              # the CPU track, without CUDA
    python train_gpt.py --preset cpu-shakespeare --steps=100 --seed=1
    python train_gpt.py --save_every=50 --resume=latest              # checkpoints; continue the newest

Sections: config and presets, data, model, optimizer, checkpoints, training loop, sampling, main. The
Triton kernel of Newton-Schulz is in kernels.py, tokens and sampling in sampling.py (a run's log holds
both); tools/ holds the benchmark and the preflight.
"""
import argparse
import contextlib
import dataclasses
import glob
import hashlib
import importlib.util
import inspect
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from torch.nn.parallel import DistributedDataParallel as DDP

import kernels
import sampling


class UserError(Exception):
    """Bad input the user can fix (a path, a shard, a flag): reported as one line, no traceback."""


class Preempted(Exception):
    """SIGTERM arrived: a checkpoint was saved and the run stopped early."""


# ----------------------------------------------------------------------------- config and presets

@dataclass
class Config:
    # data: llm.c token shards; the stream of train tokens is fixed by the record rules
    train_files: str = "data/fineweb10B/fineweb_train_*.bin"
    val_files: str = "data/fineweb10B/fineweb_val_*.bin"
    val_tokens: int = 10_485_760  # targets scored from the start of the val split; 0 = all of it
    vocab_size: int = 50304  # GPT-2's 50257, padded to a multiple of 128 for the matmuls
    eot_token: int = 50256  # <|endoftext|> opens every document; attention never crosses it
    seq_len: int = 65536  # tokens per sequence; documents are packed and separated by the mask
    batch_size: int = 8  # sequences per optimizer step, over all processes
    micro_batch_size: int = 1  # sequences per forward pass; the rest is gradient accumulation
    # model
    n_layer: int = 12
    model_dim: int = 768
    head_dim: int = 128
    mlp_ratio: int = 4
    window: int = 1024  # attention reaches back at most this many tokens (Nov-2024 record)
    logit_cap: float = 30.0  # logits = cap * tanh(logits / cap)
    mtp_weight: float = 0.0  # multi-token prediction: a second head's loss on the token after next, at this
    # weight fading linearly to 0 over the run (later records; off in the Nov-2024 one)
    # optimizer: Muon for the matrices inside the blocks, Adam for everything else
    optimizer: str = "muon"  # or "adamw": AdamW for those matrices too, the baseline Muon is judged against
    steps: int = 1875
    lr_warmup_steps: int = 0  # lr rises linearly from 0 over these steps (none in the record) ...
    cooldown_steps: int = 562  # ... is constant, then falls linearly to 0 over the last steps
    muon_lr: float = 0.04
    muon_momentum: float = 0.95
    muon_momentum_start: float = 0.85  # warmed up linearly to muon_momentum ...
    muon_momentum_warmup: int = 500  # ... over this many steps
    ns_steps: int = 5  # Newton-Schulz iterations
    normuon: bool = False  # NorMuon: Muon's update normalised per neuron (later records; off in Nov 2024)
    # Moonlight's Muon for long runs, off in the record: decoupled weight decay (W *= 1 - lr * wd), and
    # updates scaled to RMS 0.2 (0.2 * sqrt(max(rows, cols))) like AdamW's, so AdamW's lr and wd carry over
    muon_weight_decay: float = 0.0
    muon_rms_match: bool = False
    muon_triton: bool = True  # on CUDA in bf16, Newton-Schulz's Gram matrices by the Triton kernel, else torch's
    embed_lr: float = 0.6
    head_lr: float = 0.008
    scalar_lr: float = 0.04
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8  # torch's default, as in the record (later records: 1e-10)
    adamw_lr: float = 0.004  # the matrices' lr under optimizer="adamw" ...
    weight_decay: float = 0.0  # ... and their decoupled weight decay
    # run
    val_every: int = 125  # also at the last step; 0 = only at the last step
    seed: int = 0
    dtype: str = "bfloat16"  # activations and matmuls; master weights stay float32
    compile: bool = True
    warmup_steps: int = 3  # untimed steps on random tokens to compile, then the state is reset
    log_dir: str = "logs"
    save_every: int = 0  # checkpoint every K steps, at the end and on SIGTERM; 0 = never
    sample_tokens: int = 0  # the log ends with a sample of this many tokens (temperature 0.8, top-k 40)
    hellaswag_every: int = 0  # log HellaSwag accuracy every K steps and at the end (GPT-2 vocabulary); 0 = never
    hellaswag_file: str = "data/hellaswag/hellaswag_val.jsonl"  # downloaded when missing
    resume: str = ""  # continue from this checkpoint, or "latest": the newest under log_dir
    wandb_project: str = ""  # also log the config and every step line to this Weights & Biases project


PRESETS = {
    # The 8xH100 record of Nov 2024 (3.28 val loss in 1875 steps); fewer GPUs accumulate.
    "gpt2-speedrun": Config(),
    # Larger GPT-2 shapes, untested at full length here (README). Sequences shorten as the model grows,
    # so that a micro-batch's activations stay near the record's on an 80 GB GPU; the head's lr falls
    # as 1 / width from the record's 0.008 at 768.
    "gpt2-medium": Config(  # 350M, the public 2.92 val loss track: 24 x 1024, 8 heads of 128
        n_layer=24, model_dim=1024, seq_len=16384, batch_size=32, steps=5000, cooldown_steps=1500,
        head_lr=0.006, val_every=250),
    # 774M and 1.5B take Moonlight's Muon with GPT-3's AdamW lrs for those sizes and weight decay 0.1;
    # 1M-token steps, and ~10B tokens at most: FineWeb-10B's 103 shards.
    "gpt2-large": Config(  # 36 x 1280, 10 heads of 128
        n_layer=36, model_dim=1280, seq_len=8192, batch_size=128, steps=8000, cooldown_steps=2400,
        lr_warmup_steps=200, muon_lr=2.5e-4, muon_rms_match=True, muon_weight_decay=0.1, head_lr=0.0048,
        val_every=500),
    "gpt2-xl": Config(  # 48 x 1600, GPT-2 XL's 25 heads of 64 (128 does not divide 1600)
        n_layer=48, model_dim=1600, head_dim=64, seq_len=4096, batch_size=256, steps=9500, cooldown_steps=2850,
        lr_warmup_steps=200, muon_lr=2e-4, muon_rms_match=True, muon_weight_decay=0.1, head_lr=0.0038,
        val_every=500),
    # The CPU track: character-level tiny Shakespeare to <= 1.88 val loss on a 2-core machine.
    "cpu-shakespeare": Config(
        train_files="data/shakespeare_char/train_*.bin",
        val_files="data/shakespeare_char/val_*.bin",
        val_tokens=0,  # the track is scored on the whole val split
        vocab_size=65,
        eot_token=-1,  # one continuous text: no document boundaries
        seq_len=64,
        batch_size=32,  # 2048 tokens a step: past ~4K, a step costs more than it teaches here
        micro_batch_size=32,
        n_layer=4,
        model_dim=96,
        head_dim=48,
        window=64,
        mtp_weight=0.5,
        steps=120,
        cooldown_steps=60,
        muon_momentum_warmup=40,
        normuon=True,
        embed_lr=0.3,
        head_lr=0.016,
        adam_beta1=0.8,
        adam_eps=1e-10,  # as the track's record was tuned and run
        val_every=10,  # dense curves for the record plots; validation is not timed
        dtype="float32",  # on the Intel Xeon that runs this track, a step takes ~24% less time than in bf16
        warmup_steps=2,
        sample_tokens=240,
    ),
}


def default_preset():
    return "gpt2-speedrun" if torch.cuda.is_available() else "cpu-shakespeare"


def config_parser(description=__doc__.splitlines()[0]):
    """`--preset NAME` picks the starting point; `--key=value` overrides any field of Config."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=default_preset())
    for f in dataclasses.fields(Config):
        switch = dict(type=_parse_bool, nargs="?", const=True) if f.type is bool else dict(type=f.type)
        parser.add_argument(f"--{f.name}", default=None, metavar=f.type.__name__.upper(), **switch)  # --flag = true
    return parser


def config_from(args):
    """(preset, Config) from config_parser's arguments."""
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if getattr(args, f.name) is not None}
    return args.preset, dataclasses.replace(PRESETS[args.preset], **overrides)


def parse_config(argv):
    return config_from(config_parser().parse_args(argv))


def _parse_bool(text):
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def validate(cfg, world_size):
    for name in ("seq_len", "batch_size", "micro_batch_size", "n_layer", "model_dim", "head_dim", "mlp_ratio",
                 "window", "steps"):
        if getattr(cfg, name) < 1:
            raise UserError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    per_step = cfg.micro_batch_size * world_size
    if cfg.batch_size % per_step:
        hint = f" (try --micro_batch_size={cfg.batch_size // world_size})" if cfg.batch_size % world_size == 0 else ""
        raise UserError(f"batch_size {cfg.batch_size} is not a multiple of micro_batch_size "
                        f"{cfg.micro_batch_size} x {world_size} processes{hint}")
    if cfg.model_dim % cfg.head_dim:
        raise UserError(f"model_dim {cfg.model_dim} is not a multiple of head_dim {cfg.head_dim}")
    if cfg.head_dim % 2:
        raise UserError(f"head_dim must be even for rotary embeddings, got {cfg.head_dim}")
    for name in ("val_every", "save_every", "sample_tokens", "hellaswag_every"):
        if getattr(cfg, name) < 0:
            raise UserError(f"{name} must be 0 or more, got {getattr(cfg, name)}")
    if not 0 <= cfg.cooldown_steps <= cfg.steps:
        raise UserError(f"cooldown_steps {cfg.cooldown_steps} must lie in [0, steps={cfg.steps}]")
    if cfg.optimizer not in ("muon", "adamw"):
        raise UserError(f"optimizer must be muon or adamw, got {cfg.optimizer!r}")
    if cfg.optimizer != "muon" and (cfg.muon_weight_decay or cfg.muon_rms_match):
        raise UserError("muon_weight_decay and muon_rms_match apply to Muon: with optimizer=adamw, set "
                        "adamw_lr and weight_decay")
    if cfg.mtp_weight < 0:
        raise UserError(f"mtp_weight must be 0 or more, got {cfg.mtp_weight}")
    if cfg.muon_weight_decay < 0 or cfg.muon_weight_decay * cfg.muon_lr >= 1:  # W *= 1 - lr * wd
        raise UserError(f"muon_weight_decay must be 0 or more, with muon_lr x muon_weight_decay below 1; got "
                        f"{cfg.muon_weight_decay} at lr {cfg.muon_lr}")
    if not 0 <= cfg.lr_warmup_steps <= cfg.steps:
        raise UserError(f"lr_warmup_steps {cfg.lr_warmup_steps} must lie in [0, steps={cfg.steps}]")
    if cfg.wandb_project and importlib.util.find_spec("wandb") is None:
        raise UserError("wandb_project: the wandb package is not installed (pip install wandb)")
    if cfg.hellaswag_every and cfg.vocab_size < 50257:
        raise UserError(f"hellaswag_every: HellaSwag is English text and needs a GPT-2 vocabulary, not "
                        f"vocab_size {cfg.vocab_size}")
    if cfg.dtype not in ("bfloat16", "float32"):
        raise UserError(f"dtype must be bfloat16 or float32, got {cfg.dtype!r}")


# ----------------------------------------------------------------------------- data

# A shard (the llm.c format): 256 little-endian int32 [magic, version, n_tokens, 0, ...],
# then n_tokens little-endian uint16 tokens.
SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256
HEADER_BYTES = HEADER_INTS * 4


def write_shard(path, tokens):
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ValueError(f"{path}: tokens must fit in uint16")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = SHARD_MAGIC, SHARD_VERSION, tokens.size
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2").tobytes())


FINEWEB_SHARD = re.compile(r"fineweb_(train|val)_(\d{6})\.bin")


def bad_shard(path, problem):
    """The UserError for a damaged shard; a FineWeb shard's names the command that fetches it again."""
    m = FINEWEB_SHARD.fullmatch(os.path.basename(path))
    hint = (f"; `python data/cached_fineweb10B.py {max(int(m[2]), 10)}` checks the shards and fetches damaged "
            f"ones again" if m else "")
    return UserError(f"{path}: {problem}{hint}")


def file_sha256(path):
    """A file's SHA-256, read a MiB at a time: what the FineWeb download and the preflight check shards by."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def read_header(path):
    """Check a shard's header against its size; return its token count."""
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        raise bad_shard(path, f"{size} bytes, shorter than the {HEADER_BYTES}-byte shard header")
    magic, version, n_tokens = np.fromfile(path, dtype="<i4", count=3)
    if magic != SHARD_MAGIC:
        raise bad_shard(path, f"magic number {magic} at byte 0, expected {SHARD_MAGIC}: not a token shard")
    if version != SHARD_VERSION:
        raise bad_shard(path, f"shard version {version} at byte 4, expected {SHARD_VERSION}")
    if size != HEADER_BYTES + 2 * n_tokens:
        raise bad_shard(path, f"header says {n_tokens} tokens ({HEADER_BYTES + 2 * n_tokens} bytes) but the file "
                              f"has {size} bytes: truncated or corrupt")
    return int(n_tokens)


def read_shard(path, vocab_size):
    n_tokens = read_header(path)
    tokens = np.fromfile(path, dtype="<u2", count=n_tokens, offset=HEADER_BYTES)
    if n_tokens and tokens.max() >= vocab_size:
        pos = int(np.argmax(tokens >= vocab_size))
        raise bad_shard(path, f"token {tokens[pos]} at position {pos} is outside the vocabulary of {vocab_size}: "
                              f"shards for another tokenizer, or damaged?")
    return tokens


def find_shards(pattern):
    files = sorted(glob.glob(pattern))
    if not files:
        raise UserError(f"no shard matches {pattern!r} (see data/ for the scripts that make them)")
    return files


class TrainLoader:
    """Each step reads batch_size * seq_len (+1) contiguous tokens from one shard, moving to the next
    shard (cyclically) when the current one runs out. Micro-batch j of the step goes to rank
    j % world_size, so the tokens of every update are the same for any number of processes."""

    def __init__(self, cfg, rank, world_size, device):
        self.cfg, self.rank, self.world_size, self.device = cfg, rank, world_size, device
        self.files = find_shards(cfg.train_files)
        span = cfg.batch_size * cfg.seq_len
        self.usable_tokens = 0  # what the steps read before the stream wraps: each shard's tail is skipped
        for path in self.files:
            n_tokens = read_header(path)
            if n_tokens < span + 1:
                raise UserError(f"{path}: {n_tokens} tokens, but one step reads {span + 1} "
                                f"(batch_size {cfg.batch_size} x seq_len {cfg.seq_len} + 1)")
            self.usable_tokens += (n_tokens - 1) // span * span
        self.shard, self.pos = 0, 0
        self.tokens = read_shard(self.files[0], cfg.vocab_size)

    def next_batches(self):
        """The (inputs, targets) micro-batches this rank accumulates over in the next step."""
        cfg = self.cfg
        span = cfg.batch_size * cfg.seq_len
        if self.pos + span + 1 > len(self.tokens):
            self.shard, self.pos = (self.shard + 1) % len(self.files), 0
            self.tokens = read_shard(self.files[self.shard], cfg.vocab_size)
        buf = torch.from_numpy(self.tokens[self.pos:self.pos + span + 1].astype(np.int64))
        self.pos += span
        micro = cfg.micro_batch_size * cfg.seq_len
        return [split_micro_batch(buf[j * micro:(j + 1) * micro + 1].to(self.device, non_blocking=True), cfg)
                for j in range(self.rank, cfg.batch_size // cfg.micro_batch_size, self.world_size)]

    def state_dict(self):  # the same on every rank
        return {"shard": self.shard, "pos": self.pos, "files": [Path(f).name for f in self.files]}

    def load_state_dict(self, state):
        names = [Path(f).name for f in self.files]
        if names != state["files"]:
            raise UserError(f"the train shards matching {self.cfg.train_files!r} ({len(names)}: "
                            f"{', '.join(names[:3])}{', ...' if len(names) > 3 else ''}) are not the "
                            f"{len(state['files'])} the checkpoint was trained on "
                            f"({', '.join(state['files'][:3])}{', ...' if len(state['files']) > 3 else ''})")
        self.shard, self.pos = state["shard"], state["pos"]
        self.tokens = read_shard(self.files[self.shard], self.cfg.vocab_size)


def shards_to_read(cfg, shard_tokens=100_000_000):
    """How many train shards of shard_tokens the run reads before the stream wraps (TrainLoader skips
    each shard's tail: what is left after its last whole step)."""
    return -(-cfg.steps // ((shard_tokens - 1) // (cfg.batch_size * cfg.seq_len)))


def split_micro_batch(chunk, cfg):
    """micro_batch_size * seq_len + 1 consecutive tokens -> (inputs, targets), each (micro_batch_size, seq_len)."""
    return chunk[:-1].view(-1, cfg.seq_len), chunk[1:].view(-1, cfg.seq_len)


def load_val_tokens(cfg):
    """The first val_tokens targets of the val shards (and the token before them), in one array."""
    parts, have = [], 0
    for path in find_shards(cfg.val_files):
        parts.append(read_shard(path, cfg.vocab_size))
        have += len(parts[-1])
        if cfg.val_tokens and have > cfg.val_tokens:
            break
    tokens = np.concatenate(parts)
    if cfg.val_tokens:
        if len(tokens) <= cfg.val_tokens:
            raise UserError(f"val shards {cfg.val_files!r} hold {len(tokens)} tokens; "
                            f"val_tokens={cfg.val_tokens} needs {cfg.val_tokens + 1}")
        tokens = tokens[:cfg.val_tokens + 1]
    if len(tokens) < 2:
        raise UserError(f"val shards {cfg.val_files!r} hold {len(tokens)} tokens, too few to score")
    return torch.from_numpy(tokens.astype(np.int64))


# ----------------------------------------------------------------------------- model

def norm(x):
    return F.rms_norm(x, (x.size(-1),))


def document_mask(docs, window):
    """The one mask function of both attention paths: causal, same document, within the window."""
    def mask_mod(b, h, q_idx, kv_idx):
        causal = q_idx >= kv_idx
        near = q_idx - kv_idx < window
        return causal & near & (docs[b, q_idx] == docs[b, kv_idx])
    return mask_mod


def attention_mask(tokens, eot_token, window, flex):
    """A FlexAttention block mask, or the same mask_mod evaluated densely for the SDPA path."""
    B, T = tokens.shape
    mask_mod = document_mask((tokens == eot_token).cumsum(-1), window)
    if flex:
        return create_block_mask(mask_mod, B, None, T, T, device=tokens.device)
    idx = torch.arange(T, device=tokens.device)
    b = torch.arange(B, device=tokens.device).view(B, 1, 1, 1)
    return mask_mod(b, 0, idx.view(T, 1), idx)  # broadcasts to (B, 1, T, T)


def attend(q, k, v, mask):
    if isinstance(mask, BlockMask):
        return flex_attention(q, k, v, block_mask=mask)
    # CPU: with the math backend (batched matmuls, masked softmax fused by torch.compile) a training
    # step ran ~1.5x faster than with the flash kernel, whose backward is slow for small heads.
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class CastedLinear(nn.Linear):
    """float32 master weights, cast to the activations' dtype in the forward pass."""

    def __init__(self, in_features, out_features, zero_init=False):
        super().__init__(in_features, out_features, bias=False)
        if zero_init:
            nn.init.zeros_(self.weight)

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype))


class Rotary(nn.Module):
    """The cos and sin tables of rotary position embeddings, computed once for every layer."""

    def __init__(self, head_dim, max_len, base=10000.0):
        super().__init__()
        inv_freq = base ** -(torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, T, dtype):
        return tuple(t[None, :T, None, :].to(dtype) for t in (self.cos, self.sin))


def rotate(x, rope):  # x: (B, T, heads, head_dim); rope: Rotary's (cos, sin)
    cos, sin = rope
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        dim, self.head_dim = cfg.model_dim, cfg.head_dim
        # three weights (Muon orthogonalises and shards them one by one), applied by one matmul
        self.q, self.k, self.v = (CastedLinear(dim, dim) for _ in range(3))
        self.proj = CastedLinear(dim, dim, zero_init=True)
        # value residual: the share of the first block's v (which in the first block is v itself,
        # so there this weight never gets a gradient)
        self.value_mix = nn.Parameter(torch.tensor(0.5))

    def forward(self, x, v_first, mask, rope):
        B, T, dim = x.shape
        qkv = torch.cat([self.q.weight, self.k.weight, self.v.weight]).to(x.dtype)
        q, k, v = F.linear(x, qkv).view(B, T, 3, -1, self.head_dim).unbind(2)
        if v_first is None:
            v_first = v
        v = (1 - self.value_mix) * v + self.value_mix * v_first
        q, k = rotate(norm(q), rope), rotate(norm(k), rope)  # QK-norm keeps attention logits tame
        y = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)
        return self.proj(y.transpose(1, 2).reshape(B, T, dim)), v_first


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc = CastedLinear(cfg.model_dim, cfg.mlp_ratio * cfg.model_dim)
        self.proj = CastedLinear(cfg.mlp_ratio * cfg.model_dim, cfg.model_dim, zero_init=True)

    def forward(self, x):
        return self.proj(F.relu(self.fc(x)).square())


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attn, self.mlp = Attention(cfg), MLP(cfg)
        self.lambdas = nn.Parameter(torch.tensor([1.0, 0.0]))  # mix of the stream and x0

    def forward(self, x, x0, v_first, mask, rope):
        x = self.lambdas[0] * x + self.lambdas[1] * x0
        y, v_first = self.attn(norm(x), v_first, mask, rope)
        x = x + y
        return x + self.mlp(norm(x)), v_first


class GPT(nn.Module):
    def __init__(self, cfg, flex=False):
        super().__init__()
        self.cfg, self.flex = cfg, flex
        self.dtype = getattr(torch, cfg.dtype)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        self.rotary = Rotary(cfg.head_dim, cfg.seq_len)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        # U-net: the first half of the blocks hand their outputs, last first, to the second half
        self.n_encoder = cfg.n_layer // 2
        self.skip_weights = nn.Parameter(torch.ones(self.n_encoder))
        self.lm_head = CastedLinear(cfg.model_dim, cfg.vocab_size, zero_init=True)
        # multi-token prediction: a second head, trained only, predicts the token after the next
        self.mtp_head = CastedLinear(cfg.model_dim, cfg.vocab_size, zero_init=True) if cfg.mtp_weight else None

    def forward(self, idx, targets=None, reduction="mean", flex=None, horizons=1):
        """The cross-entropy against targets (reduction "mean", "sum", or "none": per token), or without
        targets the logits of the next token, (B, vocab_size). flex=False takes the dense attention path,
        for evaluation and sampling on inputs of any shape. horizons=2 (training with mtp_weight) returns
        the mean cross-entropies of the next token and of mtp_head's token after it, as one (2,) tensor."""
        cfg = self.cfg
        mask = attention_mask(idx, cfg.eot_token, cfg.window, self.flex if flex is None else flex)
        rope = self.rotary(idx.size(1), self.dtype)
        x = x0 = norm(self.embed(idx).to(self.dtype))
        v_first, skips = None, []
        for i, block in enumerate(self.blocks):
            if i >= self.n_encoder and skips:
                x = x + self.skip_weights[i - self.n_encoder] * skips.pop()
            x, v_first = block(x, x0, v_first, mask, rope)
            if i < self.n_encoder:
                skips.append(x)
        if targets is None:
            x = x[:, -1]
        x = norm(x)
        logits = self.capped(self.lm_head(x))
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), reduction=reduction)
        if horizons == 1:
            return loss
        second = self.capped(self.mtp_head(x[:, :-1]))  # position t predicts the target of t + 1
        return torch.stack([loss, F.cross_entropy(second.reshape(-1, second.size(-1)), targets[:, 1:].reshape(-1))])

    def capped(self, logits):
        cap = self.cfg.logit_cap
        return cap * torch.tanh(logits.float() / cap)


# ----------------------------------------------------------------------------- optimizer

def newton_schulz(G, steps=5, dtype=torch.bfloat16, triton_gram=True):
    """Approximately orthogonalise G (or a stack of matrices): U S V^T -> U S' V^T, S' in ~[0.7, 1.2].

    A quintic iteration whose coefficients (Muon write-up) push every singular value of the
    Frobenius-normalised input towards 1 as fast as possible, trading exactness for speed. Its two
    symmetric products go through the Triton kernel on CUDA, unless triton_gram is off."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.to(dtype).reshape(-1, *G.shape[-2:])  # one batch dimension, for baddbmm
    tall = G.size(-2) > G.size(-1)
    if tall:  # iterate on the smaller Gram matrix
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    kernel = triton_gram and kernels.gram_by_kernel(X)
    for _ in range(steps):
        A = kernels.gram(X) if kernel else X @ X.mT
        # A is symmetric (A @ A = A @ A^T); baddbmm fuses each product with its sum
        B = b * A + c * kernels.gram(A) if kernel else torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a)
    return (X.mT if tall else X).reshape(G.shape)


# torch 2.13 renamed all_gather_into_tensor, deprecated there, to all_gather_single; 2.11 has the old name
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-schulz, for the 2-D weights inside the blocks.

    Parameters of one shape form a group and are orthogonalised as one batch. The batch is split
    across ranks (each rank keeps the momentum of its share only) and the updates are all-gathered,
    so every rank applies the same update. Gradients must already be averaged across ranks.

    With normuon, each row of an orthogonalised update is divided by a running RMS of that row, and
    the matrix rescaled to its norm before.

    The update of a rows x cols matrix is scaled by sqrt(max(1, rows / cols)), so tall and square
    matrices move alike, or with rms_match by 0.2 * sqrt(max(rows, cols)), which gives it an RMS
    of about 0.2, as AdamW's typically has. weight_decay is decoupled: W *= 1 - lr * weight_decay."""

    def __init__(self, params, lr, momentum, nesterov=True, ns_steps=5, ns_dtype=torch.bfloat16,
                 weight_decay=0.0, rms_match=False, triton_gram=True, rank=0, world_size=1,
                 normuon=False):
        params = list(params)
        shapes = sorted({tuple(p.shape) for p in params})
        groups = [{"params": [p for p in params if tuple(p.shape) == s]} for s in shapes]
        super().__init__(groups, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                                      weight_decay=weight_decay))
        self.ns_dtype, self.rms_match, self.triton_gram = ns_dtype, rms_match, triton_gram
        self.rank, self.world_size = rank, world_size
        self.normuon = normuon

    @staticmethod
    def neuron_shape(shape):
        """NorMuon's state for a rows x cols matrix: a running mean square per row."""
        return (*shape[:-1], 1)

    def normalise_neurons(self, params, orth):
        """NorMuon: divide each row (output neuron) of the orthogonalised updates by the running RMS of
        its entries (beta2 0.95), then rescale each matrix to its Frobenius norm before."""
        for p in params:
            if "neuron_moment" not in self.state[p]:
                self.state[p]["neuron_moment"] = torch.zeros(self.neuron_shape(p.shape), device=p.device)
        moments = [self.state[p]["neuron_moment"] for p in params]
        stacked = torch.stack(moments).lerp_(orth.float().square().mean(-1, keepdim=True), 1 - 0.95)
        torch._foreach_copy_(moments, stacked.unbind(0))
        normed = orth.float() / (stacked.sqrt() + 1e-10)
        # a zero update (the first step's, behind a zero-initialised projection) stays zero
        scale = orth.float().norm(dim=(-2, -1), keepdim=True) / normed.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-10)
        return (normed * scale).to(orth.dtype)

    def share(self, params):
        """This rank's slice of a group, (start, length): ceil(len / world_size), so the last rank may
        get padding."""
        share = -(-len(params) // self.world_size)
        return self.rank * share, share

    @torch.no_grad()
    def step(self):
        gathers = []  # each group's all-gather runs while the next group is orthogonalised
        for group in self.param_groups:
            params, mu = group["params"], group["momentum"]
            lo, share = self.share(params)
            mine = params[lo:lo + share]
            rows, cols = params[0].shape
            updates = torch.zeros(share * self.world_size, rows, cols, dtype=self.ns_dtype,
                                  device=params[0].device)
            if mine:
                grads = [p.grad for p in mine]
                for p in mine:
                    if "momentum_buffer" not in self.state[p]:
                        self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                bufs = [self.state[p]["momentum_buffer"] for p in mine]
                torch._foreach_mul_(bufs, mu)
                torch._foreach_add_(bufs, grads)
                if group["nesterov"]:
                    grads = torch._foreach_add(grads, bufs, alpha=mu)
                else:
                    grads = bufs
                orth = newton_schulz(torch.stack(grads), group["ns_steps"], self.ns_dtype, self.triton_gram)
                if self.normuon:
                    orth = self.normalise_neurons(mine, orth)
                updates[lo:lo + len(mine)] = orth
            work = None
            if self.world_size > 1:
                work = all_gather_single(updates, updates[lo:lo + share], async_op=True)
            gathers.append((group, updates, work))
        for group, updates, work in gathers:
            if work is not None:
                work.wait()
            params = group["params"]
            rows, cols = params[0].shape
            # an orthogonal rows x cols matrix has RMS 1 / sqrt(max(rows, cols))
            scale = 0.2 * max(rows, cols) ** 0.5 if self.rms_match else max(1.0, rows / cols) ** 0.5
            if group["weight_decay"]:
                torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
            torch._foreach_add_(params, list(updates[:len(params)].float().unbind(0)),
                                alpha=-group["lr"] * scale)

    def buffer_shapes(self):
        """Each state buffer's name and its shape for a parameter of a given shape."""
        shapes = {"momentum_buffer": lambda shape: shape}
        if self.normuon:
            shapes["neuron_moment"] = self.neuron_shape
        return shapes

    @torch.no_grad()
    def buffers(self):
        """{name: every parameter's buffer} (zeros before its first step), gathered from the ranks that
        own them: a checkpoint holds the whole state, whatever the number of processes. Collective."""
        buffers = {}
        for name, shape_of in self.buffer_shapes().items():
            buffers[name] = []
            for group in self.param_groups:
                params = group["params"]
                lo, share = self.share(params)
                shape = shape_of(params[0].shape)
                local = torch.zeros(share, *shape, device=params[0].device)
                for i, p in enumerate(params[lo:lo + share]):
                    if name in self.state[p]:
                        local[i] = self.state[p][name]
                full = local
                if self.world_size > 1:
                    full = torch.empty(share * self.world_size, *shape, device=local.device)
                    all_gather_single(full, local)
                buffers[name].extend(full[:len(params)].cpu().unbind(0))
        return buffers

    def load_buffers(self, buffers):
        """Keep this rank's share of what buffers() returned."""
        params = [p for group in self.param_groups for p in group["params"]]
        shapes = self.buffer_shapes()
        if set(buffers) != set(shapes):
            raise ValueError(f"Muon state holds {', '.join(sorted(buffers))}, this optimizer keeps "
                             f"{', '.join(sorted(shapes))}")
        for name, shape_of in shapes.items():
            if [tuple(b.shape) for b in buffers[name]] != [tuple(shape_of(p.shape)) for p in params]:
                raise ValueError(f"Muon's {name}s do not match the parameters in number or shape")
            start = 0
            for group in self.param_groups:
                lo, share = self.share(group["params"])
                for i, p in enumerate(group["params"][lo:lo + share]):
                    self.state[p][name] = buffers[name][start + lo + i].to(p.device, p.dtype, copy=True)
                start += len(group["params"])


def lr_factor(step, cfg):
    """A linear warm-up over lr_warmup_steps, constant, then a linear cooldown to zero over the
    last cooldown_steps."""
    left = cfg.steps - step
    factor = 1.0 if left >= cfg.cooldown_steps else left / cfg.cooldown_steps
    return min(factor, (step + 1) / cfg.lr_warmup_steps) if cfg.lr_warmup_steps else factor


def muon_momentum(step, cfg):
    frac = min(step / cfg.muon_momentum_warmup, 1.0) if cfg.muon_momentum_warmup else 1.0
    return (1 - frac) * cfg.muon_momentum_start + frac * cfg.muon_momentum


def build_optimizers(model, cfg, rank, world_size, device):
    matrices = [p for p in model.blocks.parameters() if p.ndim == 2]
    scalars = [p for p in model.parameters() if p.ndim < 2]
    groups = [dict(params=[model.embed.weight], lr=cfg.embed_lr),
              dict(params=[model.lm_head.weight] + ([model.mtp_head.weight] if model.mtp_head is not None else []),
                   lr=cfg.head_lr),
              dict(params=scalars, lr=cfg.scalar_lr)]
    if cfg.optimizer == "adamw":
        groups.append(dict(params=matrices, lr=cfg.adamw_lr, weight_decay=cfg.weight_decay))
    # AdamW without weight decay is Adam, step for step: the other groups train as in the record.
    optimizers = [torch.optim.AdamW(groups, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                                    weight_decay=0.0, fused=device.type == "cuda")]
    if cfg.optimizer == "muon":
        optimizers.append(Muon(matrices, lr=cfg.muon_lr, momentum=cfg.muon_momentum_start,
                               ns_steps=cfg.ns_steps, ns_dtype=getattr(torch, cfg.dtype),
                               weight_decay=cfg.muon_weight_decay, rms_match=cfg.muon_rms_match,
                               triton_gram=cfg.muon_triton, rank=rank, world_size=world_size,
                               normuon=cfg.normuon))
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers


# ----------------------------------------------------------------------------- checkpoints

CHECKPOINT_FORMAT = "train_gpt.py checkpoint v2"
# What a resumed run may change: paths, evaluation and execution, nothing that alters the updates.
RESUME_MAY_CHANGE = {"train_files", "val_files", "val_tokens", "val_every", "compile", "warmup_steps", "log_dir",
                     "save_every", "resume", "sample_tokens", "hellaswag_every", "hellaswag_file", "muon_triton",
                     "wandb_project",
                     "micro_batch_size"}  # micro-batches, like processes, reorder sums


def source_digest():
    return hashlib.sha256(logged_source().encode()).hexdigest()[:16]


def checkpoint_state(cfg, step, train_ms, model, optimizers, loader_state, world_size, device):
    """Everything a run needs to continue exactly: weights, optimizer moments, data position, RNG.
    Collective (Muon's momentum is gathered from the ranks that own it); only rank 0 saves it."""
    adam, muon = optimizers[0], next((opt for opt in optimizers if isinstance(opt, Muon)), None)
    return {"format": CHECKPOINT_FORMAT, "config": dataclasses.asdict(cfg), "source": source_digest(),
            "world_size": world_size, "step": step, "train_ms": train_ms,
            "model": model.state_dict(),
            "adam": adam.state_dict()["state"],
            "muon": muon.buffers() if muon else None,
            "loader": loader_state,
            "rng": {"cpu": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}}


def save_checkpoint(state, path):
    """Write to a temp file and rename it into place: a crash mid-write leaves no partial checkpoint."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:  # the rename itself survives a power cut before the previous checkpoint is deleted
        os.fsync(directory)
    finally:
        os.close(directory)


def latest_checkpoint(log_dir):
    found = []
    for path in Path(log_dir).glob("*/step_*.pt"):
        try:
            found.append((path.stat().st_mtime_ns, path))
        except OSError:  # a dangling link, or deleted since the glob
            pass
    if not found:
        raise UserError(f"latest: no checkpoint in {log_dir}/*/ (runs write them with --save_every)")
    return max(found)[1]


def read_checkpoint(path):
    """A checkpoint's contents: tensors and plain data only (weights_only), checked to be ours."""
    try:  # mmap: the ranks of a node share the pages instead of each holding a copy
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise UserError(f"{path}: no such checkpoint") from None
    except Exception as e:  # a truncated zip, a foreign pickle, ...: torch raises many kinds
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"{path}: not a readable checkpoint: {reason} (truncated, or not written by "
                        f"train_gpt.py?)") from None
    if isinstance(ckpt, dict) and str(ckpt.get("format", "")).startswith("train_gpt.py checkpoint v") \
            and ckpt["format"] != CHECKPOINT_FORMAT:
        raise UserError(f"{path}: a {ckpt['format']!r}, written by an older train_gpt.py; this one reads "
                        f"{CHECKPOINT_FORMAT!r} (Muon's state changed): resume it with the code that wrote it")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path}: not a train_gpt.py checkpoint (no {CHECKPOINT_FORMAT!r} format tag)")
    return ckpt


def load_checkpoint(path, cfg):
    """Read a checkpoint and check that a run with cfg may continue it."""
    ckpt = read_checkpoint(path)
    # a field newer than the checkpoint had, in effect, its default value
    theirs = {**dataclasses.asdict(Config()), **ckpt["config"]}
    ours = dataclasses.asdict(cfg)
    differ = [k for k in ours if k not in RESUME_MAY_CHANGE and theirs[k] != ours[k]]
    if differ:
        shown = "; ".join(f"{k}={theirs[k]!r} there, {ours[k]!r} here" for k in differ[:4])
        raise UserError(f"{path} was written by another configuration ({len(differ)} fields differ: {shown}"
                        f"{'; ...' if len(differ) > 4 else ''}): resume with the preset and flags that wrote it")
    return ckpt


def load_model(path, device):
    """(config, model) of a checkpoint, for sampling and evaluation; "latest" is the newest under logs/."""
    path = latest_checkpoint(Config.log_dir) if path == "latest" else path
    ckpt = read_checkpoint(path)
    known = {f.name for f in dataclasses.fields(Config)}
    cfg = Config(**{k: v for k, v in ckpt["config"].items() if k in known})
    model = GPT(cfg).to(device)
    model.load_state_dict(ckpt["model"])
    return cfg, model


def on_all_ranks(fn, rank, world_size):
    """fn() on every rank, then a barrier. An error on any rank is raised on all of them, as a UserError,
    so none waits forever in a collective for a rank that stopped."""
    result, error = None, None
    try:
        result = fn()
    except UserError as e:
        error = str(e)
    except Exception as e:
        if world_size == 1:
            raise
        traceback.print_exc()
        error = f"{type(e).__name__}: {e}"
    if world_size > 1:
        errors = [None] * world_size
        dist.all_gather_object(errors, error)
        error = next((e if r == rank else f"rank {r}: {e}" for r, e in enumerate(errors) if e), None)
    if error:
        raise UserError(error)
    return result


def resume(cfg, log, model, optimizers, loader, rank, world_size, device):
    """Load cfg.resume into the model, optimizers, loader and RNG; return its (step, train_ms)."""
    path = cfg.resume
    if path == "latest":  # rank 0's choice: other nodes may not see its log_dir
        path = on_all_ranks(lambda: str(latest_checkpoint(cfg.log_dir)) if rank == 0 else None, rank, world_size)
        if world_size > 1:
            box = [path]
            dist.broadcast_object_list(box, src=0)
            path = box[0]

    def restore():
        ckpt = load_checkpoint(path, cfg)
        try:
            model.load_state_dict(ckpt["model"])
            adam = optimizers[0].state_dict()
            optimizers[0].load_state_dict({**adam, "state": ckpt["adam"]})  # this run's lrs and flags
            for opt in (opt for opt in optimizers if isinstance(opt, Muon)):
                opt.load_buffers(ckpt["muon"])
        except (KeyError, ValueError, RuntimeError) as e:
            raise UserError(f"{path}: does not fit this model and optimizer: {str(e).splitlines()[0]}") from None
        loader.load_state_dict(ckpt["loader"])
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if device.type == "cuda" and ckpt["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
        return ckpt

    ckpt = on_all_ranks(restore, rank, world_size)
    if world_size > 1:  # every rank read its own copy: make sure they are one checkpoint
        mine = (ckpt["step"], ckpt["train_ms"], sum(float(t.double().sum()) for t in model.state_dict().values()))
        everyone = [None] * world_size
        dist.all_gather_object(everyone, mine)
        if len(set(everyone)) > 1:
            odd = next(r for r, theirs in enumerate(everyone) if theirs != everyone[0])
            raise UserError(f"{path}: rank {odd} read another checkpoint than rank 0 under this path: give "
                            f"every node the same file (shared storage, or a copy)")
    notes = []
    if ckpt["world_size"] != world_size:
        notes.append(f"written by {ckpt['world_size']} processes: the same batches and updates, "
                     f"with sums in another order")
    if ckpt["source"] != source_digest():
        notes.append("written by another version of train_gpt.py")
    log(f"resumed from {path} at step {ckpt['step']} after {ckpt['train_ms'] / 1000:.2f}s of training"
        + "".join(f"; {note}" for note in notes))
    return ckpt["step"], ckpt["train_ms"]


@contextlib.contextmanager
def sigterm_flag(enabled):
    """While enabled, SIGTERM (pre-emption) sets a flag instead of killing the process, so that the
    loop can finish its step, checkpoint and stop."""
    flag = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: flag.set()) if enabled else None
    try:
        yield flag
    finally:
        if enabled:
            signal.signal(signal.SIGTERM, previous)


def all_finite(state):
    """Whether a checkpoint's weights and optimizer moments are all finite."""
    tensors = [*state["model"].values(), *(v for s in state["adam"].values() for v in s.values()),
               *(t for buffers in (state["muon"] or {}).values() for t in buffers)]
    return all(bool(t.isfinite().all()) for t in tensors if t.is_floating_point())


# ----------------------------------------------------------------------------- training loop

def step_line(step, steps, name, value, train_ms):
    """One log line in the public speedrun format."""
    return (f"step:{step}/{steps} {name}:{value:.4f} train_time:{train_ms:.0f}ms "
            f"step_avg:{train_ms / max(step, 1):.2f}ms")


@torch.no_grad()
def evaluate(model, val_tokens, cfg, rank, world_size, device):
    """Mean cross-entropy over every target of val_tokens, whatever the number of processes:
    sequences are dealt out to ranks in turn, and the last one is padded with ignored targets."""
    model.eval()
    n_targets, T, B = len(val_tokens) - 1, cfg.seq_len, cfg.micro_batch_size
    n_seqs = -(-n_targets // T)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for first in range(rank * B, n_seqs, world_size * B):
        x = torch.zeros(B, T, dtype=torch.int64)
        y = torch.full((B, T), -100, dtype=torch.int64)  # cross_entropy's ignore_index
        for row, s in enumerate(range(first, min(first + B, n_seqs))):
            piece = val_tokens[s * T:(s + 1) * T + 1]
            x[row, :len(piece) - 1], y[row, :len(piece) - 1] = piece[:-1], piece[1:]
        total += model(x.to(device), y.to(device), reduction="sum").double()
    if world_size > 1:
        dist.all_reduce(total)
    model.train()
    return total.item() / n_targets


def build(cfg, rank, world_size, device):
    """The model (itself, compiled, and wrapped for DDP) and its optimizers."""
    flex = device.type == "cuda"  # FlexAttention has no backward on CPU
    if flex and not cfg.compile:
        raise UserError("on CUDA, --compile=false would run FlexAttention unfused, materialising every "
                        "seq_len x seq_len score matrix; keep compile on")
    raw_model = GPT(cfg, flex=flex).to(device)
    model = torch.compile(raw_model) if cfg.compile else raw_model
    ddp_model = model
    if world_size > 1:  # the only buffers are the rotary tables, the same on every rank: never synced
        # (torch 2.13 names the switch forward_sync_buffers, deprecating 2.11's broadcast_buffers)
        no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else \
            "broadcast_buffers"
        ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, **{no_sync: False})
    return raw_model, model, ddp_model, build_optimizers(raw_model, cfg, rank, world_size, device)


def train_step(step, batches, cfg, ddp_model, optimizers, world_size, sigterm=None):
    """One update from this rank's micro-batches; returns the mean train loss (of the next token) and whether
    SIGTERM reached any rank by the end of the step."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lr_factor(step, cfg)
    for group in (g for opt in optimizers if isinstance(opt, Muon) for g in opt.param_groups):
        group["momentum"] = muon_momentum(step, cfg)
    mtp_weight = cfg.mtp_weight * (1 - step / cfg.steps)  # fades out: the next token is what is scored
    device = batches[0][0].device
    loss_sum = torch.zeros((), device=device)
    for i, (x, y) in enumerate(batches):
        last = i == len(batches) - 1
        with ddp_model.no_sync() if world_size > 1 and not last else contextlib.nullcontext():
            if cfg.mtp_weight:
                loss, second = ddp_model(x, y, horizons=2).unbind()
                objective = loss + mtp_weight * second
            else:
                objective = loss = ddp_model(x, y)
            (objective / len(batches)).backward()
        loss_sum += loss.detach()  # the logged train loss is the next token's, comparable to val loss
    for opt in optimizers:
        opt.step()
    ddp_model.zero_grad(set_to_none=True)
    stop = float(sigterm is not None and sigterm.is_set())
    stats = torch.stack([loss_sum / len(batches), torch.tensor(stop, device=device)])
    if world_size > 1:  # one all-reduce carries both
        dist.all_reduce(stats)
    loss, stops = stats.tolist()
    return loss / world_size, stops > 0


def random_batches(cfg, world_size, device):
    """This rank's micro-batches for one step, of uniformly random tokens."""
    n_tokens = cfg.micro_batch_size * cfg.seq_len + 1
    return [split_micro_batch(torch.randint(0, cfg.vocab_size, (n_tokens,), device=device), cfg)
            for _ in range(cfg.batch_size // (cfg.micro_batch_size * world_size))]


def warm_up(cfg, raw_model, ddp_model, optimizers, world_size, device):
    """Untimed steps on random tokens (the record rules allow them) compile every kernel; then the
    weights and optimizer state go back to their initial values."""
    initial_model = {k: v.clone() for k, v in raw_model.state_dict().items()}
    initial_opts = [opt.state_dict() for opt in optimizers]
    for _ in range(cfg.warmup_steps):
        train_step(0, random_batches(cfg, world_size, device), cfg, ddp_model, optimizers, world_size)
    raw_model.load_state_dict(initial_model)
    for opt, state in zip(optimizers, initial_opts):
        opt.load_state_dict(state)


def train(cfg, log, rank=0, world_size=1, device=torch.device("cpu"), run_dir=None):
    """Train from scratch or from cfg.resume; return the final val loss and the train time in ms.
    Rank 0 writes the checkpoints to run_dir."""
    validate(cfg, world_size)
    if cfg.save_every and rank == 0 and run_dir is None:
        raise ValueError("save_every needs a run_dir to write the checkpoints to")
    torch.manual_seed(cfg.seed)
    loader = TrainLoader(cfg, rank, world_size, device)
    val_tokens = load_val_tokens(cfg)
    reads = cfg.steps * cfg.batch_size * cfg.seq_len
    log(f"train: {len(loader.files)} shards, {loader.usable_tokens:,} tokens before the stream wraps; "
        f"this run reads {reads:,}" + (" (it wraps: more shards would give fresh tokens)"
                                       if reads > loader.usable_tokens else ""))
    log(f"val: {len(val_tokens) - 1:,} targets")
    raw_model, model, ddp_model, optimizers = build(cfg, rank, world_size, device)
    if cfg.warmup_steps:
        warm_up(cfg, raw_model, ddp_model, optimizers, world_size, device)
    if kernels.failed:
        log(f"note: the Triton Gram kernel failed ({kernels.failed[0]}); Newton-Schulz runs on torch's matmul")

    hellaswag = None
    if cfg.hellaswag_every:
        from evals import hellaswag  # evaluation only: what trains stays in this file

        encode, prefix = sampling.text_codec(cfg)[0], hellaswag.context_prefix(cfg.eot_token)

        def items():  # checked here, so that no rank fails alone in the middle of an evaluation
            try:
                items = hellaswag.load_items(hellaswag.ensure(cfg.hellaswag_file))
                hellaswag.check_lengths(items, encode, prefix, cfg.seq_len)
                return items
            except (OSError, ValueError) as e:
                raise UserError(str(e)) from None
        on_all_ranks(lambda: rank == 0 and items(), rank, world_size)  # rank 0 downloads first, then the rest
        hellaswag_items = on_all_ranks(items, rank, world_size)

    start, train_ms, val_loss = 0, 0.0, float("nan")
    track = Tracker(cfg, rank, run_dir, log)
    if cfg.resume:
        start, train_ms = resume(cfg, log, raw_model, optimizers, loader, rank, world_size, device)
    saved = None  # this run's newest checkpoint: each new one replaces it

    def save(step):
        """Rank 0 writes; every rank waits for the outcome, so none exits or errs before the file is
        in place."""
        nonlocal saved
        state = checkpoint_state(cfg, step, train_ms, raw_model, optimizers, loader.state_dict(), world_size, device)

        def write():
            if rank != 0:
                return None
            if not all_finite(state):
                raise UserError(f"step {step}: the weights or optimizer moments are not finite, the run "
                                f"diverged: not saving them")
            path = Path(run_dir) / f"step_{step:06d}.pt"
            try:
                save_checkpoint(state, path)
            except OSError as e:
                raise UserError(f"{path}: cannot write the checkpoint: {e}") from None
            return path

        path = on_all_ranks(write, rank, world_size)
        if rank == 0:
            if saved and saved != path:
                saved.unlink(missing_ok=True)
            saved = path
            log(f"checkpoint: {path}")

    with sigterm_flag(cfg.save_every > 0) as sigterm:
        sync(device)
        t0 = time.perf_counter()
        for step in range(start, cfg.steps + 1):
            last = step == cfg.steps
            validate_now = last or (cfg.val_every and step % cfg.val_every == 0)
            hellaswag_now = hellaswag and (last or step % cfg.hellaswag_every == 0)
            if validate_now or hellaswag_now:  # neither is training: untimed
                sync(device)
                train_ms += 1000 * (time.perf_counter() - t0)
                if validate_now:
                    val_loss = evaluate(model, val_tokens, cfg, rank, world_size, device)
                    log(step_line(step, cfg.steps, "val_loss", val_loss, train_ms))
                    track(step, val_loss=val_loss)  # at the train time of this step's train line
                if hellaswag_now:
                    accuracy = hellaswag.accuracy(raw_model, hellaswag_items, encode, prefix, rank, world_size)
                    log(step_line(step, cfg.steps, "hellaswag_acc", accuracy, train_ms))
                    track(step, hellaswag_acc=accuracy)
                sync(device)
                t0 = time.perf_counter()
            if last:
                break
            loss, stop = train_step(step, loader.next_batches(), cfg, ddp_model, optimizers, world_size, sigterm)
            now_ms = train_ms + 1000 * (time.perf_counter() - t0)
            log(step_line(step + 1, cfg.steps, "train_loss", loss, now_ms))
            t0 += track(step + 1, train_loss=loss, train_time_ms=now_ms)  # the tracker's time is not training
            if not math.isfinite(loss):
                raise UserError(f"step {step + 1}: train loss {loss}, the run diverged; "
                                + (f"the newest checkpoint is {saved}" if saved else "no checkpoint was saved"))
            if cfg.save_every and (stop or (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps):
                sync(device)  # checkpoints are not training: untimed, like validation
                train_ms += 1000 * (time.perf_counter() - t0)
                save(step + 1)
                t0 = time.perf_counter()
            if stop:
                log(f"SIGTERM: stopped after step {step + 1}; continue with --resume={saved or 'latest'}")
                raise Preempted()

    track.finish()
    tokens = cfg.steps * cfg.batch_size * cfg.seq_len
    log(f"final val_loss:{val_loss:.4f} train_time:{train_ms / 1000:.2f}s "
        f"tokens/s:{tokens / (train_ms / 1000):.0f} ({tokens / (train_ms / 1000) / world_size:.0f} per process)")
    if device.type == "cuda":
        log(f"peak memory allocated: {torch.cuda.max_memory_allocated() // 2**20} MiB "
            f"reserved: {torch.cuda.max_memory_reserved() // 2**20} MiB")
    if cfg.sample_tokens and rank == 0:
        log(f"{SEPARATOR}\n{log_sample(raw_model, cfg)}")
    return val_loss, train_ms


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- sampling

def log_sample(model, cfg):
    """The end of a run's log: a sample from the trained model. The run is over, so a failure here
    (no tokenizer files offline, say) is reported, not raised."""
    head = f"sample: {cfg.sample_tokens} tokens, temperature 0.8, top-k 40, seed {cfg.seed}"
    try:
        encode, decode, vocab = sampling.text_codec(cfg)
        ids = sampling.generate(model, sampling.start_of_text(cfg, encode), cfg.sample_tokens, vocab, seed=cfg.seed)
        return f"{head}\n{decode(ids)}"
    except Exception as e:
        return f"{head}: skipped ({type(e).__name__}: {e})"


# ----------------------------------------------------------------------------- main

SEPARATOR = "=" * 100
# Every file a run executes. The log holds them all: the trainer, then each other one after a line of
# 100 '-' and "file: NAME"; the checkpoint's source digest covers them, and `reproduce` restores them.
SOURCES = ("train_gpt.py", "kernels.py", "sampling.py")
FILE_MARK = "-" * 100


def logged_source(files=SOURCES):
    here = Path(__file__).resolve().parent
    texts = [(here / name).read_text().rstrip("\n") for name in files]
    return "\n".join([texts[0], *(f"{FILE_MARK}\nfile: {name}\n{text}" for name, text in zip(files[1:], texts[1:]))])


def cpu_info():
    """The fields of /proc/cpuinfo, the last processor's where it lists several ({} without the file)."""
    if not os.path.exists("/proc/cpuinfo"):
        return {}
    with open("/proc/cpuinfo") as f:
        return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in f if ":" in line)}


def versions():
    """python, torch, CUDA, NCCL, Triton and numpy versions, in one line."""
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else "none"
    return (f"python {platform.python_version()}  torch {torch.__version__}  cuda {torch.version.cuda or 'none'}  "
            f"nccl {nccl}  triton {kernels.triton.__version__ if kernels.triton else 'none'}  numpy {np.__version__}")


def environment_report(device):
    """Versions and hardware, for the head of the log."""
    lines = [versions()]
    if device.type == "cuda":
        try:
            lines.append(subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout)
        except (OSError, subprocess.TimeoutExpired) as e:
            lines.append(f"nvidia-smi unavailable: {e}")
    else:
        info = cpu_info()
        model = info.get("model name", platform.processor() or platform.machine())
        flags = set(info.get("flags", "").split())
        vector = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]  # bf16 speed hinges on these
        lines.append(f"cpu: {model}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
                     f"{' '.join(vector) or 'no avx2'}")
    return "\n".join(lines)


class Logger:
    """Rank 0 prints and appends to <log_dir>/<date>_<id>/log.txt; other ranks stay silent."""

    def __init__(self, log_dir, rank):
        self.path = None
        if rank == 0:
            run_id = time.strftime("%Y-%m-%d_%H%M%S") + "_" + uuid.uuid4().hex[:8]
            self.path = Path(log_dir) / run_id / "log.txt"
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, text, echo=True):
        if self.path is None:
            return
        if echo:
            print(text, flush=True)
        with open(self.path, "a") as f:
            f.write(text + "\n")


def wandb_key_known():
    """Whether wandb has a key without asking: in WANDB_API_KEY, or in ~/.netrc for its host, where `wandb login`
    writes it. Without one, wandb.init would prompt at a terminal and wait."""
    import netrc
    import urllib.parse
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urllib.parse.urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class Tracker:
    """Weights & Biases, when cfg.wandb_project names a project: rank 0 logs the config, then each step line's
    metrics, to a run named like the log folder. Tracking is optional: any failure of it is logged and ends
    the tracking, never the training."""

    def __init__(self, cfg, rank, run_dir, log):
        self.run, self.log = None, log
        if cfg.wandb_project and rank == 0:
            self.attempt("start", lambda: self.start(cfg, run_dir))

    def start(self, cfg, run_dir):
        import wandb  # optional: only the runs that ask for tracking need it
        if os.environ.get("WANDB_MODE") not in ("offline", "disabled", "dryrun") and not wandb_key_known():
            raise RuntimeError("no W&B API key (`wandb login`, or WANDB_MODE=offline), and no prompt for one "
                               "while the other ranks wait")
        self.run = wandb.init(project=cfg.wandb_project, name=Path(run_dir).name, dir=run_dir,
                              config=dataclasses.asdict(cfg))

    def attempt(self, what, call):
        try:
            call()
        except Exception as e:  # noqa: BLE001  whatever wandb raises (no login, no network, full disk)
            self.log(f"wandb: could not {what} ({type(e).__name__}: {str(e).strip()[:300]}); tracking stops, "
                     f"training goes on")
            self.run = None

    def __call__(self, step, **metrics):
        """Log the metrics at this step; return the seconds it took, to leave out of the train time."""
        if self.run is None:
            return 0.0
        started = time.perf_counter()
        self.attempt(f"log step {step}", lambda: self.run.log(metrics, step=step))
        return time.perf_counter() - started

    def finish(self):
        if self.run is not None:
            self.attempt("finish", self.run.finish)


def start_log(log_dir, rank, header, device, sources=SOURCES):
    """A Logger whose file begins as every log of this repository does: the source that runs, versions and
    hardware, then the header (preset, config, ...) as JSON, each after a line of 100 '='."""
    log = Logger(log_dir, rank)
    if log.path:
        print(f"log: {log.path}", flush=True)
        log(logged_source(sources), echo=False)
        for text in (environment_report(device), json.dumps(header, indent=2)):
            log(SEPARATOR, echo=False)
            log(text)
        log(SEPARATOR, echo=False)
    return log


def init_process():
    """(distributed, rank, world_size, device) of this process; under torchrun, in a process group
    (NCCL on GPUs, gloo on CPUs)."""
    distributed = "RANK" in os.environ  # launched by torchrun
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        # modulo: a launcher that shows each process only its own GPU (srun --gpus-per-task=1) still says LOCAL_RANK
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        # Compiled CPU kernels accumulate some gradients with atomic adds; the deterministic ones
        # cost nothing measurable here and make every CPU run reproducible to the last bit.
        torch.use_deterministic_algorithms(True)
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return distributed, rank, world_size, device


def main(argv=None):
    preset, cfg = parse_config(argv)
    distributed, rank, world_size, device = init_process()
    try:
        log = start_log(cfg.log_dir, rank, {
            "preset": preset, "world_size": world_size, "device": str(device),
            "argv": sys.argv if argv is None else [sys.argv[0], *argv], "config": dataclasses.asdict(cfg)}, device)
        train(cfg, log, rank, world_size, device, log.path and log.path.parent)
        if log.path:
            print(f"log: {log.path}", flush=True)
        if distributed:  # no rank tears down gloo while another still talks to it (aborts at exit)
            dist.barrier()
    except UserError as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
            log(f"error: {e}", echo=False)
        return 1
    except Preempted:
        return 128 + signal.SIGTERM  # the shell's code for a process ended by SIGTERM
    finally:
        if distributed:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
