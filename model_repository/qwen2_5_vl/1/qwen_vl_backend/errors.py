"""Errors the model reports back to its caller."""
import json

# gRPC streaming carries only an error *message* to the client, not a status code, so
# errors caused by the request start with this prefix, followed by a JSON object
# {"message", "param", "code"}: a client can tell "your request is wrong" from "the server
# failed" and point at the offending field without parsing prose.
INVALID_REQUEST_PREFIX = "invalid_request: "


class RequestError(ValueError):
    """The request is malformed; the message is safe to show the client."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def client_message(self) -> str:
        detail = {"message": self.message, "param": self.param, "code": self.code}
        return INVALID_REQUEST_PREFIX + json.dumps(detail, ensure_ascii=False)


class EngineFullError(RuntimeError):
    """The engine's queue is full; the caller should retry later."""
