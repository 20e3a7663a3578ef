"""Triton Python-backend model: Qwen2.5-VL chat with token streaming (decoupled mode).

This file is only the Triton lifecycle; parsing, images and generation live in
`qwen_vl_backend/`, importable and testable without Triton.
"""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from qwen_vl_backend.contract import (  # noqa: E402
    DESCRIBE_INPUT,
    Input,
    ModelError,
    Output,
    Priority,
    Task,
)
from qwen_vl_backend.engine.batching import BatchingEngine, EngineObserver  # noqa: E402
from qwen_vl_backend.engine.responses import OutputChunk  # noqa: E402
from qwen_vl_backend.engine.tracing import TRACE_PARAMETERS, request_tracer  # noqa: E402
from qwen_vl_backend.errors import EngineFullError, NotFoundError, RequestError  # noqa: E402
from qwen_vl_backend.media import decoding  # noqa: E402
from qwen_vl_backend.modeling.checkpoint import load_checkpoint  # noqa: E402
from qwen_vl_backend.request.prepare import RawRequest, parse_task  # noqa: E402
from qwen_vl_backend.settings import ModelSettings, config_parameters  # noqa: E402

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class _TritonLogHandler(logging.Handler):
    """Routes the helper modules' `logging` records into Triton's log."""

    def emit(self, record):
        message = self.format(record)
        if record.levelno >= logging.ERROR:
            pb_utils.Logger.log_error(message)
        elif record.levelno >= logging.WARNING:
            pb_utils.Logger.log_warn(message)
        else:
            pb_utils.Logger.log_info(message)


def _scalar(request, name, default=None):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return default
    value = tensor.as_numpy().reshape(-1)
    if value.size == 0:
        return default
    item = value[0]
    return (
        item.decode("utf-8")
        if isinstance(item, bytes)
        else item.item()
        if hasattr(item, "item")
        else item
    )


def _raw_request(request) -> RawRequest:
    images = pb_utils.get_input_tensor_by_name(request, Input.IMAGE)
    videos = pb_utils.get_input_tensor_by_name(request, Input.VIDEO)
    input_ids = pb_utils.get_input_tensor_by_name(request, Input.INPUT_IDS)
    special_tokens = _scalar(request, Input.ADD_SPECIAL_TOKENS)
    try:
        return RawRequest(
            request_id=request.request_id(),
            messages=_scalar(request, Input.MESSAGES),
            text_input=_scalar(request, Input.TEXT_INPUT),
            images=[bytes(x) for x in images.as_numpy().reshape(-1)] if images is not None else [],
            videos=[bytes(x) for x in videos.as_numpy().reshape(-1)] if videos is not None else [],
            stream=bool(_scalar(request, Input.STREAM, False)),
            sampling_parameters=_scalar(request, Input.SAMPLING_PARAMETERS),
            exclude_input_in_output=bool(_scalar(request, Input.EXCLUDE_INPUT_IN_OUTPUT, False)),
            return_finish_reason=bool(_scalar(request, Input.RETURN_FINISH_REASON, False)),
            return_num_input_tokens=bool(_scalar(request, Input.RETURN_NUM_INPUT_TOKENS, False)),
            return_num_output_tokens=bool(_scalar(request, Input.RETURN_NUM_OUTPUT_TOKENS, False)),
            tools=_scalar(request, Input.TOOLS),
            priority=_scalar(request, Input.PRIORITY),
            return_timings=bool(_scalar(request, Input.RETURN_TIMINGS, False)),
            task=_scalar(request, Input.TASK),
            input_ids=input_ids.as_numpy().reshape(-1).tolist() if input_ids is not None else None,
            add_generation_prompt=bool(_scalar(request, Input.ADD_GENERATION_PROMPT, True)),
            add_special_tokens=None if special_tokens is None else bool(special_tokens),
            return_token_strs=bool(_scalar(request, Input.RETURN_TOKEN_STRS, False)),
            lora=_scalar(request, Input.LORA),
            lora_path=_scalar(request, Input.LORA_PATH),
        )
    except UnicodeDecodeError as exc:
        raise RequestError("text inputs must be UTF-8") from exc


