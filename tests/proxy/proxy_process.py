"""`python -m proxy` as scripts/stack.py starts it, in a process group of its own (so a test
can end all of it), on the test's event loop, which the fake Triton shares."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

import aiohttp
import openai
from helpers import wait_until_async
from proxy_fakes import SERVED_MODEL
from stack import ROOT, StackConfig, free_port, proxy_command

from proxy.observability.metrics import MULTIPROCESS_DIR_ENV


class ProxyProcess:
    def __init__(
        self, triton_port: int, log_path: Path, *args: str, port: int | None = None
    ) -> None:
        self.config = StackConfig(
            model="",  # the model is Triton's business: the proxy is not told it
            host="127.0.0.1",
            grpc_port=triton_port,
            proxy_port=port or free_port(),
            served_model_name=SERVED_MODEL,
            proxy_args=["--no-image-fetch", *args],
        )
        self.url = self.config.proxy_url
        self.log_path = log_path
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for name in [n for n in env if n.startswith("PROXY_") or n == MULTIPROCESS_DIR_ENV]:
            del env[name]
        with open(self.log_path, "ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                *proxy_command(self.config),
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )

    async def wait_ready(self, session: aiohttp.ClientSession | None = None) -> None:
        async with contextlib.AsyncExitStack() as stack:
            client = session or await stack.enter_async_context(aiohttp.ClientSession())

            async def ready() -> bool:
                assert self.process.returncode is None, self.log()
                try:
                    async with client.get(self.url + "/ready") as response:
                        return response.status == 200
                except aiohttp.ClientConnectionError:
                    return False

            await wait_until_async(ready, timeout=60, step=0.05, what="the proxy to be ready")

    def client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    async def kill(self) -> None:
        """SIGKILL to the whole group, workers left behind by an ended parent included:
        nothing of it runs after this (no drain, no lease given back)."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        await self.process.wait()
