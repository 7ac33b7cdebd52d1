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
    logging.basicConfig(
        level=config.server.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    log = logging.getLogger("p2pdiff")
    log.info("starting p2pdiff %s on http://%s:%d", VERSION, config.server.host, config.server.port)
    try:
        web.run_app(
            create_app(config),
            host=config.server.host,
            port=config.server.port,
            access_log=logging.getLogger("aiohttp.access") if config.server.access_log else None,
            print=None,
        )
    except StoreError as exc:
        print(f"p2pdiff: store error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"p2pdiff: cannot listen on {config.server.host}:{config.server.port}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
