"""run.sh under Slurm: the mapping of Slurm's environment onto torchrun's, then a real Slurm (munged,
slurmctld and slurmd on 127.0.0.1, started here) running two tasks of one node that train as one process
does. The real-Slurm test is skipped, saying why, where Debian's slurm-wlm and munge are not installed."""
import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, config_args, cpu_env, tiny_config
from tools.logs import parse_log, printed_log_path

FAKE_PYTHON = """#!/bin/sh
# stands for python: the import check passes; otherwise it prints what run.sh would have run, and with what
[ "$1" = "-c" ] && exit 0
echo "RANK=${RANK:-} WORLD_SIZE=${WORLD_SIZE:-} LOCAL_RANK=${LOCAL_RANK:-} \
MASTER_ADDR=${MASTER_ADDR:-} MASTER_PORT=${MASTER_PORT:-}"
echo "ARGS $*"
"""


def launched(tmp_path, **env):
    """What run.sh starts, and with what environment, given these variables (no Slurm needed)."""
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    base = {k: v for k, v in cpu_env().items() if not k.startswith(("SLURM_", "MASTER_", "NNODES", "NODE_RANK"))}
    result = subprocess.run(["bash", str(ROOT / "run.sh"), "--train_files=x", "--val_files=y"], capture_output=True,
                            text=True, timeout=60, env={**base, "PYTHON": str(fake), **env})
    return result


def test_a_task_per_process_runs_the_trainer_with_slurms_ranks(tmp_path):
    result = launched(tmp_path, SLURM_JOB_ID="1234", SLURM_STEP_ID="0", SLURM_NNODES="1", SLURM_NTASKS="2",
                      SLURM_PROCID="1", SLURM_LOCALID="1", SLURM_NODEID="0", SLURM_JOB_NODELIST="gpu-a17")
    assert result.returncode == 0, result.stderr
    env, args = result.stdout.splitlines()[-2:]
    assert env == "RANK=1 WORLD_SIZE=2 LOCAL_RANK=1 MASTER_ADDR=gpu-a17 MASTER_PORT=21234"
    assert args == "ARGS train_gpt.py --train_files=x --val_files=y"  # no torchrun: srun started the processes


def test_a_task_per_node_runs_torchrun_with_the_jobs_layout(tmp_path):
    slurm = dict(SLURM_JOB_ID="77", SLURM_STEP_ID="0", SLURM_NNODES="2", SLURM_NTASKS="2", SLURM_PROCID="1",
                 SLURM_LOCALID="0", SLURM_NODEID="1", SLURM_JOB_NODELIST="gpu-[a17,b03]", NPROC_PER_NODE="4")
    result = launched(tmp_path, **slurm)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == (
        "ARGS -m torch.distributed.run --nnodes=2 --node_rank=1 --master_addr=gpu-a17 --master_port=20077 "
        "--nproc_per_node=4 train_gpt.py --train_files=x --val_files=y")
    for nodes, first in (("node[001-004]", "node001"), ("a,b", "a"), ("c7", "c7"), ("x[3,5-7],y", "x3")):
        got = launched(tmp_path, **{**slurm, "SLURM_JOB_NODELIST": nodes}).stdout.splitlines()[-1]
        assert f" --master_addr={first} " in got, (nodes, got)
    # the user's own settings win
    mine = launched(tmp_path, **slurm, MASTER_ADDR="10.0.0.5", MASTER_PORT="29999", NODE_RANK="0")
    assert "--node_rank=0 --master_addr=10.0.0.5 --master_port=29999" in mine.stdout.splitlines()[-1]
    # in the batch script of a job of 2 nodes, not under srun, it would start one node of two
    batch = launched(tmp_path, SLURM_JOB_ID="77", SLURM_NNODES="2", SLURM_JOB_NODELIST="gpu-[a17,b03]")
    assert batch.returncode == 2 and "start run.sh on each with srun" in batch.stderr


# ----------------------------------------------------------------------------- a real Slurm

