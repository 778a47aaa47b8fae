"""`modelyard`: the router's command line."""

from __future__ import annotations

import logging
import sys

from child import serving
from router.admission import check_startup_fit
from router.app import create_app, front_door
from router.errors import ConfigError
from router.model_sources import collect_specs
from router.settings import settings_from_args

log = logging.getLogger("router")

GRACEFUL_SHUTDOWN_S = 5


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["bench"]:
        from router import bench

        bench.main(args[1:])
        return
    try:
        settings, log_level = settings_from_args(args)
    except ConfigError as exc:
        print(f"modelyard: {exc}", file=sys.stderr)
        sys.exit(2)
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        specs = collect_specs(settings)
        check_startup_fit(settings, specs)
    except ConfigError as exc:
        log.error("%s", exc)
        sys.exit(2)
    try:
        sock = serving.listening_socket(settings.host, settings.port)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", settings.host, settings.port, exc.strerror or exc)
        sys.exit(2)
    port = sock.getsockname()[1]
    try:
        app = create_app(settings, specs, port)  # peers are checked there
    except ConfigError as exc:
        log.error("%s", exc)
        sys.exit(2)
    if settings.models_preset:
        log.info("preset %s", settings.models_preset)
    log.info("models (%d): %s", len(specs),
             ", ".join(s.name + (f" (aliases: {', '.join(s.aliases)})" if s.aliases else "") for s in specs)
             or "none")
    server = serving.http_server(front_door(app), GRACEFUL_SHUTDOWN_S)
    log.info("modelyard router listening on http://%s:%d", settings.host, port)
    try:
        serving.run(lambda: server.serve(sockets=[sock]))
    finally:
        # Whatever ended the loop, no child outlives the router.
        app.state.registry.kill_all_now()


if __name__ == "__main__":
    main()
