"""Command line: ``p2pdiff [--config PATH] [--check-config]`` or ``python -m p2pdiff``."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from aiohttp import web

from p2pdiff.api import VERSION
from p2pdiff.app import create_app
from p2pdiff.config import ConfigError, load_config, redacted
from p2pdiff.logs import AccessLogger, setup_logging
from p2pdiff.store import StoreError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="p2pdiff", description="P2P WebGPU Diffusion queue server and helper peer"
    )
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="config file (default: $P2PDIFF_CONFIG, else ./config.toml if present, else built-in defaults)",
    )
    parser.add_argument(
        "--check-config", action="store_true", help="print the effective config (secrets masked) and exit"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"p2pdiff: config error: {exc}", file=sys.stderr)
        return 2
    if args.check_config:
        print(json.dumps(redacted(config), indent=2))
        return 0
    setup_logging(config.server.log_level, config.server.log_format)
    log = logging.getLogger("p2pdiff")
    log.info("starting p2pdiff %s on http://%s:%d", VERSION, config.server.host, config.server.port)
    server = config.server
    # Whether a token is set, never the token: secrets stay out of logs.
    log.info(
        "admin token %s%s; POST rate limit %s",
        "set" if server.admin_token else "not set (mutating routes are open)",
        ", also for POST /api/queue" if server.queue_requires_token else "",
        f"{server.rate_limit_per_second:g}/s, burst {server.rate_limit_burst}"
        if server.rate_limit_per_second > 0
        else "off",
    )
    try:
        web.run_app(
            create_app(config),
            host=config.server.host,
            port=config.server.port,
            access_log=logging.getLogger("aiohttp.access") if config.server.access_log else None,
            access_log_class=AccessLogger,
            # SIGTERM/SIGINT: stop listening, give open requests this long, then run the cleanup
            # contexts (the helper leaves its rooms, the store commits and closes); exit code 0.
            shutdown_timeout=config.server.shutdown_timeout_seconds,
            print=None,
        )
    except StoreError as exc:
        print(f"p2pdiff: store error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"p2pdiff: cannot listen on {config.server.host}:{config.server.port}: {exc}", file=sys.stderr)
        return 1
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
