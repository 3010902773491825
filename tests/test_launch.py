"""run.sh launches: two torchrun "nodes" on one machine, gloo, against one process."""
import dataclasses
import socket
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, config_args, cpu_env, tiny_config
from tools.logs import parse_log, printed_log_path
from train_gpt import load_checkpoint


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_sh(cfg, **env):
    return subprocess.Popen(["bash", str(ROOT / "run.sh"), *config_args(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**cpu_env(), "PYTHON": sys.executable, **env})


def finish(proc):
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return out


def test_two_nodes_match_one_process(char_shards, tmp_path):
    """`NNODES=2 NODE_RANK=0|1 MASTER_ADDR=127.0.0.1 ./run.sh` on one machine: torchrun's static
    rendezvous joins the two "nodes" over TCP and gloo. Batch 8, micro-batches of 4: one process
    accumulates 2, each node computes 1, so the losses and the final state must agree. Each run checkpoints
    at the end: the Muon momentum gathered from two ranks (3 matrices per shape: one share is padded)
    equals the one-process momentum, and a one-process run resumes the two-node checkpoint."""
    cfg = tiny_config(char_shards, tmp_path, micro_batch_size=4, steps=5, val_every=2, n_layer=3, save_every=5)
    one_cfg, two_cfg = (dataclasses.replace(cfg, log_dir=str(tmp_path / name)) for name in ("one", "two"))
    port = str(free_port())
    nodes = [run_sh(two_cfg, NNODES="2", NODE_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                    NPROC_PER_NODE="1") for rank in (0, 1)]
    one = parse_log(printed_log_path(finish(run_sh(one_cfg))))
    outs = [finish(node) for node in nodes]
    assert "log: " not in outs[1]  # rank 0, on node 0, logs; node 1 stays silent
    two = parse_log(printed_log_path(outs[0]))

    assert one.config["world_size"] == 1 and two.config["world_size"] == 2
    assert [(s.step, s.kind) for s in one.steps] == [(s.step, s.kind) for s in two.steps] and len(one.steps) == 5 + 4
    for a, b in zip(one.steps, two.steps):
        assert a.loss == pytest.approx(b.loss, abs=2e-4), (a, b)

    (one_ckpt,), (two_ckpt,) = [list((tmp_path / name).glob("*/step_000005.pt")) for name in ("one", "two")]
    a, b = load_checkpoint(one_ckpt, cfg), load_checkpoint(two_ckpt, cfg)
    assert (a["world_size"], b["world_size"]) == (1, 2)
    assert a["muon"].keys() == b["muon"].keys() == {"momentum_buffer", "neuron_moment"}
    for name in a["muon"]:  # 3 blocks of 6 matrices: q, k, v, the attention's and the MLP's projections, fc
        assert len(a["muon"][name]) == len(b["muon"][name]) == 3 * 6
        for x, y in zip(a["muon"][name], b["muon"][name]):
            torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-3)
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=1e-4, rtol=1e-3)

    resumed = parse_log(printed_log_path(finish(run_sh(dataclasses.replace(one_cfg, resume=str(two_ckpt))))))
    assert f"resumed from {two_ckpt} at step 5" in resumed.path.read_text()
    assert "written by 2 processes" in resumed.path.read_text()
    assert [(s.step, s.kind) for s in resumed.steps] == [(5, "val_loss")]
    assert resumed.steps[0].loss == pytest.approx(two.steps[-1].loss, abs=2e-4)


@pytest.mark.parametrize("env, message", [
    (dict(NNODES="1:2"), "run.sh: NNODES must be a whole number, got '1:2'"),
    (dict(NPROC_PER_NODE="auto"), "run.sh: NPROC_PER_NODE must be a whole number, got 'auto'"),
    (dict(NNODES="2", NODE_RANK="0"), "set MASTER_ADDR to the address of node 0"),
])
def test_run_sh_refuses_an_incomplete_node_setup(env, message):
    result = subprocess.run(["bash", str(ROOT / "run.sh")], capture_output=True, text=True, timeout=120,
                            env={**cpu_env(), "PYTHON": sys.executable, **env})
    assert result.returncode != 0 and message in result.stderr, result.stderr
    assert "train:" not in result.stdout  # nothing started
