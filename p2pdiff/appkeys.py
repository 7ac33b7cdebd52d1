"""Typed keys for the objects the aiohttp app shares between handlers and background tasks."""

from __future__ import annotations

from aiohttp import web

from p2pdiff.config import Config
from p2pdiff.ops.shutdown import Shutdown
from p2pdiff.rooms.helper import Helper
from p2pdiff.tasks.events import EventBus
from p2pdiff.tasks.queue import QueueManager
from p2pdiff.tasks.store import TaskStore

CONFIG = web.AppKey("config", Config)
STORE = web.AppKey[TaskStore]("store")  # the backend create_app chose
QUEUE = web.AppKey("queue", QueueManager)
HELPER = web.AppKey("helper", Helper)
STARTED_AT = web.AppKey("started_at", float)
EVENTS = web.AppKey("events", EventBus)
SHUTDOWN = web.AppKey("shutdown", Shutdown)
