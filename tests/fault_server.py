"""A loopback OpenAI-compatible test server that misbehaves on purpose, at chosen request numbers.

It answers `/v1/models`, `/v1/chat/completions` and `/v1/completions` with a deterministic completion derived from the
prompt, and injects faults by request number (1-based, counted over completion requests in arrival order):

- `429`: Too Many Requests with a `Retry-After` header (seconds)
- `500` / `503`: a server error
- `hang`: sleeps past the client's timeout, then closes without answering
- `drop`: closes the connection without sending a byte
- `malformed`: 200 with a body that is not JSON
- `empty`: 200 with JSON that lacks `choices`
- `400` / `404` / `413` / `422`: a final client error with an OpenAI-shaped message naming the status (`STATUS_MESSAGES`)
- `null_content`: 200 whose choices have `content: null` (chat) or `text: null` (completions)
- `few_choices`: 200 with one choice fewer than the `n` asked for (none for n=1: an unusable reply)
- `reset_mid_body`: 200 headers and half the body, then a TCP reset
- `stall_after_headers`: 200 headers (with a Content-Length), then no body until past the client's timeout (`hang_s`)

A hand-rolled `http.server` on purpose: dropping a connection mid-request or sending broken bodies is exactly what a
real framework tries hard not to let you do.
"""

from __future__ import annotations

import json
import re
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

FAULTS = ("429", "500", "503", "hang", "drop", "malformed", "empty", "400", "404", "413", "422", "null_content",
          "few_choices", "reset_mid_body", "stall_after_headers")
# The server's own words for each final client error: a client must pass them on to the user.
STATUS_MESSAGES = {
    "400": "injected: 'temperature' must be at most 2",
    "404": "injected: the model `fault-model` does not exist",
    "413": "injected: request entity too large (limit 1 KB)",
    "422": "injected: 'max_tokens' is not processable",
}


def answer_for(text: str) -> str:
    """The completion the server gives for a prompt: deterministic, so tests can check what was written."""
    return f"Answer: {text.strip()[-40:]}"


