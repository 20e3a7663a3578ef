"""Errors the model reports back to its caller, as `contract.ModelError`s."""

from .contract import ModelError


class RequestError(ValueError):
    """The request is malformed; the message is safe to show the client."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def model_error(self) -> ModelError:
        return ModelError("invalid_request", self.message, self.param, self.code)


class EngineFullError(RuntimeError):
    """The engine's queue is full; the caller should retry later."""

    kind = "busy"


class EngineStoppingError(EngineFullError):
    """The model is shutting down; the caller should go elsewhere."""

    kind = "unavailable"


class DeviceMemoryError(EngineFullError):
    """The device ran out of memory for this request's part of a step; retry later (other
    requests of the step go on)."""

    kind = "busy"


class NotFoundError(RequestError):
    """The request names something this model does not serve (an unknown LoRA adapter): the
    proxy answers 404 model_not_found, as OpenAI does for an unknown model."""

    def model_error(self) -> ModelError:
        return ModelError("not_found", self.message, self.param or "model", "model_not_found")
