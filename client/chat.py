#!/usr/bin/env python3
"""Command-line chat client for the OpenAI-compatible endpoint.

python -m client.chat "What is in this picture?" --image cat.jpg --stream
"""

from __future__ import annotations

import argparse
import base64
import json
import mimetypes
import os
import sys
from pathlib import Path

import requests

if __package__ in (None, ""):  # run as a file (python client/chat.py), not as a module
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from client.sse import stream_events  # noqa: E402

DEFAULT_URL = os.environ.get("QWEN_VL_URL", "http://localhost:9000")


def image_part(path: Path) -> dict:
    mime = mimetypes.guess_type(path.name)[0] or "image/jpeg"
    encoded = base64.b64encode(path.read_bytes()).decode("ascii")
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{encoded}"}}


def build_payload(args: argparse.Namespace) -> dict:
    content = [image_part(Path(p)) for p in args.image] + [{"type": "text", "text": args.prompt}]
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": content})
    payload = {
        "model": args.model,
        "messages": messages,
        "max_tokens": args.max_tokens,
        "stream": args.stream,
    }
    if args.temperature is not None:
        payload["temperature"] = args.temperature
    return payload


def _error_text(body: dict) -> str:
    error = body.get("error") or {}
    return f"{error.get('type', 'error')}: {error.get('message', body)}"


def stream_answer(response: requests.Response, out=sys.stdout) -> int:
    """Print content deltas as they arrive; returns the exit status."""
    for event in stream_events(response.iter_lines(decode_unicode=False)):
        if "error" in event:
            print(f"\n{_error_text(event)}", file=sys.stderr)
            return 1
        for choice in event.get("choices", []):
            out.write(choice.get("delta", {}).get("content") or "")
            out.flush()
        if event.get("usage"):
            usage = event["usage"]
            print(
                f"\n[{usage['prompt_tokens']} prompt + {usage['completion_tokens']} completion tokens]",
                file=sys.stderr,
            )
    out.write("\n")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Ask the Qwen2.5-VL server a question.")
    parser.add_argument("prompt")
    parser.add_argument(
        "--image", action="append", default=[], help="local image file (repeatable)"
    )
    parser.add_argument("--system", default=None, help="system message")
    parser.add_argument("--url", default=DEFAULT_URL, help="server base URL (env QWEN_VL_URL)")
    parser.add_argument("--model", default="qwen2.5-vl-7b-instruct")
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    parser.add_argument("--json", action="store_true", help="print the whole JSON response")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args(argv)

    payload = build_payload(args)
    if args.stream:
        payload["stream_options"] = {"include_usage": True}
    url = args.url.rstrip("/") + "/v1/chat/completions"
    try:
        response = requests.post(url, json=payload, stream=args.stream, timeout=args.timeout)
    except requests.RequestException as err:
        print(f"cannot reach {url}: {err}", file=sys.stderr)
        return 2
    if response.status_code != 200:
        try:
            print(_error_text(response.json()), file=sys.stderr)
        except ValueError:
            print(f"HTTP {response.status_code}", file=sys.stderr)
        return 1
    if args.stream:
        return stream_answer(response)
    body = response.json()
    print(
        json.dumps(body, indent=2, ensure_ascii=False)
        if args.json
        else body["choices"][0]["message"]["content"]
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
