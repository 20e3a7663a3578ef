"""Proxy settings: command-line flags, each with an environment-variable fallback."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass

MIB = 1024 * 1024


@dataclass(frozen=True)
class ProxyConfig:
    host: str = "0.0.0.0"
    port: int = 9000
    triton_url: str = "localhost:8001"
    triton_model: str = "qwen2_5_vl"
    served_model_name: str = "qwen2.5-vl-7b-instruct"
    max_request_bytes: int = 64 * MIB
    log_level: str = "INFO"


def _env(name: str, default: object) -> str:
    # A string default goes through the flag's `type`, so a bad env value gets argparse's error.
    return os.environ.get(name, str(default))


def build_parser() -> argparse.ArgumentParser:
    defaults = ProxyConfig()
    parser = argparse.ArgumentParser(
        prog="python -m proxy",
        description="OpenAI-compatible chat completions API backed by Triton (gRPC streaming).",
    )
    parser.add_argument(
        "--host",
        default=_env("PROXY_HOST", defaults.host),
        help="interface to listen on; use 127.0.0.1 to keep the API off the network [PROXY_HOST]",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=_env("PROXY_PORT", defaults.port),
        help="HTTP port; 9000 matches Triton's own OpenAI frontend [PROXY_PORT]",
    )
    parser.add_argument(
        "--triton-url",
        default=_env("TRITON_GRPC_URL", defaults.triton_url),
        help="Triton gRPC endpoint host:port; inference streams over gRPC [TRITON_GRPC_URL]",
    )
    parser.add_argument(
        "--triton-model",
        default=_env("TRITON_MODEL", defaults.triton_model),
        help="model name in the Triton model repository [TRITON_MODEL]",
    )
    parser.add_argument(
        "--served-model-name",
        default=_env("SERVED_MODEL_NAME", defaults.served_model_name),
        help="name clients put in `model` and that responses echo [SERVED_MODEL_NAME]",
    )
    parser.add_argument(
        "--max-request-bytes",
        type=int,
        default=_env("PROXY_MAX_REQUEST_BYTES", defaults.max_request_bytes),
        help="largest accepted request body; base64 images outgrow aiohttp's 1 MiB default "
        "[PROXY_MAX_REQUEST_BYTES]",
    )
    parser.add_argument(
        "--log-level",
        default=_env("PROXY_LOG_LEVEL", defaults.log_level),
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="verbosity of the proxy's logs (one line per request at INFO) [PROXY_LOG_LEVEL]",
    )
    return parser


def parse_config(argv: Sequence[str] | None = None) -> ProxyConfig:
    args = build_parser().parse_args(argv)
    if args.max_request_bytes <= 0:
        raise SystemExit("--max-request-bytes must be positive")
    return ProxyConfig(
        host=args.host,
        port=args.port,
        triton_url=args.triton_url,
        triton_model=args.triton_model,
        served_model_name=args.served_model_name,
        max_request_bytes=args.max_request_bytes,
        log_level=args.log_level,
    )
