"""A stand-in for the Hugging Face hub over HTTP (point $HF_ENDPOINT at
`url`): it serves a local checkpoint directory as the repo `repo_id`, so
huggingface_hub's own snapshot_download (its listing, metadata and file
requests, its progress bars) runs unchanged, in the test's process or in
ranks started by `mlx-moe`."""

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class HttpHub:
    def __init__(self, source, repo_id: str):
        self.files = {f.name: f for f in Path(source).iterdir() if f.is_file()}
        self.repo_id = repo_id
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.answer(body=False)

            def do_GET(self):
                self.answer(body=True)

            def answer(self, body):
                path = self.path.split("?")[0]
                api = f"/api/models/{hub.repo_id}/"
                if path.startswith(api + "revision/"):
                    data = json.dumps({"id": hub.repo_id, "sha": COMMIT,
                                       "siblings": [{"rfilename": n} for n in hub.files]}).encode()
                elif path.startswith(api + "tree/"):
                    data = json.dumps([{"type": "file", "path": n, "size": f.stat().st_size, "oid": hub.etag(n)}
                                       for n, f in hub.files.items()]).encode()
                elif path.startswith(f"/{hub.repo_id}/resolve/") and path.rsplit("/", 1)[1] in hub.files:
                    name = path.rsplit("/", 1)[1]
                    return self.send(hub.files[name].read_bytes(), body, "application/octet-stream",
                                     {"X-Repo-Commit": COMMIT, "ETag": f'"{hub.etag(name)}"'})
                else:
                    return self.send(b"{}", body, "application/json", status=404)
                self.send(data, body, "application/json")

            def send(self, data, body, kind, headers=(), status=200):
                self.send_response(status)
                for k, v in dict(headers, **{"Content-Type": kind, "Content-Length": str(len(data))}).items():
                    self.send_header(k, v)
                self.end_headers()
                if body:
                    self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def etag(self, name: str) -> str:
        return hashlib.sha1(self.files[name].read_bytes()).hexdigest()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
