"""Download FineWeb-10B already tokenised with GPT-2 BPE: the val shard and the first N train shards.

    python data/cached_fineweb10B.py       # 10 train shards: the 1B tokens the record run reads
    python data/cached_fineweb10B.py 103   # all of it

Each shard holds 100M tokens (~200 MB). huggingface_hub resolves each file on the hub (its size, its
SHA-256 and the commit); the bytes come by plain HTTP GET into NAME.part, which a later run resumes
with a ranged request, whether the last one failed or was killed. A shard is kept only when its
SHA-256 matches the hub's; manifest.json records it, and every run checks the shards it has against
it. HF_ENDPOINT points the download at another hub.
"""
import argparse
import http.client
import importlib
import json
import re
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from train_gpt import UserError, file_sha256, read_header  # noqa: E402

REPO_ID = "kjj0/fineweb10B-gpt2"
HERE = Path(__file__).resolve().parent
MANIFEST = "manifest.json"
CHUNK = 1 << 20
SHA256 = re.compile(r"[0-9a-f]{64}")


def shard_names(n_train):
    return ["fineweb_val_000000.bin"] + [f"fineweb_train_{i:06d}.bin" for i in range(1, n_train + 1)]


def transport_errors():
    """What a dropped, refused or timed-out connection raises: the errors of urllib (our GET) and of
    whichever HTTP library huggingface_hub runs on (httpx2, httpx or requests)."""
    errors = [ConnectionError, TimeoutError, urllib.error.URLError, http.client.HTTPException]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "ConnectionError")):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def permanent(e):
    """An HTTP answer that asking again will not change: 4xx but for timeouts, rate limits and a range past the
    end (the part is deleted then, and the next attempt starts from 0)."""
    status = getattr(e, "code", None) or getattr(getattr(e, "response", None), "status_code", None)
    return isinstance(status, int) and 400 <= status < 500 and status not in (408, 416, 429)


def with_retries(what, call, retries, backoff):
    """call(), tried again after a transport error, retries times, 1, 2, 4 ... s apart (times backoff)."""
    errors = transport_errors()
    for attempt in range(retries + 1):
        try:
            return call()
        except errors as e:
            if permanent(e) or attempt == retries:
                raise
            tqdm.write(f"{what}: {type(e).__name__}, retrying in {backoff * 2 ** attempt:g} s", file=sys.stderr)
            time.sleep(backoff * 2 ** attempt)


def first_line(e):
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or ['-'])[0]}"


def attempts(retries):
    return f"{retries + 1} attempt{'s' * (retries > 0)}"


class Hub:
    """The files of the dataset repository: what huggingface_hub says of them, and their bytes."""

    def __init__(self, repo_id=REPO_ID):
        self.repo_id = repo_id

    def metadata(self, name):
        """(url, size, sha256, commit) of a file, sha256 None when the hub's ETag is not one; UserError when
        the hub has no such file, or will not give it."""
        from huggingface_hub import get_hf_file_metadata, hf_hub_url
        from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, RepositoryNotFoundError,
                                            RevisionNotFoundError)
        url = hf_hub_url(self.repo_id, name, repo_type="dataset")
        try:
            meta = get_hf_file_metadata(url)
        except (EntryNotFoundError, RevisionNotFoundError):
            raise UserError(f"{name}: no such file in the dataset {self.repo_id} on {endpoint()}") from None
        except (GatedRepoError, RepositoryNotFoundError) as e:  # a gated, private or missing repository
            raise UserError(f"{name}: {endpoint()} does not give the dataset {self.repo_id} ({type(e).__name__}): "
                            f"no such dataset, or log in (`hf auth login`) with access to it") from None
        if meta.size is None:
            raise UserError(f"{name}: {endpoint()} gives no size for it: not a file this script can fetch")
        digest = (meta.etag or "").strip('"').removeprefix("W/").strip('"')  # an LFS file's ETag is its SHA-256
        return meta.location or url, meta.size, digest if SHA256.fullmatch(digest) else None, meta.commit_hash

    def get(self, url, start):
        """A response streaming the file's bytes from offset `start`, and whether it honours that offset."""
        from huggingface_hub.utils import build_hf_headers
        headers = {"Range": f"bytes={start}-"} if start else {}
        if urllib.parse.urlsplit(url).netloc == urllib.parse.urlsplit(endpoint()).netloc:
            headers.update(build_hf_headers())  # the token goes to the hub only, not to a CDN it redirects to
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60)
        return response, response.status == 206


def endpoint():
    from huggingface_hub import constants
    return constants.ENDPOINT