SLURM_CONF = """ClusterName=speedrun-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
AuthInfo=socket={dir}/munge.socket,cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A one-node cluster on this machine: munged, slurmctld and slurmd, run as root; the environment that
    points Slurm's commands at it."""
    missing = [b for b in ("munged", "slurmctld", "slurmd", "srun", "sinfo") if not shutil.which(b)]
    if missing:
        pytest.skip(f"no {', '.join(missing)}: `apt-get install slurm-wlm munge` (.ci/run does)")
    if os.geteuid() != 0:
        pytest.skip("the test cluster's daemons run as root")
    if not os.path.exists("/etc/munge/munge.key"):
        pytest.skip("no /etc/munge/munge.key (Debian's munge package makes one)")
    d = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool"):
        (d / sub).mkdir()
    conf = d / "slurm.conf"
    conf.write_text(SLURM_CONF.format(host=socket.gethostname(), ctld_port=free_port(), d_port=free_port(), dir=d,
                                      cpus=os.cpu_count()))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    daemons = []
    try:
        subprocess.run(["munged", f"--socket={d}/munge.socket", f"--pid-file={d}/munged.pid", "--force",
                        f"--log-file={d}/munged.log", f"--seed-file={d}/munged.seed"], check=True, timeout=30)
        for daemon in ("slurmctld", "slurmd"):
            daemons.append(subprocess.Popen([daemon, "-D", *(["-c"] if daemon == "slurmctld" else [])], env=env,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.time() + 60
        while "idle" not in subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True,
                                           text=True).stdout:
            if time.time() > deadline:
                pytest.fail(f"the test cluster did not come up: {(d / 'slurmctld.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield env
    finally:
        for p in daemons:
            p.terminate()
            p.wait(timeout=30)
        if (d / "munged.pid").exists():
            subprocess.run(["kill", (d / "munged.pid").read_text().strip()], check=False)


def test_two_slurm_tasks_train_as_one_process_does(slurm, char_shards, tmp_path):
    """`srun -N1 -n2 ./run.sh`: each task is one gloo process whose rank is its SLURM_PROCID; batch 8 in micro-
    batches of 4 gives the one-process run's losses."""
    cfg = tiny_config(char_shards, tmp_path, micro_batch_size=4, steps=5, val_every=2, n_layer=3)
    one_cfg, two_cfg = (dataclasses.replace(cfg, log_dir=str(tmp_path / name)) for name in ("one", "two"))
    env = {**cpu_env(), "SLURM_CONF": slurm["SLURM_CONF"], "PYTHON": sys.executable}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK"):
        env.pop(key, None)  # whatever ranks the tasks have, Slurm gave them
    tasks = subprocess.run(["srun", "-N1", "-n2", f"--chdir={ROOT}", "bash", "run.sh", *config_args(two_cfg)],
                           capture_output=True, text=True, timeout=600, env=env)
    assert tasks.returncode == 0, tasks.stderr[-3000:]
    one = subprocess.run(["bash", str(ROOT / "run.sh"), *config_args(one_cfg)], capture_output=True, text=True,
                         timeout=600, env={**cpu_env(), "PYTHON": sys.executable})
    assert one.returncode == 0, one.stderr[-3000:]
    two, single = parse_log(printed_log_path(tasks.stdout)), parse_log(printed_log_path(one.stdout))
    assert tasks.stdout.count("log: ") == 2 and len({p for p in tasks.stdout.split() if p.endswith("log.txt")}) == 1
    assert two.config["world_size"] == 2 and single.config["world_size"] == 1
    assert [(s.step, s.kind) for s in two.steps] == [(s.step, s.kind) for s in single.steps]
    for a, b in zip(single.steps, two.steps):
        assert a.loss == pytest.approx(b.loss, abs=2e-4), (a, b)


def test_the_batch_script_checkpoints_requeues_and_resumes(slurm, char_shards, tmp_path):
    """slurm/record.sbatch on the test cluster, on the CPU: the preflight, then training; SIGTERM to the job's
    step (what --signal sends before the time limit, and pre-emption) makes it checkpoint and stop; the
    script queues the job again and the second start resumes the checkpoint and finishes."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT, repo, ignore=shutil.ignore_patterns(".git", ".venv", "logs", "__pycache__", "fineweb10B",
                                                              "cifar10", "hellaswag", ".pytest_cache"))
    (repo / "logs").mkdir()
    cfg = tiny_config(char_shards, tmp_path, steps=1500, val_every=0, log_dir="unused")
    args = [a for a in config_args(cfg) if not a.startswith(("--log_dir=", "--save_every=", "--resume="))]
    env = {**cpu_env(), "SLURM_CONF": slurm["SLURM_CONF"], "PYTHON": sys.executable, "SAVE_EVERY": "20"}
    job = subprocess.run(["sbatch", "--parsable", "--gpus-per-node=0", "slurm/record.sbatch", *args], cwd=repo,
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    out, log_dir = repo / "logs" / f"slurm-{job}.out", repo / "logs" / f"slurm-{job}"

    def wait_for(what, done, seconds=300):
        deadline = time.time() + seconds
        while not done():
            tail = out.read_text()[-3000:] if out.exists() else ""
            assert time.time() < deadline, f"waited {seconds} s for {what}: {tail}"
            time.sleep(0.5)

    def state():  # from the controller; None while it does not answer (squeue's empty answer is ambiguous)
        shown = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
        return next((f.split("=", 1)[1] for f in shown.split() if f.startswith("JobState=")), None)

    wait_for("a checkpoint", lambda: any(log_dir.glob("*/step_*.pt")))
    subprocess.run(["scancel", "--signal=TERM", job], env=env, check=True)
    wait_for("the requeue", lambda: out.exists() and "queueing the job again" in out.read_text())
    wait_for("the job to be pending again", lambda: state() == "PENDING")
    # Slurm holds a requeued job until its old credential expires: 120 s by default, 10 s on this cluster
    # (AuthInfo's cred_expire). Started sooner, as by `scontrol update StartTime=now`, the job is killed for
    # a revoked credential.
    wait_for("the job to finish", lambda: state() in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"))

    text = out.read_text()
    assert "stopped with status 143: queueing the job again to resume it" in text
    assert f"start 1: resuming the newest checkpoint in logs/slurm-{job}" in text
    runs = sorted(log_dir.glob("2*/log.txt"))
    assert len(runs) == 2 and "PASS" in "".join(p.read_text() for p in (log_dir / "preflight").glob("*/log.txt"))
    first, second = (parse_log(p) for p in runs)
    stopped = first.train[-1].step
    assert f"SIGTERM: stopped after step {stopped}" in runs[0].read_text()
    assert f"resumed from logs/slurm-{job}/{runs[0].parent.name}/step_{stopped:06d}.pt at step {stopped}" in \
        runs[1].read_text()
    assert second.val[-1].step == 1500 and second.train[0].step == stopped + 1
