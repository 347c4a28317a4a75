"""Loopback servers for the inputs production reads: a GCS JSON-API emulator and a misbehaving web server."""

from __future__ import annotations

import email.utils
import http.server
import json
import sys
import threading
import time
import urllib.parse


class _Quiet(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def send_body(self, status: int, body: bytes, content_type="application/octet-stream", headers=()):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


class _Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        """A client that hung up (the tests' timeouts and resets do it on purpose) is not worth a traceback."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Running:
    def __init__(self, handler):
        self.httpd = _Server(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class GcsEmulator(_Running):
    """Answers the two calls Beam's GCS client makes to read an object: metadata, then a ranged media GET.

    `objects[(bucket, name)]` holds the bytes; names in `forbidden` answer 403. Point the client at it
    with STORAGE_EMULATOR_HOST=emulator.url.
    """

    def __init__(self):
        self.objects: dict = {}
        self.forbidden: set = set()
        emulator = self

        class Handler(_Quiet):
            def do_GET(self):
                parsed = urllib.parse.urlsplit(self.path)
                parts = parsed.path.split("/")
                # /storage/v1/b/B/o/NAME or /download/storage/v1/b/B/o/NAME
                try:
                    b_index = parts.index("b")
                    bucket, name = parts[b_index + 1], urllib.parse.unquote(parts[b_index + 3])
                except (ValueError, IndexError):
                    return self._error(400, "bad request")
                if (bucket, name) in emulator.forbidden:
                    return self._error(403, f"anonymous caller does not have storage.objects.get access to {name}")
                data = emulator.objects.get((bucket, name))
                if data is None:
                    return self._error(404, f"No such object: {bucket}/{name}")
                if "alt=media" in parsed.query:
                    return self._media(data)
                metadata = {"kind": "storage#object", "name": name, "bucket": bucket, "size": str(len(data)),
                            "generation": "1", "md5Hash": "", "updated": "2026-11-28T00:00:00.000Z",
                            "contentType": "application/octet-stream"}
                self.send_body(200, json.dumps(metadata).encode(), "application/json")

            def _media(self, data: bytes):
                ranged = self.headers.get("Range", "")
                if ranged.startswith("bytes="):
                    start_text, _, end_text = ranged[6:].partition("-")
                    start = int(start_text or 0)
                    end = min(int(end_text) if end_text else len(data) - 1, len(data) - 1)
                    if start >= len(data):
                        return self.send_body(416, b"", headers=[("Content-Range", f"bytes */{len(data)}")])
                    return self.send_body(206, data[start:end + 1],
                                          headers=[("Content-Range", f"bytes {start}-{end}/{len(data)}")])
                self.send_body(200, data)

            def _error(self, code: int, message: str):
                body = json.dumps({"error": {"code": code, "message": message, "errors": [{"message": message}]}})
                self.send_body(code, body.encode(), "application/json")

        super().__init__(Handler)


class WebServer(_Running):
    """Serves `image` at any path, except paths with scripted behaviour; counts requests per path.

    /flaky.jpg   503 twice, then the image          /reset.jpg    drops the connection once
    /missing.jpg 404                                /slow.jpg     headers, then nothing for 1 s
    /busy.jpg    429 with Retry-After: 1, then ok   /timeout.jpg  408 once, then ok
    /trickle.jpg the image, one byte every 50 ms    /always503.jpg 503 forever
    /short.jpg   announces more bytes than it sends and closes, once; then the image
    /redirect/ANY-URL   302 to ANY-URL
    """

    def __init__(self, image: bytes):
        self.hits: dict = {}
        self.times: dict = {}
        self.failures_left = {"/flaky.jpg": 2, "/reset.jpg": 1, "/busy.jpg": 1, "/timeout.jpg": 1, "/short.jpg": 1}
        self.in_flight = 0
        self.max_in_flight = 0
        self.delay_s = 0.0
        server = self
        lock = threading.Lock()

        class Handler(_Quiet):
            def do_GET(self):
                path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
                with lock:
                    server.hits[path] = server.hits.get(path, 0) + 1
                    server.times.setdefault(path, []).append(time.monotonic())
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    left = server.failures_left.get(path, 0)
                    if left:
                        server.failures_left[path] = left - 1
                try:
                    self._answer(path, left)
                finally:
                    with lock:
                        server.in_flight -= 1

            def _answer(self, path, failing):
                if server.delay_s:
                    time.sleep(server.delay_s)
                if failing and path == "/reset.jpg":
                    self.connection.shutdown(2)
                elif failing and path == "/busy.jpg":
                    self.send_body(429, b"slow down", "text/plain", [("Retry-After", "1")])
                elif failing and path == "/timeout.jpg":
                    self.send_body(408, b"", "text/plain", [("Connection", "close")])
                elif (failing and path == "/flaky.jpg") or path == "/always503.jpg":
                    self.send_body(503, b"", "text/plain")
                elif failing and path == "/short.jpg":
                    self.send_response(200)
                    self.send_header("Content-Length", str(2 * len(image)))
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(image)
                    self.close_connection = True
                elif path.startswith("/redirect/"):
                    self.send_body(302, b"", "text/plain", [("Location", path[len("/redirect/"):])])
                elif path == "/missing.jpg":
                    self.send_body(404, b"not here", "text/plain")
                elif path == "/slow.jpg":
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(image)))
                    self.end_headers()
                    time.sleep(1.0)
                elif path == "/trickle.jpg":
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(image)))
                    self.end_headers()
                    for i in range(len(image)):
                        self.wfile.write(image[i:i + 1])
                        self.wfile.flush()
                        time.sleep(0.05)
                else:
                    self.send_body(200, image, "image/jpeg", [("Date", email.utils.formatdate(usegmt=True))])

        super().__init__(Handler)


class ForwardProxy(_Running):
    """An http proxy: answers every absolute-form GET with `image`, refuses every CONNECT (502); records both."""

    def __init__(self, image: bytes):
        self.seen: list = []
        proxy = self

        class Handler(_Quiet):
            def do_GET(self):
                proxy.seen.append(f"GET {self.path}")
                self.send_body(200, image, "image/jpeg")

            def do_CONNECT(self):
                proxy.seen.append(f"CONNECT {self.path}")
                self.send_body(502, b"", "text/plain", [("Connection", "close")])
                self.close_connection = True

        super().__init__(Handler)