def _trace_context(request) -> dict[str, str] | None:
    """The W3C trace context the proxy sent as request parameters (engine/tracing.py)."""
    try:
        parameters = json.loads(request.parameters() or "{}")
    except (ValueError, TypeError):
        return None
    context = {k: parameters[k] for k in TRACE_PARAMETERS if isinstance(parameters.get(k), str)}
    return context or None


class TritonSink:
    """ResponseSink over a decoupled response sender: the outputs the request asked for."""

    def __init__(self, request, raw: RawRequest):
        self._sender = request.get_response_sender()
        self._raw = raw
        self._counted: set[int] = set()  # choices whose prompt counts went out

    def is_cancelled(self) -> bool:
        return self._sender.is_cancelled()

    def send(self, chunk: OutputChunk):
        self._sender.send(self._response(chunk), flags=FINAL if chunk.final else 0)

    def fail(self, error):
        self._sender.send(
            pb_utils.InferenceResponse(error=_triton_error(error, self._raw)), flags=FINAL
        )

    def cancelled(self):
        self._sender.send(flags=FINAL)

    def _response(self, chunk: OutputChunk):
        # Each output tensor is a shared-memory allocation here and a message field in
        # tritonserver and gRPC, per token: the prompt counts go with a choice's first chunk
        # and its last (the proxy keeps what it saw), finish_reason only once it is set.
        raw = self._raw
        outputs = [
            _text_tensor(Output.TEXT_OUTPUT, chunk.text),
            pb_utils.Tensor(Output.INDEX, np.array([chunk.index], dtype=np.uint32)),
        ]
        if raw.return_finish_reason and chunk.finish_reason:
            outputs.append(_text_tensor(Output.FINISH_REASON, chunk.finish_reason))
        first = chunk.index not in self._counted
        if raw.return_num_input_tokens and (first or chunk.finish_reason):
            self._counted.add(chunk.index)
            for name, count in (
                (Output.NUM_INPUT_TOKENS, chunk.prompt_tokens),
                (Output.NUM_IMAGE_TOKENS, chunk.image_tokens),
                (Output.NUM_VIDEO_TOKENS, chunk.video_tokens),
            ):
                outputs.append(pb_utils.Tensor(name, np.array([count], dtype=np.uint32)))
        if raw.return_num_output_tokens:
            outputs.append(
                pb_utils.Tensor(
                    Output.NUM_OUTPUT_TOKENS, np.array([chunk.num_tokens], dtype=np.uint32)
                )
            )
        if chunk.logprobs is not None:
            outputs.append(
                _text_tensor(Output.LOGPROBS, json.dumps(chunk.logprobs, ensure_ascii=False))
            )
        if chunk.stop_reason is not None:
            outputs.append(_text_tensor(Output.STOP_REASON, chunk.stop_reason))
        if chunk.prompt_logprobs is not None:
            text = json.dumps(chunk.prompt_logprobs, ensure_ascii=False)
            outputs.append(_text_tensor(Output.PROMPT_LOGPROBS, text))
        if chunk.repetition_detected:
            outputs.append(pb_utils.Tensor(Output.REPETITION_DETECTED, np.array([True])))
        if chunk.timings is not None:
            outputs.append(_text_tensor(Output.TIMINGS, json.dumps(chunk.timings)))
        if chunk.final:
            hits = np.array([chunk.media_cache_hits], dtype=np.uint32)
            outputs.append(pb_utils.Tensor(Output.MEDIA_CACHE_HITS, hits))
        return pb_utils.InferenceResponse(output_tensors=outputs)


def _text_tensor(name, text):
    return pb_utils.Tensor(name, np.array([text.encode("utf-8")], dtype=np.object_))


def _triton_error(error, raw):
    """The error as data (qwen_vl_backend/contract.py); the Triton code for other clients."""
    if isinstance(error, RequestError):
        codes = pb_utils.TritonError
        code = codes.NOT_FOUND if isinstance(error, NotFoundError) else codes.INVALID_ARG
        return pb_utils.TritonError(error.model_error().encode(), code)
    if isinstance(error, EngineFullError):
        return pb_utils.TritonError(
            ModelError(error.kind, str(error)).encode(), pb_utils.TritonError.UNAVAILABLE
        )
    request_id = raw.request_id if raw else ""
    logging.getLogger("qwen_vl_backend").error(
        "request %s failed", request_id or "?", exc_info=error
    )
    message = f"internal error while generating (request id {request_id})"
    return pb_utils.TritonError(
        ModelError("internal", message).encode(), pb_utils.TritonError.INTERNAL
    )


