"""Errors the model reports back to its caller."""

# gRPC streaming carries only an error *message* to the client, not a status code, so
# errors caused by the request start with this prefix: the proxy (and any other client)
# can tell "your request is wrong" from "the server failed" without parsing prose.
INVALID_REQUEST_PREFIX = "invalid_request: "


class RequestError(ValueError):
    """The request is malformed; the message is safe to show the client."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param

    def client_message(self) -> str:
        where = f" ({self.param})" if self.param else ""
        return f"{INVALID_REQUEST_PREFIX}{self.message}{where}"


class EngineFullError(RuntimeError):
    """The engine's queue is full; the caller should retry later."""
