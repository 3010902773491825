"""data/cached_fineweb10B.py through its command line, against a hub on 127.0.0.1 (tests/hub_server.py) that
the real huggingface_hub client talks to: fresh and repeated downloads, dropped connections, a killed
downloader, a missing shard, damaged bytes, a write that fails and a hub that is down."""
import hashlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT
from hub_server import Hub
from train_gpt import write_shard

REPO = "kjj0/fineweb10B-gpt2"
NAMES = ["fineweb_val_000000.bin", "fineweb_train_000001.bin", "fineweb_train_000002.bin"]


@pytest.fixture
def hub(tmp_path):
    files = {}
    for i, name in enumerate(NAMES):
        write_shard(tmp_path / name, np.random.default_rng(i).integers(0, 50257, 300_000))  # 601,024 bytes
        files[name] = (tmp_path / name).read_bytes()
        (tmp_path / name).unlink()
    server = Hub(REPO, files)
    yield server
    server.close()


def fetch(hub_url, out, *args, preexec_fn=None, wait=True):
    """Run the downloader as a user would, against the hub at hub_url."""
    env = dict(os.environ, HF_ENDPOINT=hub_url, HF_HUB_DISABLE_TELEMETRY="1", HF_HOME=str(out.parent / "hf-home"))
    env.pop("HF_HUB_OFFLINE", None)
    cmd = [sys.executable, str(ROOT / "data" / "cached_fineweb10B.py"), *args, "--dir", str(out)]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, preexec_fn=preexec_fn, timeout=300)


def error_line(result):
    """The one line a failure prints last, after checking there is no traceback."""
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1]


