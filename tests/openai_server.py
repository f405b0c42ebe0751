"""A real OpenAI-compatible HTTP server for tests (stdlib only, no mocks of the client).

    with OpenAIServer(lambda body: "hello", latency=(0.0, 0.01)) as srv:
        client = LLMClient("m", base_url=srv.base_url)
        ...
        assert len(srv.requests) == 1

`handler(body) -> str` gives the assistant text for a request body (the parsed JSON of
POST /v1/chat/completions); a `(text, finish_reason)` tuple sets the finish reason too (default
"stop"). `fail(body, n_seen)` may inject a failure before the handler runs:
`n_seen` is how many earlier requests carried the same `messages` (0 for the first one), so
"fail the first two attempts, then answer" is `lambda b, n: 500 if n < 2 else None`. It returns
  None       answer normally,
  int        that HTTP status with an OpenAI error body (429 and 503 carry `Retry-After`),
  (int, str) that status with that error message,
  "timeout"  hang without answering (until `hang_s` passes or the server stops),
  "drop"     close the connection without any response.
An exception raised by the handler becomes a 500 (so a test bug shows up as a failed request).
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Handler = Callable[[dict], "str | tuple[str, str]"]
Fail = Callable[[dict, int], "None | int | tuple[int, str] | str"]


def _count_tokens(text: str) -> int:
    # A stand-in tokenizer: whitespace words, and every CJK character counts as one token.
    cjk = sum(1 for ch in text if "\u4e00" <= ch <= "\u9fff")
    return len(text.split()) + cjk


def _messages_key(body: dict) -> str:
    return json.dumps(body.get("messages"), sort_keys=True, ensure_ascii=False)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the default listen backlog of 5 resets bursts of concurrent connects


class OpenAIServer:
    def __init__(
        self,
        handler: Handler,
        *,
        latency: tuple[float, float] = (0.0, 0.0),
        fail: Fail | None = None,
        retry_after: float | None = 0.0,
        hang_s: float = 30.0,
        seed: int = 0,
    ) -> None:
        self.handler = handler
        self.latency = latency
        self.fail = fail
        self.retry_after = retry_after  # value of the Retry-After header on 429/503 (None: no header)
        self.hang_s = hang_s
        self.requests: list[dict] = []
        self.failures: list[tuple[dict, int | tuple | str]] = []  # (body, injected failure), in arrival order
        self._lock = threading.Lock()
        self._seen: dict[str, int] = {}
        self._rng = random.Random(seed)
        self._stop = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> OpenAIServer:
        server = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the openai client expects

            def log_message(self, *args: Any) -> None:  # quiet test output
                pass

            def do_POST(self) -> None:
                server._serve(self)

        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()  # wakes "timeout" hangs
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> OpenAIServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # -- request handling ---------------------------------------------------------------------
    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length)
        if h.path.rstrip("/") != "/v1/chat/completions":
            self._send_json(h, 404, {"error": {"message": f"no route {h.path}", "type": "not_found"}})
            return
        try:
            body = json.loads(raw)
        except json.JSONDecodeError:
            self._send_json(h, 400, {"error": {"message": "invalid JSON", "type": "invalid_request_error"}})
            return
        with self._lock:
            self.requests.append(body)
            key = _messages_key(body)
            n_seen = self._seen.get(key, 0)
            self._seen[key] = n_seen + 1
            lo, hi = self.latency
            delay = self._rng.uniform(lo, hi) if hi > 0 else 0.0

        failure = self.fail(body, n_seen) if self.fail is not None else None
        if failure is not None:
            with self._lock:
                self.failures.append((body, failure))
        if delay:
            time.sleep(delay)
        if failure == "timeout":
            self._stop.wait(self.hang_s)
            h.close_connection = True
            return
        if failure == "drop":
            h.close_connection = True
            try:
                h.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        if isinstance(failure, int | tuple):
            self._send_error(h, *(failure if isinstance(failure, tuple) else (failure,)))
            return
        assert failure is None, f"fail() returned {failure!r}"

        try:
            text = self.handler(body)
            text, finish_reason = text if isinstance(text, tuple) else (text, "stop")
        except Exception as e:  # surfaced to the client as a server error
            self._send_json(h, 500, {"error": {"message": f"handler raised {e!r}", "type": "server_error"}})
            return
        prompt_tokens = sum(_count_tokens(str(m.get("content", ""))) for m in body.get("messages", []))
        completion_tokens = _count_tokens(text)
        with self._lock:
            n = len(self.requests)
        self._send_json(
            h,
            200,
            {
                "id": f"chatcmpl-{n}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", "test"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": finish_reason,
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            },
        )

    def _send_error(self, h: BaseHTTPRequestHandler, status: int, message: str | None = None) -> None:
        kinds = {400: "invalid_request_error", 401: "authentication_error", 429: "rate_limit_error"}
        message = message or {
            400: "This model's maximum context length is 8192 tokens (injected)",
            429: "Rate limit reached (injected)",
        }.get(status, f"injected error {status}")
        body = {
            "error": {
                "message": message,
                "type": kinds.get(status, "server_error"),
                "code": "context_length_exceeded" if status == 400 else None,
            }
        }
        headers = {}
        if status in (429, 503) and self.retry_after is not None:
            headers["Retry-After"] = f"{self.retry_after:g}"
        self._send_json(h, status, body, headers)

    @staticmethod
    def _send_json(h: BaseHTTPRequestHandler, status: int, obj: dict, headers: dict | None = None) -> None:
        data = json.dumps(obj, ensure_ascii=False).encode()
        try:
            h.send_response(status)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout) before we answered


def kill_after_requests(cmd: list[str], srv: OpenAIServer, n: int, cwd: str | os.PathLike) -> int:
    """Run `cmd` and SIGKILL it once `srv` has seen `n` requests (or after 30 s, or when it exits first);
    returns its exit status (-SIGKILL when the kill landed)."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while len(srv.requests) < n and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    return proc.returncode