def download(hub, name, path, retries, backoff=1.0):
    """Fetch one shard into path through path.part, resuming what a run before left there if the hub still
    has the same file; keep it only if its SHA-256 matches the hub's. Returns that SHA-256."""
    part, tag = path.with_name(path.name + ".part"), path.with_name(path.name + ".part.etag")
    try:
        url, size, digest, commit = with_retries(name, lambda: hub.metadata(name), retries, backoff)
    except transport_errors() as e:
        raise UserError(f"{name}: {endpoint()} did not answer after {attempts(retries)}: {first_line(e)}") from None
    version = digest or commit or ""
    if part.exists() and (part.stat().st_size > size or not tag.exists() or tag.read_text() != version):
        part.unlink()  # left by a run for another version of the file, or longer than it: start again
    tag.write_text(version)

    def attempt():
        have = part.stat().st_size if part.exists() else 0
        if have == size:
            return
        try:
            response, ranged = hub.get(url, have)
        except urllib.error.HTTPError as e:
            if e.code == 416:  # the hub cannot serve from where the part ends: start again
                part.unlink()
            raise
        with response, open(part, "ab" if ranged else "wb") as out, tqdm(
                total=size, initial=have if ranged else 0, desc=name, unit="B", unit_scale=True, leave=False) as bar:
            while block := response.read1(CHUNK):  # what has arrived goes to disk at once: a kill loses none
                out.write(block)
                out.flush()
                bar.update(len(block))
        if part.stat().st_size != size:
            raise http.client.IncompleteRead(b"", size - part.stat().st_size)

    try:
        with_retries(name, attempt, retries, backoff)
    except transport_errors() as e:
        kept = f"; {part.stat().st_size:,} bytes kept in {part} for the next run" if part.exists() else ""
        raise UserError(f"{name}: download from {endpoint()} failed after {attempts(retries)}: {first_line(e)}"
                        f"{kept}") from None
    except OSError as e:
        raise UserError(f"{e.filename or part}: {e.strerror}: cannot write the shard") from None
    actual = file_sha256(part)
    if digest is None:
        tqdm.write(f"{name}: the hub gives no SHA-256 for it: only its size and header are checked", file=sys.stderr)
    elif actual != digest:
        part.unlink()
        raise UserError(f"{name}: SHA-256 {actual} differs from the hub's {digest}: the bytes are damaged; "
                        f"deleted, run again")
    try:
        read_header(part)
    except UserError:
        part.unlink()
        raise
    part.replace(path)
    tag.unlink()
    return actual


def fetch(names, local_dir, hub, retries=5, backoff=1.0):
    """Make each named shard present and checked in local_dir: a shard the manifest vouches for stays, a
    damaged one is fetched again, the rest are downloaded. Returns the names downloaded."""
    try:
        local_dir.mkdir(parents=True, exist_ok=True)
        manifest_path = local_dir / MANIFEST
        manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    except OSError as e:
        raise UserError(f"{local_dir}: {e.strerror}: cannot hold the shards") from None
    except json.JSONDecodeError:
        manifest = {}
    fetched = []
    for name in tqdm(names, desc="shards", unit="shard"):
        path = local_dir / name
        if path.exists():
            actual = file_sha256(path)
            if actual == manifest.get(name):
                continue
            # a shard fetched before manifests existed: the hub's SHA-256 vouches for it
            hubs = None if name in manifest else with_retries(name, lambda n=name: hub.metadata(n), retries, backoff)[2]
            if actual == hubs:
                manifest[name] = actual
            else:
                tqdm.write(f"{path}: not the bytes the hub has, fetching it again", file=sys.stderr)
                path.unlink()
        if name not in manifest or not path.exists():
            manifest[name] = download(hub, name, path, retries, backoff)
            fetched.append(name)
        tmp = manifest_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        tmp.replace(manifest_path)
    return fetched


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("n_train", nargs="?", type=int, default=10, help="train shards to fetch (default 10)")
    parser.add_argument("--dir", type=Path, default=HERE / "fineweb10B", help="where the shards go")
    parser.add_argument("--retries", type=int, default=5, help="attempts after a failed one, 1, 2, 4 ... s apart")
    args = parser.parse_args(argv)
    if args.retries < 0:
        parser.error("--retries must be 0 or more")
    try:
        fetched = fetch(shard_names(args.n_train), args.dir, Hub(), args.retries)
    except UserError as e:
        sys.exit(f"error: {e}")
    except transport_errors() as e:  # the hub, asked about a shard already here
        sys.exit(f"error: {endpoint()} did not answer after {attempts(args.retries)}: {first_line(e)}")
    except OSError as e:  # this machine: the manifest, a shard being read
        sys.exit(f"error: {e.filename}: {e.strerror}")
    print(f"{args.n_train + 1} shards ready in {args.dir} ({len(fetched)} downloaded, every one checked)")


if __name__ == "__main__":
    main()