class TaskAnswerSink:
    """TaskSink (engine/responses.py) over a decoupled response sender: one response whose
    text_output is the answer, then the final flag."""

    def __init__(self, request, raw: RawRequest):
        self._sender = request.get_response_sender()
        self._raw = raw

    def answer(self, text: str):
        response = pb_utils.InferenceResponse(
            output_tensors=[_text_tensor(Output.TEXT_OUTPUT, text)]
        )
        self._sender.send(response, flags=FINAL)

    def fail(self, error):
        self._sender.send(
            pb_utils.InferenceResponse(error=_triton_error(error, self._raw)), flags=FINAL
        )


class _EarlySink:
    """Errors found before a RawRequest exists (unreadable inputs)."""

    def __init__(self, request):
        self._sender = request.get_response_sender()
        self._id = request.request_id()

    def fail(self, error):
        self._sender.send(
            pb_utils.InferenceResponse(error=_triton_error(error, RawRequest(request_id=self._id))),
            flags=FINAL,
        )


# Seconds; spans a tiny model on CPU (ms) to a 7B prefill of several images on a busy GPU.
TTFT_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
# Seconds; a small JSON schema compiles in ~1 ms, an 8 KB one in ~4 ms (docs/engine.md), and
# llguidance's limits stop the pathological ones.
GRAMMAR_COMPILE_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0]
CONSTRAINED_TYPES = ("json_object", "json_schema", "tool_calls")
# The host path timers (EngineStats.timings, cumulative seconds) published by phase.
HOST_PHASES = (
    "step",
    "scheduling",
    "vision",
    "forward",
    "sampling",
    "output",
    "detokenize",
    "send",
    "cancellation",
)


