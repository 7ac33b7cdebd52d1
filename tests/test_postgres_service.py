"""The PostgreSQL test service (tests/services.py: PostgresServer) and its fixtures
(tests/conftest.py: ``postgres_server``, ``pg_url``): a real server, one database per test."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest

from p2pdiff.config import load_config
from tests.services import PostgresServer, running
from tests.support import service_or_fail


async def test_pg_url_is_a_working_database(pg_url: str) -> None:
    assert pg_url.startswith("postgresql://p2pdiff@127.0.0.1:")
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute("CREATE TABLE notes (id serial PRIMARY KEY, body text NOT NULL)")
        await conn.executemany("INSERT INTO notes (body) VALUES ($1)", [("one",), ("two",)])
        rows = await conn.fetch("SELECT id, body FROM notes ORDER BY id")
        assert [(row["id"], row["body"]) for row in rows] == [(1, "one"), (2, "two")]
        # Durable as in production: the server flushes its WAL.
        assert await conn.fetchval("SHOW fsync") == "on"
    finally:
        await conn.close()


async def test_databases_do_not_share_tables(pg_url: str, postgres_server: PostgresServer) -> None:
    other_url = await postgres_server.create_database()
    assert other_url != pg_url
    first = await asyncpg.connect(pg_url)
    second = await asyncpg.connect(other_url)
    try:
        await first.execute("CREATE TABLE notes (body text)")
        await first.execute("INSERT INTO notes VALUES ('only here')")
        assert await second.fetchval("SELECT to_regclass('notes')") is None
        await second.execute("CREATE TABLE notes (body text)")
        assert await second.fetchval("SELECT count(*) FROM notes") == 0
        assert await first.fetchval("SELECT count(*) FROM notes") == 1
    finally:
        await first.close()
        await second.close()
        await postgres_server.drop_database(other_url.rpartition("/")[2])


async def test_drop_database_disconnects_leftover_clients(postgres_server: PostgresServer) -> None:
    url = await postgres_server.create_database("leftover_clients")
    conn = await asyncpg.connect(url)
    await postgres_server.drop_database("leftover_clients")
    with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError)):
        await conn.fetchval("SELECT 1")
    await conn.close()
    with pytest.raises(asyncpg.InvalidCatalogNameError):
        await asyncpg.connect(url)


async def test_database_names_are_plain_identifiers(postgres_server: PostgresServer) -> None:
    for name in ('x"; DROP DATABASE postgres; --', "Upper", "1digit", "a" * 64):
        with pytest.raises(ValueError, match="database name"):
            await postgres_server.create_database(name)
        with pytest.raises(ValueError, match="database name"):
            await postgres_server.drop_database(name)


@pytest.mark.slow
async def test_committed_rows_survive_kill_and_restart(tmp_path: Path) -> None:
    with running(service_or_fail(PostgresServer, tmp_path / "pg")) as server:
        url = await server.create_database("durable")
        conn = await asyncpg.connect(url)
        await conn.execute("CREATE TABLE notes (body text)")
        await conn.execute("INSERT INTO notes VALUES ('committed')")
        port = server.port
        server.kill()
        with pytest.raises((OSError, asyncpg.PostgresError, asyncpg.InterfaceError)):
            await conn.fetchval("SELECT 1")
        conn.terminate()

        server.start()
        assert server.port == port  # restarts keep the port, so clients' URLs stay valid
        conn = await asyncpg.connect(url)
        try:
            assert await conn.fetchval("SELECT body FROM notes") == "committed"
        finally:
            await conn.close()

        server.restart()
        conn = await asyncpg.connect(url)
        try:
            assert await conn.fetchval("SELECT count(*) FROM notes") == 1
        finally:
            await conn.close()


@pytest.mark.slow
async def test_the_store_dsn_carries_the_password_to_the_server(tmp_path: Path) -> None:
    """[store] url + P2PDIFF_STORE_PASSWORD, through StoreConfig.dsn(), against a server that checks it."""
    password = "pa ss/w@rd:%?#[é]"
    with running(service_or_fail(PostgresServer, tmp_path / "pg", password=password)) as server:
        config_file = tmp_path / "config.toml"
        config_file.write_text("")
        url = f"postgresql://{server.superuser}@{server.host}:{server.port}/postgres"
        store = load_config(config_file, {"P2PDIFF_STORE_URL": url, "P2PDIFF_STORE_PASSWORD": password}).store
        conn = await asyncpg.connect(store.dsn())
        try:
            assert await conn.fetchval("SELECT current_user") == server.superuser
        finally:
            await conn.close()
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg.connect(url)
        wrong = load_config(config_file, {"P2PDIFF_STORE_URL": url, "P2PDIFF_STORE_PASSWORD": "wrong"})
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg.connect(wrong.store.dsn())