class FaultServer:
    """Start with `with FaultServer(faults={2: "429", 5: "drop"}) as server:`; `server.base_url` ends in `/v1`.

    Args:
        faults: request number -> fault kind (see module docstring).
        retry_after: seconds sent in the `Retry-After` header of a 429.
        hang_s: how long a `hang` request sleeps before closing (ends early when the server stops).
        delay_s: sleep before every normal answer (to make a run slow enough to kill mid-way).
        api_key: when set, requests without `Authorization: Bearer <api_key>` get 401.
        model: the served model name.
    """

    def __init__(
        self,
        faults: dict[int, str] | None = None,
        *,
        retry_after: float = 1.0,
        hang_s: float = 5.0,
        delay_s: float = 0.0,
        api_key: str | None = None,
        model: str = "fault-model",
    ) -> None:
        for number, kind in (faults or {}).items():
            if kind not in FAULTS:
                raise ValueError(f"fault {kind!r} at request {number}: known faults are {FAULTS}")
        self.faults = dict(faults or {})
        self.retry_after = retry_after
        self.hang_s = hang_s
        self.delay_s = delay_s
        self.api_key = api_key
        self.model = model
        self.count = 0
        # (request number, monotonic time, fault or "ok", prompt text) per completion request.
        self.log: list[tuple[int, float, str, str]] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __enter__(self) -> FaultServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def _next(self, prompt: str) -> tuple[int, str]:
        with self._lock:
            self.count += 1
            fault = self.faults.get(self.count, "ok")
            self.log.append((self.count, time.monotonic(), fault, prompt))
            return self.count, fault

    def _reply(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        n = int(body.get("n") or 1)
        if path.endswith("/chat/completions"):
            prompt = body["messages"][-1]["content"]
        else:
            prompt = body["prompt"]
        text = answer_for(prompt)
        for stop in body.get("stop") or []:
            if stop in text:
                text = text[: text.index(stop)]
        words = re.findall(r"\S+\s*", text)
        choices = []
        for i in range(n):
            if path.endswith("/chat/completions"):
                choice: dict[str, Any] = {
                    "index": i,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
                if body.get("logprobs"):
                    k = int(body.get("top_logprobs") or 0)
                    content = [
                        {
                            "token": w,
                            "bytes": list(w.encode()),
                            "logprob": -0.5,
                            "top_logprobs": [
                                {"token": w if j == 0 else f"alt{j}", "bytes": None, "logprob": -0.5 - j}
                                for j in range(k)
                            ],
                        }
                        for w in words
                    ]
                    choice["logprobs"] = {"content": content}
            else:
                choice = {"index": i, "text": text, "finish_reason": "stop", "logprobs": None}
            choices.append(choice)
        return {
            "id": "cmpl-fault",
            "object": "chat.completion" if path.endswith("/chat/completions") else "text_completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": choices,
            "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": n * len(words), "total_tokens": 0},
        }

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
                pass

            def _send(self, status: int, payload: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(payload)

            def _authorised(self) -> bool:
                if server.api_key is None:
                    return True
                if self.headers.get("Authorization") == f"Bearer {server.api_key}":
                    return True
                error = {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}}
                self._send(401, json.dumps(error).encode())
                return False

            def do_GET(self) -> None:
                if not self._authorised():
                    return
                if self.path.rstrip("/").endswith("/models"):
                    data = {"object": "list", "data": [{"id": server.model, "object": "model", "owned_by": "test"}]}
                    self._send(200, json.dumps(data).encode())
                else:
                    self._send(404, b'{"error": {"message": "not found"}}')

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                if not self._authorised():
                    return
                if not self.path.endswith(("/chat/completions", "/completions")):
                    self._send(404, b'{"error": {"message": "not found"}}')
                    return
                prompt = body["messages"][-1]["content"] if "messages" in body else body.get("prompt", "")
                _, fault = server._next(prompt)
                if fault == "429":
                    error = b'{"error": {"message": "rate limited", "type": "rate_limit"}}'
                    self._send(429, error, {"Retry-After": f"{server.retry_after:g}"})
                elif fault in ("500", "503"):
                    self._send(int(fault), b'{"error": {"message": "injected server error"}}')
                elif fault == "hang":
                    server._stopping.wait(server.hang_s)
                    self._drop()
                elif fault == "drop":
                    self._drop()
                elif fault == "malformed":
                    self._send(200, b'{"id": "cmpl-x", "choices": [{"message": ')
                elif fault == "empty":
                    self._send(200, b'{"id": "cmpl-x", "object": "chat.completion"}')
                elif fault in STATUS_MESSAGES:
                    error = {"error": {"message": STATUS_MESSAGES[fault], "type": "invalid_request_error"}}
                    self._send(int(fault), json.dumps(error).encode())
                elif fault in ("null_content", "few_choices"):
                    reply = server._reply(self.path, body)
                    if fault == "few_choices":
                        reply["choices"] = reply["choices"][:-1]
                    else:
                        for choice in reply["choices"]:
                            if "message" in choice:
                                choice["message"]["content"] = None
                            else:
                                choice["text"] = None
                    self._send(200, json.dumps(reply).encode())
                elif fault == "reset_mid_body":
                    payload = json.dumps(server._reply(self.path, body)).encode()
                    self._headers_only(len(payload))
                    self.wfile.write(payload[: len(payload) // 2])
                    self.wfile.flush()
                    self._reset()
                elif fault == "stall_after_headers":
                    payload = json.dumps(server._reply(self.path, body)).encode()
                    self._headers_only(len(payload))
                    self.wfile.flush()
                    server._stopping.wait(server.hang_s)
                    self._drop()
                else:
                    if server.delay_s:
                        time.sleep(server.delay_s)
                    self._send(200, json.dumps(server._reply(self.path, body)).encode())

            def _headers_only(self, length: int) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(length))
                self.end_headers()

            def _reset(self) -> None:
                """Abort the connection with a TCP RST (SO_LINGER 0), as a crashed proxy or a dropped link does."""
                self.close_connection = True
                try:
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                except OSError:
                    pass

            def _drop(self) -> None:
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        return Handler
