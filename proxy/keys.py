"""The application's typed keys: what the app factory (proxy/app.py) stores and every route
reads."""

from __future__ import annotations

from aiohttp import web

from .config import ProxyConfig
from .media.kinds import MediaFetcher
from .request.usage import TokenUsage
from .state.blobs import BlobStore
from .state.db import Database
from .transport.backend import Backend
from .transport.loader import ModelLoader
from .transport.loras import LoraCatalog
from .transport.model_limits import ModelLimitsBook

CONFIG_KEY = web.AppKey("config", ProxyConfig)
BACKEND_KEY = web.AppKey("backend", Backend)
MODEL_LIMITS_KEY = web.AppKey("model_limits", ModelLimitsBook)
FETCHER_KEY = web.AppKey("fetcher", MediaFetcher)  # absent: remote media fetch disabled
LOADER_KEY = web.AppKey("loader", ModelLoader)  # present only with --lazy-load
STARTED_AT_KEY = web.AppKey("started_at", int)
# Every request's `model` resolves through it: served names and the model's LoRA adapters.
LORAS_KEY = web.AppKey("loras", LoraCatalog)
# Stored state (proxy/state/context.py); both absent with --no-state.
DATABASE_KEY = web.AppKey("database", Database)
BLOBS_KEY = web.AppKey("blobs", BlobStore)
USAGE_KEY = web.RequestKey("usage", TokenUsage)
IGNORED_FIELDS_KEY = web.RequestKey("ignored_fields", list)
