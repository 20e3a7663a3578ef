"""Where the proxy keeps its state and for how long (the `state` section of proxy/config.py:
each field is the flag `--<field>`, `enabled` is `--state` / `--no-state`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .db import redact, sqlite_url

MIB = 1024 * 1024
DAY_S = 24 * 3600.0
# The directory under the XDG state home (`$XDG_STATE_HOME`, else ~/.local/state).
STATE_DIR_NAME = "qwen-vl-proxy"


def default_state_dir() -> str:
    """$XDG_STATE_HOME/qwen-vl-proxy, else ~/.local/state/qwen-vl-proxy: XDG's place for
    data that must outlive a restart but is not the user's documents, and the same wherever
    the proxy is started from (a ./.state would move with the working directory, and a
    restart elsewhere would look like lost state). Containers set PROXY_STATE_DIR to a
    volume."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return str(Path(base) / STATE_DIR_NAME)


@dataclass(frozen=True)
class StateSettings:
    enabled: bool = True
    state_dir: str = field(default_factory=default_state_dir)
    database_url: str = field(default="", repr=False)  # "" = SQLite under state_dir
    file_max_bytes: int = 200 * MIB
    state_retention_s: float = 30 * DAY_S  # 0 = kept until deleted
    state_sweep_interval_s: float = 300.0

    @property
    def url(self) -> str:
        """The database: --database-url, else the SQLite file under --state-dir."""
        return self.database_url or sqlite_url(self.state_dir)

    @property
    def shown_url(self) -> str:
        """The database for logs: the password, if any, hidden."""
        return redact(self.url)

    def expires_at(self, created_at: float, ttl_s: float | None = None) -> float | None:
        """When an object created at `created_at` expires: after `ttl_s` (a client's own
        expiry, never beyond the retention) or the retention; None = never."""
        limits = [s for s in (ttl_s, self.state_retention_s) if s]
        return created_at + min(limits) if limits else None
