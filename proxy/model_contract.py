"""What the Triton model and the OpenAI proxy must agree on: how an error crosses gRPC.

gRPC streaming carries only an error *message* to the client, no status code, so the model
writes its errors as data: a fixed prefix, then a JSON object {"kind", "message", "param",
"code"}. `kind` says what the client should do:
- invalid_request: the request is wrong (HTTP 400); `message` is written for the client and
  `param` names the offending field;
- busy: the model's queue is full, retry later (HTTP 503 with Retry-After);
- unavailable: the model is shutting down, retry elsewhere (HTTP 503);
- internal: the server failed (HTTP 500); `message` carries only the request id.

This file exists twice, byte for byte: here (the model folder deploys on its own) and as
proxy/model_contract.py (the proxy image has no model folder).
tests/unit/test_model_contract.py fails when the copies differ.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

ERROR_PREFIX = "qwen_vl_error: "
ERROR_KINDS = ("invalid_request", "busy", "unavailable", "internal")


@dataclass(frozen=True)
class ModelError:
    kind: str
    message: str
    param: str | None = None
    code: str | None = None

    def encode(self) -> str:
        fields = {
            "kind": self.kind,
            "message": self.message,
            "param": self.param,
            "code": self.code,
        }
        return ERROR_PREFIX + json.dumps(fields, ensure_ascii=False)


def decode_error(text: str) -> ModelError | None:
    """The model's error in a Triton error message; None for anything else (Triton's own)."""
    if not text.startswith(ERROR_PREFIX):
        return None
    try:
        fields = json.loads(text[len(ERROR_PREFIX) :])
    except ValueError:
        return None
    if not isinstance(fields, dict) or fields.get("kind") not in ERROR_KINDS:
        return None
    text_or_none = lambda value: value if isinstance(value, str) else None  # noqa: E731
    return ModelError(
        fields["kind"],
        str(fields.get("message") or ""),
        text_or_none(fields.get("param")),
        text_or_none(fields.get("code")),
    )