class TritonMetrics(EngineObserver):
    """Engine events as custom metrics on Triton's :8002/metrics, next to Triton's own."""

    def __init__(self, labels: dict):
        # Triton invalidates a Metric whose MetricFamily is garbage-collected: keep them all.
        self._families = []
        self._ttft = self._family(
            "qwen_vl_time_to_first_token_seconds",
            "Time from a request's arrival at the engine to its first token",
            "HISTOGRAM",
        ).Metric(labels=labels, buckets=TTFT_BUCKETS)
        counter = lambda name, text: self._family(name, text, "COUNTER").Metric(labels=labels)  # noqa: E731
        gauge = lambda name, text: self._family(name, text, "GAUGE").Metric(labels=labels)  # noqa: E731
        self._prompt_tokens = counter("qwen_vl_prompt_tokens_total", "Prompt tokens prefilled")
        self._image_tokens = counter(
            "qwen_vl_image_tokens_total", "Image tokens among the prompt tokens"
        )
        self._video_tokens = counter(
            "qwen_vl_video_tokens_total", "Video tokens among the prompt tokens"
        )
        self._generated = counter("qwen_vl_generated_tokens_total", "Tokens generated")
        self._batch = gauge("qwen_vl_batch_size", "Sequences in the running decode batch")
        self._waiting = gauge("qwen_vl_waiting_requests", "Requests waiting to join the batch")
        admitted = self._family(
            "qwen_vl_requests_admitted_total",
            "Requests that joined the batch, by priority class (interactive, batch)",
            "COUNTER",
        )
        self._admitted = {
            p: admitted.Metric(labels={**labels, "priority": p.value}) for p in Priority
        }
        waiting_by_priority = self._family(
            "qwen_vl_waiting_requests_by_priority",
            "Requests waiting to join the batch, by priority class (interactive, batch)",
            "GAUGE",
        )
        self._waiting_by_priority = {
            p: waiting_by_priority.Metric(labels={**labels, "priority": p.value}) for p in Priority
        }
        outcomes = self._family(
            "qwen_vl_requests_finished_total",
            "Requests finished, by outcome (stop, length, cancelled, error)",
            "COUNTER",
        )
        self._image_cache_hits = counter(
            "qwen_vl_image_cache_hits_total", "Images whose vision-tower output came from the cache"
        )
        self._image_cache_misses = counter(
            "qwen_vl_image_cache_misses_total", "Images run through the vision tower"
        )
        self._finished = {
            outcome: outcomes.Metric(labels={**labels, "outcome": outcome})
            for outcome in ("stop", "length", "cancelled", "error")
        }
        constrained = self._family(
            "qwen_vl_constrained_requests_total",
            "Requests accepted with a grammar constraint, by type (json_object, json_schema, "
            "tool_calls)",
            "COUNTER",
        )
        self._constrained = {
            kind: constrained.Metric(labels={**labels, "type": kind}) for kind in CONSTRAINED_TYPES
        }
        self._repetition_stops = counter(
            "qwen_vl_repetition_stops_total",
            "Choices the repetition guard ended (their last n-gram repeated past max_repeats)",
        )
        self._grammar_compile = self._family(
            "qwen_vl_grammar_compile_seconds",
            "Time to compile a request's grammar (cache misses only)",
            "HISTOGRAM",
        ).Metric(labels=labels, buckets=GRAMMAR_COMPILE_BUCKETS)
        self._steps = counter("qwen_vl_engine_steps_total", "Engine steps that computed something")
        phases = self._family(
            "qwen_vl_engine_step_seconds_total",
            "Engine host path time by phase (docs/engine.md Host path): step (all of the engine "
            "thread's), scheduling, vision, forward, sampling, output; on the sender thread "
            "detokenize, send, cancellation",
            "COUNTER",
        )
        self._phase_seconds = {
            phase: phases.Metric(labels={**labels, "phase": phase}) for phase in HOST_PHASES
        }

    def _family(self, name, description, kind):
        family = pb_utils.MetricFamily(name, description, getattr(pb_utils.MetricFamily, kind))
        self._families.append(family)
        return family

    def prefilled(self, prompt_tokens, image_tokens, time_to_first_token, video_tokens=0):
        self._prompt_tokens.increment(prompt_tokens)
        self._image_tokens.increment(image_tokens)
        self._video_tokens.increment(video_tokens)
        self._generated.increment(1)
        self._ttft.observe(time_to_first_token)

    def decoded(self, batch_size, waiting):
        self._generated.increment(batch_size)
        self._batch.set(batch_size)
        self._waiting.set(waiting)

    def admitted(self, priority):
        self._admitted[priority].increment(1)

    def waiting_by_priority(self, waiting):
        for priority, count in waiting.items():
            self._waiting_by_priority[priority].set(count)

    def finished(self, outcome):
        self._finished[outcome].increment(1)

    def images_encoded(self, cache_hits, cache_misses):
        self._image_cache_hits.increment(cache_hits)
        self._image_cache_misses.increment(cache_misses)

    def constrained(self, kind):
        self._constrained[kind].increment(1)

    def grammar_compiled(self, seconds):
        self._grammar_compile.observe(seconds)

    def repetition_detected(self):
        self._repetition_stops.increment(1)

    def host_timings(self, increase):
        self._steps.increment(increase["steps"])
        for phase, metric in self._phase_seconds.items():
            metric.increment(max(0.0, increase[f"{phase}_s"]))


# Polls once a second: while tritonserver and this stub both live, then SIGKILL to the stub.
_WATCHDOG = 'while kill -0 "$1" && kill -0 "$2"; do sleep 1; done 2>/dev/null; kill -9 "$2"'


