"""The API app's typed state: one ``web.AppKey`` per store or service, each with its real
type. ``SETTINGS`` is set by ``create_app``; the others are built, with everything they
need, by the app's cleanup context at start-up (see :func:`budgeter.api.app.resources`).
The proxy's dependencies live under ``budgeter.api.proxy.PROXY`` and the health state under
``budgeter.api.health.HEALTH``."""

from __future__ import annotations

from aiohttp import web

from budgeter.queue.batches import BatchStore
from budgeter.settings import Settings
from budgeter.store.types import RedisClient
from budgeter.tenants.auth_throttle import AuthThrottle
from budgeter.tenants.credentials import KeyStore
from budgeter.tenants.store import TenantStore

SETTINGS = web.AppKey("settings", Settings)
REDIS = web.AppKey[RedisClient]("redis")
TENANTS = web.AppKey("tenants", TenantStore)
KEYS = web.AppKey("keys", KeyStore)
BATCHES = web.AppKey("batches", BatchStore)
AUTH_THROTTLE = web.AppKey("auth_throttle", AuthThrottle)
