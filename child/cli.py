"""`modelyard-child`: serve one GGUF model, alone or under the router.

Order of events: bind the socket (port 0 picks a free one), start HTTP (/health answers 503 while
loading), load the model off the event loop, then announce `ready` with the port actually bound,
so the router never races another process for a port.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys

from child import serving
from child.arguments import CHILD_ARGS, build_parser
from child.engine.llama_model import set_libllama_verbose
from child.foreign_flags import UnknownFlag, extract_foreign
from child.router_link import RouterLink
from child.runtime import ChildRuntime, ServeSettings
from child.server import create_app

log = logging.getLogger("child")

EXIT_LOAD_FAILED = 1
GRACEFUL_SHUTDOWN_S = 5.0


async def _serve(runtime: ChildRuntime, sock: socket.socket) -> int:
    server = serving.http_server(create_app(runtime), GRACEFUL_SHUTDOWN_S, lifespan="off")
    loop = asyncio.get_running_loop()
    loading = True

    def begin_exit() -> None:
        if loading:
            # Nothing to finish yet; the model load cannot be interrupted from Python.
            os._exit(0)
        # Fail in-flight generations first so their streams end, then let uvicorn drain.
        runtime.shutdown()
        server.should_exit = True

    def on_exit_command() -> None:  # called on the stdin watcher thread
        loop.call_soon_threadsafe(begin_exit)

    runtime.link.watch_stdin(on_exit_command)
    serve_task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await loop.run_in_executor(None, runtime.load)
    except Exception as exc:  # noqa: BLE001 - any load failure ends the process with a clear log
        log.error("failed to load the model: %s", exc)
        server.should_exit = True
        await serve_task
        return EXIT_LOAD_FAILED
    loading = False
    runtime.mark_ready(sock.getsockname()[1])
    log.info("serving %s on http://%s:%d", runtime.settings.alias, *sock.getsockname()[:2])
    await serve_task
    runtime.shutdown()
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    # llama-server's flags this engine does not have are accepted (the router passes a llama.cpp
    # user's flags on as they are) and named once in the log.
    own = set(parser._option_string_actions)
    try:
        rest, foreign = extract_foreign(sys.argv[1:] if argv is None else argv, own, "modelyard-child")
    except UnknownFlag as exc:
        parser.error(str(exc))
    args = parser.parse_args(rest)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # libllama's own log (the loader's metadata dump, ...) only when asked for with --verbose.
    set_libllama_verbose(args.verbose)
    link = RouterLink.from_environment()
    if not args.model:
        log.error("no model: pass -m PATH")
        sys.exit(2)
    for spec in CHILD_ARGS:
        value = getattr(args, spec.dest)
        if not spec.effective and value not in (None, False):
            log.warning("--%s has no effect on this engine; ignored", spec.long)
    for flag, _ in foreign:
        log.warning("--%s (a llama-server flag) has no effect on this engine; ignored", flag.long)
    try:
        settings = ServeSettings.from_args(args)
        sock = serving.listening_socket(args.host, args.port)
    except (ValueError, OSError) as exc:
        log.error("%s", exc)
        sys.exit(2)
    runtime = ChildRuntime(settings, link)
    code = serving.run(lambda: _serve(runtime, sock))
    logging.shutdown()
    # The scheduler thread may sit inside libllama; don't wait for interpreter teardown.
    os._exit(code)


if __name__ == "__main__":
    main()