def _exit_with_tritonserver():
    """Start a watchdog that SIGKILLs this stub once its tritonserver is gone. A tritonserver
    killed with SIGKILL never stops its stubs, and a stub thread then blocked in a call to it
    (a metric update) holds the GIL for good, so no thread of the stub could do it: the
    watchdog is a process of its own (in tritonserver's process group, ended with it). Not
    PR_SET_PDEATHSIG either: it fires when the *thread* that forked the stub exits, and Triton
    forks stubs from a loading thread that ends after the load."""
    parent, stub = os.getppid(), os.getpid()
    if parent == 1:  # tritonserver died while this stub was importing
        os._exit(1)
    subprocess.Popen(
        ["/bin/sh", "-c", _WATCHDOG, "stub-watchdog", str(parent), str(stub)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


class TritonPythonModel:
    def initialize(self, args):
        _exit_with_tritonserver()
        self.model_config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(self.model_config):
            raise pb_utils.TritonModelException(
                "this model streams tokens: set model_transaction_policy { decoupled: true }"
            )
        self._setup_logging()
        self.settings = ModelSettings.from_parameters(config_parameters(self.model_config))
        decoding.configure(self.settings)  # workers start while the weights load
        device = self.settings.resolve_device(
            args["model_instance_kind"], args["model_instance_device_id"]
        )
        dtype = self.settings.resolve_dtype(device)
        if self.settings.device_map:
            device = f"device_map={self.settings.device_map}"
            if args["model_instance_kind"].upper() == "GPU":
                self.log.warning(
                    "device_map with instance kind GPU: every instance spreads over all GPUs "
                    "it sees; use instance_group [ { count: 1, kind: KIND_MODEL } ]"
                )
        if device == "cpu":
            threads = self.settings.resolve_torch_threads(len(os.sched_getaffinity(0)))
            torch.set_num_threads(threads)
            self.log.info("torch intra-op threads: %d", threads)
        self.log.info("loading %s on %s (%s)", self.settings.model, device, dtype)
        self.checkpoint = load_checkpoint(
            self.settings.model,
            device,
            dtype,
            self.settings.attn_implementation,
            self.settings.max_model_len,
            device_map=self.settings.device_map,
            max_memory=self.settings.max_memory_map(),
        )
        if self.checkpoint.random_weights:
            self.log.warning(
                "%s has RANDOM weights: it exercises the serving stack, its answers "
                "are meaningless. Set QWEN_VL_MODEL to a real checkpoint.",
                self.settings.model,
            )
        labels = {"model": args["model_name"], "version": args["model_version"]}
        settings = self.settings
        self.tracer = request_tracer(
            settings.otlp_traces_endpoint, settings.trace_sample_ratio, settings.trace_service_name
        )
        self.engine = BatchingEngine(
            self.checkpoint,
            settings,
            observer=TritonMetrics(labels),
            tracer=self.tracer,
            model_dir=os.path.dirname(os.path.abspath(__file__)),
        )
        self.log.info("ready: max context %d tokens", self.checkpoint.max_model_len)

    def _setup_logging(self):
        self.log = logging.getLogger("qwen_vl_backend")
        if not any(isinstance(h, _TritonLogHandler) for h in self.log.handlers):
            self.log.addHandler(_TritonLogHandler())
        self.log.setLevel(logging.INFO)
        self.log.propagate = False

    def execute(self, requests):
        for request in requests:
            if _scalar(request, DESCRIBE_INPUT, False):
                self._describe(request)
                continue
            try:
                raw = _raw_request(request)
            except Exception as exc:  # the request must still get its final response
                _EarlySink(request).fail(exc)
                continue
            if self.tracer is not None:
                raw.trace_context = _trace_context(request)
            try:
                task = parse_task(raw.task)
            except Exception as exc:
                TaskAnswerSink(request, raw).fail(exc)
                continue
            sink = (
                TritonSink(request, raw) if task is Task.GENERATE else TaskAnswerSink(request, raw)
            )
            try:
                if task is Task.GENERATE:
                    self.engine.submit(raw, sink)
                else:
                    self.engine.submit_task(task, raw, sink)
            except Exception as exc:
                sink.fail(exc)
        return None

    def _describe(self, request):
        """Answers with the limits requests are held to (contract.ModelLimits), then FINAL."""
        text = _text_tensor(Output.TEXT_OUTPUT, self.engine.limits.encode())
        response = pb_utils.InferenceResponse(output_tensors=[text])
        request.get_response_sender().send(response, flags=FINAL)

    def finalize(self):
        decoding.shutdown()
        if not self.engine.shutdown():
            self.log.warning("generations still running at shutdown were abandoned")
        if self.tracer is not None:
            self.tracer.shutdown()
