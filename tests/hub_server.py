"""A Hugging Face hub for the tests, on 127.0.0.1: one dataset repository whose files it serves as the hub
does, to what `hf_hub_download` and `get_hf_file_metadata` ask for.

    HEAD|GET /datasets/{repo}/resolve/{revision}/{path}
        200 (206 for a Range request) with X-Repo-Commit, ETag (the SHA-256, as the hub gives LFS files),
        X-Linked-Etag, X-Linked-Size, Content-Length, Accept-Ranges; 404 with X-Error-Code:
        EntryNotFound for a file it does not have.

Faults the tests set: `drops[name]`, byte counts after which the next GETs of that file close the
connection; `lies[name]`, a SHA-256 it advertises instead of the true one; `refuse`, an (HTTP status,
X-Error-Code) it answers every request with, as the hub does a gated or private repository; `delay`, seconds to sleep
after each 64 KiB sent. It counts what it sent: `sent[name]` bytes in all, and for every GET, in
`gets`, [name, first byte, bytes sent].
"""
import hashlib
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"
BLOCK = 1 << 16


class Hub:
    def __init__(self, repo_id, files):
        self.repo_id, self.files = repo_id, dict(files)
        self.drops, self.lies, self.delay, self.refuse = {}, {}, 0.0, None
        self.sent, self.gets = {}, []
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self):
                hub.respond(self, body=False)

            def do_GET(self):
                hub.respond(self, body=True)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def respond(self, handler, body):
        m = re.fullmatch(rf"/datasets/{re.escape(self.repo_id)}/resolve/[^/]+/(.+)", handler.path.split("?")[0])
        name = m and m[1]
        if self.refuse or name not in self.files:
            status, code = self.refuse or (404, "EntryNotFound")
            handler.send_response(status)
            handler.send_header("X-Error-Code", code)
            handler.send_header("X-Error-Message", code)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        data = self.files[name]
        digest = self.lies.get(name) or hashlib.sha256(data).hexdigest()
        start = 0
        ranged = re.fullmatch(r"bytes=(\d+)-", handler.headers.get("Range", ""))
        if ranged:
            start = int(ranged[1])
        handler.send_response(206 if ranged else 200)
        for key, value in (("X-Repo-Commit", COMMIT), ("ETag", f'"{digest}"'), ("X-Linked-Etag", f'"{digest}"'),
                           ("X-Linked-Size", str(len(data))), ("Accept-Ranges", "bytes"),
                           ("Content-Length", str(len(data) - start))):
            handler.send_header(key, value)
        if ranged:
            handler.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        handler.end_headers()
        if not body:
            return
        get = [name, start, 0]
        with self.lock:
            self.gets.append(get)
            drops = self.drops.get(name) or []
            limit = drops.pop(0) if drops else None
        end = len(data) if limit is None else min(len(data), start + limit)
        for i in range(start, end, BLOCK):
            chunk = data[i:min(i + BLOCK, end)]
            try:
                handler.wfile.write(chunk)
                handler.wfile.flush()
            except OSError:  # the client went away
                return
            with self.lock:
                self.sent[name] = self.sent.get(name, 0) + len(chunk)
                get[2] += len(chunk)
            if self.delay:
                time.sleep(self.delay)
        if limit is not None:  # cut the connection short of the Content-Length it announced
            handler.close_connection = True
            handler.connection.shutdown(2)
