#!/usr/bin/env python3
"""A stand-in child that speaks the real router protocol, for lifecycle edge cases.

It is started by the router through a preset's `bin = ` key, exactly like llama.cpp's
llama-server (it gets --host, --port and --alias), and serves a fake streaming chat completion.
Flags make it misbehave on purpose: --load-delay S, --crash-after S (exit 3 that long after ready),
--fail-load (exit 1 while loading), --slow-load-if FILE (load for 60 s while FILE exists),
--ignore-exit (ignore the exit command), --garbage (print
junk and half protocol lines on stdout), --token-delay S and --tokens N for the stream,
--answer-delay S before a non-streamed answer, --always-stream to stream whatever is asked.
Standard library only, so it runs under any python3.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PREFIX = "cmd_child_to_router:state:"


def announce(state: str, payload: dict) -> None:
    sys.stdout.write(PREFIX + json.dumps({"state": state, "payload": payload}) + "\n")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--alias", default="fake")
    parser.add_argument("--load-delay", type=float, default=0.0)
    parser.add_argument("--crash-after", type=float, default=-1.0)
    parser.add_argument("--fail-load", action="store_true")
    parser.add_argument("--slow-load-if", default=None, help="load for 60 s when this file exists")
    parser.add_argument("--ignore-exit", action="store_true")
    parser.add_argument("--garbage", action="store_true")
    parser.add_argument("--token-delay", type=float, default=0.01)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--answer-delay", type=float, default=0.0)
    parser.add_argument("--always-stream", action="store_true", help="answer every JSON POST as a stream")
    args, _unknown = parser.parse_known_args()

    def watch_stdin() -> None:
        while True:
            line = sys.stdin.readline()
            if not line:
                os._exit(3)  # router gone
            if line.strip() == "cmd_router_to_child:exit" and not args.ignore_exit:
                os._exit(0)

    threading.Thread(target=watch_stdin, daemon=True).start()

    if args.garbage:
        sys.stdout.write("some log line on stdout\n")
        sys.stdout.write(PREFIX + "{not json\n")
        sys.stdout.write(PREFIX + '{"state": "flying", "payload": {}}\n')
        sys.stdout.write(PREFIX[:10] + "\n")
        sys.stdout.write("\x00\xff binary junk \x1b[31m\n")
        sys.stdout.flush()
    announce("loading", {"stages": ["text_model"], "current": "text_model", "value": 0.0})
    time.sleep(args.load_delay)
    if args.slow_load_if and os.path.exists(args.slow_load_if):
        time.sleep(60)
    if args.fail_load:
        print("fake child: load failed on purpose", file=sys.stderr, flush=True)
        os._exit(1)

    alias = args.alias
    token_delay = args.token_delay
    tokens = args.tokens

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *a: object) -> None:  # noqa: A002 - stdlib signature
            sys.stderr.write("fake child: " + (format % a) + "\n")

        def _json(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - stdlib name
            if self.path.startswith("/health"):
                self._json(200, {"status": "ok"})
            else:
                self._json(200, {"path": self.path, "model": alias})

        def do_DELETE(self) -> None:  # noqa: N802 - stdlib name
            self._json(200, {"path": self.path, "model": alias, "method": "DELETE"})

        def do_POST(self) -> None:  # noqa: N802 - stdlib name
            length = int(self.headers.get("Content-Length", "0"))
            raw = self.rfile.read(length)
            try:
                body = json.loads(raw or b"{}")
            except ValueError:
                body = None
            if not isinstance(body, dict):
                # A form, a JSON list or other body: what reached the child, for tests of the routing.
                self._json(200, {"path": self.path, "model": alias, "method": "POST", "bytes": len(raw),
                                 "content_type": self.headers.get("Content-Type")})
                return
            if not body.get("stream") and not args.always_stream:
                time.sleep(args.answer_delay)
                self._json(200, {"object": "chat.completion", "model": alias, "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": "fake " * tokens},
                     "finish_reason": "length"}],
                    "received_authorization": self.headers.get("Authorization"),
                    "received_expect": self.headers.get("Expect"), "tag": body.get("tag"), "path": self.path})
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()

            def chunk(text: str) -> None:
                data = text.encode()
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

            try:
                for i in range(tokens):
                    event = {"object": "chat.completion.chunk", "model": alias,
                             "choices": [{"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": None}]}
                    chunk(f"data: {json.dumps(event)}\n\n")
                    time.sleep(token_delay)
                chunk("data: [DONE]\n\n")
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 1024  # the stdlib's 5 drops connections under a burst of clients

    server = Server((args.host, args.port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    announce("loading", {"stages": ["text_model"], "current": "text_model", "value": 1.0})
    announce("ready", {"port": server.server_address[1], "fake": True})
    if args.crash_after >= 0:
        time.sleep(args.crash_after)
        os._exit(3)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