def test_fresh_download_then_nothing(hub, tmp_path):
    out = tmp_path / "fineweb10B"
    first = fetch(hub.url, out, "2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "3 shards ready" in first.stdout and "(3 downloaded, every one checked)" in first.stdout
    assert "shards: 100%" in first.stderr and "fineweb_train_000002.bin" in first.stderr  # the progress bars
    for name in NAMES:
        assert (out / name).read_bytes() == hub.files[name]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest == {name: hashlib.sha256(hub.files[name]).hexdigest() for name in NAMES}
    assert hub.sent == {name: len(hub.files[name]) for name in NAMES}
    gets = len(hub.gets)
    again = fetch(hub.url, out, "2")
    assert again.returncode == 0 and "(0 downloaded, every one checked)" in again.stdout
    assert len(hub.gets) == gets  # not a byte more


def test_shards_fetched_before_manifests_are_vouched_for_by_the_hub(hub, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in NAMES[:2]:
        (out / name).write_bytes(hub.files[name])
    result = fetch(hub.url, out, "1")
    assert result.returncode == 0 and "(0 downloaded, every one checked)" in result.stdout
    assert hub.gets == [] and sorted(json.loads((out / "manifest.json").read_text())) == NAMES[:2][::-1]


def test_a_dropped_connection_resumes_where_it_broke(hub, tmp_path):
    name = NAMES[1]
    hub.drops[name] = [200_000]
    result = fetch(hub.url, tmp_path / "out", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{name}: IncompleteRead, retrying in 1 s" in result.stderr
    assert [g for g in hub.gets if g[0] == name] == [[name, 0, 200_000], [name, 200_000, 401_024]]
    assert hub.sent[name] == len(hub.files[name])  # nothing sent twice


def test_more_drops_than_retries_then_the_next_run_resumes(hub, tmp_path):
    name, out = NAMES[1], tmp_path / "out"
    hub.drops[name] = [150_000, 150_000]
    failed = fetch(hub.url, out, "1", "--retries", "1")
    line = error_line(failed)
    assert line.startswith(f"error: {name}: download from {hub.url} failed after 2 attempts: IncompleteRead")
    assert line.endswith(f"300,000 bytes kept in {out / name}.part for the next run")
    assert not (out / name).exists() and (out / f"{name}.part").stat().st_size == 300_000
    resumed = fetch(hub.url, out, "1")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [g for g in hub.gets if g[0] == name] == [[name, 0, 150_000], [name, 150_000, 150_000],
                                                     [name, 300_000, 301_024]]
    assert hub.sent[name] == len(hub.files[name]) and (out / name).read_bytes() == hub.files[name]
    assert not (out / f"{name}.part").exists()


def test_a_killed_downloader_is_resumed(hub, tmp_path):
    name, out = NAMES[0], tmp_path / "out"
    hub.delay = 0.05  # 64 KiB every 50 ms: time to kill it half-way
    part = out / f"{name}.part"
    run = fetch(hub.url, out, "0", wait=False)
    deadline = time.time() + 60
    while not (part.exists() and part.stat().st_size >= 200_000):
        assert time.time() < deadline and run.poll() is None, run.communicate()
        time.sleep(0.02)
    run.send_signal(signal.SIGKILL)
    run.communicate()
    kept = part.stat().st_size
    hub.delay = 0
    resumed = fetch(hub.url, out, "0")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert hub.gets[-1] == [name, kept, len(hub.files[name]) - kept]  # only what the first run did not keep
    assert (out / name).read_bytes() == hub.files[name]


def test_a_part_of_another_version_of_the_file_is_not_continued(hub, tmp_path):
    name, out = NAMES[0], tmp_path / "out"
    hub.drops[name] = [100_000]
    assert fetch(hub.url, out, "0", "--retries", "0").returncode == 1  # 100,000 bytes kept
    old = hub.files[name]
    hub.files[name] = old[:2000] + bytes(255 - b for b in old[2000:])  # the hub's file changes meanwhile
    assert fetch(hub.url, out, "0").returncode == 0
    assert (out / name).read_bytes() == hub.files[name] and hub.gets[-1] == [name, 0, len(old)]


def test_a_hub_that_refuses_is_not_asked_again(hub, tmp_path):
    hub.refuse = (401, "RepoNotFound")  # what the hub answers for a private repository without a token
    started = time.time()
    line = error_line(fetch(hub.url, tmp_path / "out", "0"))
    assert line == (f"error: {NAMES[0]}: {hub.url} does not give the dataset {REPO} (RepositoryNotFoundError): no "
                    f"such dataset, or log in (`hf auth login`) with access to it")
    assert time.time() - started < 20 and hub.gets == []  # no retries with backoff


def test_a_missing_shard_is_one_line(hub, tmp_path):
    result = fetch(hub.url, tmp_path / "out", "3")  # the hub holds 2 train shards
    assert error_line(result) == (f"error: fineweb_train_000003.bin: no such file in the dataset {REPO} on "
                                  f"{hub.url}")
    assert (tmp_path / "out" / NAMES[2]).exists()  # what came before it is kept


def test_bytes_that_do_not_match_the_hubs_sha256_are_not_kept(hub, tmp_path):
    name, out = NAMES[0], tmp_path / "out"
    hub.lies[name] = "ab" * 32
    line = error_line(fetch(hub.url, out, "0"))
    actual = hashlib.sha256(hub.files[name]).hexdigest()
    assert line == (f"error: {name}: SHA-256 {actual} differs from the hub's {'ab' * 32}: the bytes are damaged; "
                    f"deleted, run again")
    assert not (out / name).exists() and not (out / f"{name}.part").exists()
    assert name not in json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").exists() else True

    del hub.lies[name]  # a shard damaged on disk after its download is found and fetched again
    assert fetch(hub.url, out, "0").returncode == 0
    with open(out / name, "r+b") as f:
        f.seek(5000)
        f.write(b"\x00\x01")
    repaired = fetch(hub.url, out, "0")
    assert repaired.returncode == 0 and f"{out / name}: not the bytes the hub has, fetching it again" in repaired.stderr
    assert (out / name).read_bytes() == hub.files[name]


def test_a_hub_that_gives_no_sha256_is_said_so(hub, tmp_path):
    """An ETag that is no SHA-256 (a file the hub does not keep in LFS): size and header checked, and said."""
    hub.lies[NAMES[0]] = "1234abcd"
    result = fetch(hub.url, tmp_path / "out", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{NAMES[0]}: the hub gives no SHA-256 for it: only its size and header are checked" in result.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest[NAMES[0]] == hashlib.sha256(hub.files[NAMES[0]]).hexdigest()  # what later runs check against


def test_a_write_that_fails_leaves_nothing_that_looks_complete(hub, tmp_path):
    def small_files():  # as a full disk does, refuse the write past 100 kB (EFBIG instead of ENOSPC)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    out = tmp_path / "out"
    line = error_line(fetch(hub.url, out, "0", preexec_fn=small_files))
    assert line == f"error: {out / NAMES[0]}.part: File too large: cannot write the shard"
    assert not (out / NAMES[0]).exists()
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    line = error_line(fetch(hub.url, blocker / "shards", "0"))
    assert line == f"error: {blocker / 'shards'}: Not a directory: cannot hold the shards"


def test_a_hub_that_is_down_is_one_line_after_bounded_retries(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    started = time.time()
    line = error_line(fetch(url, tmp_path / "out", "0", "--retries", "2"))
    assert line.startswith(f"error: fineweb_val_000000.bin: {url} did not answer after 3 attempts: ")
    assert "Connect" in line and time.time() - started < 60


def test_a_damaged_shard_found_later_names_the_command_that_refetches_it(tmp_path):
    from tools.preflight import check_digests
    from train_gpt import UserError, read_header
    shard = tmp_path / "fineweb_train_000012.bin"
    write_shard(shard, np.arange(1000))
    (tmp_path / "manifest.json").write_text(json.dumps({shard.name: hashlib.sha256(shard.read_bytes()).hexdigest()}))
    details = []
    check_digests([str(shard)], details)
    assert details == [f"{shard}: SHA-256 matches the hub's"]
    with open(shard, "r+b") as f:  # one token changed: the header still reads well
        f.seek(2000)
        f.write(b"\x07")
    with pytest.raises(UserError, match=r"fineweb_train_000012\.bin: SHA-256 \w+ differs from the hub's \w+, recorded "
                                        r"in .*manifest\.json at download: damaged since; `python data/cached_fineweb10B"
                                        r"\.py 12` checks the shards and fetches damaged ones again"):
        check_digests([str(shard)], details)
    shard.write_bytes(shard.read_bytes()[:2500])  # truncated: the trainer's own check says the same
    with pytest.raises(UserError, match=r"truncated or corrupt; `python data/cached_fineweb10B.py 12` checks"):
        read_header(shard)
    val = tmp_path / "fineweb_val_000000.bin"
    val.write_bytes(b"short")
    with pytest.raises(UserError, match=r"shard header; `python data/cached_fineweb10B.py 10` checks"):
        read_header(val)
