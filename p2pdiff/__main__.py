"""Command line: ``p2pdiff [--config PATH] [--check-config | --check-store | --copy-store SQLITE_URL]`` or
``python -m p2pdiff``."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import resource
import sys
from pathlib import Path

from aiohttp import web

from p2pdiff.app import create_app
from p2pdiff.appkeys import CONFIG
from p2pdiff.config import Config, ConfigError, load_config, redacted, secret_values
from p2pdiff.ops.logs import AccessLogger, repeat_filters, setup_logging
from p2pdiff.ops.shutdown import arm_backstop
from p2pdiff.rest.api import VERSION
from p2pdiff.tasks.pg_store import PgStore
from p2pdiff.tasks.results import results_dir
from p2pdiff.tasks.sqlite_store import SqliteStore, check_store, repair_hint
from p2pdiff.tasks.store import StoreError
from p2pdiff.tasks.store_copy import copy_store


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
    parser.add_argument(
        "--check-store",
        action="store_true",
        help="check a SQLite store (integrity check and every row) without changing it; exit 1 on damage",
    )
    parser.add_argument(
        "--copy-store",
        metavar="SQLITE_URL",
        help="copy a SQLite store (sqlite:///PATH, with the images in results/ next to it) into the "
        "configured PostgreSQL store, which must be empty, and exit; no node may run on either",
    )
    return parser


def _check_store(path: str) -> int:
    try:
        problems, summary = check_store(path)
    except StoreError as exc:
        print(f"p2pdiff: store error: {exc}", file=sys.stderr)
        return 1
    if not problems:
        print(f"store {path}: ok ({summary})")
        return 0
    print(f"store {path}: {len(problems)} problem{'s' if len(problems) > 1 else ''}")
    for damage in problems:
        print(f"  {damage}")
    print(f"fix: {repair_hint(Path(path), problems)}")
    return 1


def _copy_store(config: Config, source_url: str) -> int:
    source = Config()
    source.store.url = source_url
    try:
        if source.store.backend != "sqlite" or config.store.backend != "postgresql":
            print(
                "p2pdiff: --copy-store copies a sqlite:/// store into the configured postgresql:// store; "
                f"asked to copy {source.store.display_url} into {config.store.display_url}",
                file=sys.stderr,
            )
            return 2
        source_path = Path(source.store.sqlite_path)
        dsn = config.store.dsn()
    except ConfigError as exc:
        print(f"p2pdiff: config error: {exc}", file=sys.stderr)
        return 2
    if not source_path.is_file():  # SQLite would make an empty store there and copy nothing
        print(f"p2pdiff: --copy-store: no SQLite store at {source_path}", file=sys.stderr)
        return 2
    target = PgStore(dsn, display=config.store.display_url, node=config.cluster.node_name())
    try:
        copied = asyncio.run(copy_store(SqliteStore(str(source_path)), results_dir(source), target))
    except StoreError as exc:
        print(f"p2pdiff: store error: {exc}", file=sys.stderr)
        return 1
    print(
        f"copied {source.store.display_url} into {config.store.display_url}: {copied.rooms} rooms, "
        f"{copied.tasks} tasks, {copied.counters} counters, {copied.images} result images"
        + (
            f" ({copied.missing_images} referenced but missing from {results_dir(source)})"
            if copied.missing_images
            else ""
        )
    )
    return 0


def raise_open_file_limit() -> str:
    """Raise the soft open-file limit to the hard one; says what it did, for the log.

    Every connection, event stream, peer and relay takes a descriptor, and a soft limit of 1024
    (a common default) is reached by a modest flood, after which accept() fails for everyone.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return f"open-file limit {soft} (the hard limit)"
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:  # e.g. an unlimited hard limit the kernel will not grant
        return f"open-file limit {soft}: could not raise it to the hard limit {hard} ({exc})"
    return f"open-file limit raised from {soft} to {hard}"


async def _arm_backstop(app: web.Application) -> None:
    # The process's own guard, added here and not in create_app: in-process tests must not be
    # killed by it.
    arm_backstop(app[CONFIG].server.shutdown_timeout_seconds)


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
    if args.check_store:
        if config.store.backend != "sqlite":
            print(
                f"p2pdiff: --check-store checks SQLite stores; this one is {config.store.display_url}",
                file=sys.stderr,
            )
            return 2
        return _check_store(config.store.sqlite_path)
    if args.copy_store is not None:
        return _copy_store(config, args.copy_store)
    setup_logging(config.server.log_level, config.server.log_format, secrets=secret_values(config))
    log = logging.getLogger("p2pdiff")
    log.info("starting p2pdiff %s on http://%s:%d", VERSION, config.server.host, config.server.port)
    log.info("%s", raise_open_file_limit())
    log.info("store %s", config.store.display_url)
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
    app = create_app(config)
    app.on_shutdown.append(_arm_backstop)
    try:
        web.run_app(
            app,
            host=config.server.host,
            port=config.server.port,
            access_log=logging.getLogger("aiohttp.access") if config.server.access_log else None,
            access_log_class=AccessLogger,
            # SIGTERM/SIGINT: stop listening, give open requests this long, then run the cleanup
            # contexts (the helper leaves its rooms, the store commits and closes); exit code 0.
            # p2pdiff/ops/shutdown.py keeps the whole of it within this + 1 s.
            shutdown_timeout=config.server.shutdown_timeout_seconds,
            print=None,
        )
    except StoreError as exc:
        print(f"p2pdiff: store error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"p2pdiff: cannot listen on {config.server.host}:{config.server.port}: {exc}", file=sys.stderr)
        return 1
    for repeats in repeat_filters():
        repeats.flush()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
