"""Echo model for the proxy's Triton client tests (not the real model).

It answers with a description of what it received, one word per streamed response:
`messages=<n> images=<sha256 prefixes> params=<sorted sampling keys> text=<last text part>`.
Sampling parameters steer it: `echo_error` sends an error response (its value is the
message), `echo_delay_s` sleeps between words and stops when the request is cancelled,
writing `cancelled` to `echo_cancel_marker`; `echo_flag_last` sends the FINAL flag with the
last word instead of an empty final response. Like the real model it reports
`num_image_tokens` (10 per image here) and, when `logprobs` is true, one logprobs entry per
word (logprob -1, top alternatives: the word and "~"). A `describe` request gets the limits in
config.pbtxt's parameters as JSON, as the real model answers with its ModelLimits.

LoRA adapters as the real model's contract has them: the `lora` input is echoed as a first
word `lora=<name>` (none without one), and an unknown name is the model's `not_found` error;
the `list_loras`, `load_lora` and `unload_lora` tasks answer `LoraAdapter` lists (rank 8),
`echo-lora` declared from the start; a load's `lora_path` must lie under `loras/`. Its image
"embedding cache" is a set of (adapter, image digest) pairs: `media_cache_hits` on the last
response says how many of the request's images it had seen before.
"""

import hashlib
import json
import os
import subprocess
import time

import numpy as np
import triton_python_backend_utils as pb_utils

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
ERROR_PREFIX = "qwen_vl_error: "  # proxy/transport/contract.py's model error format
DECLARED_LORA = "echo-lora"
LORA_ROOT = "loras/"
LORA_TASKS = ("list_loras", "load_lora", "unload_lora")


# As the real model does (model_repository/qwen2_5_vl/1/model.py): a watchdog process that
# SIGKILLs this stub once its tritonserver is gone (a tritonserver killed with SIGKILL never
# stops its stubs).
_WATCHDOG = 'while kill -0 "$1" && kill -0 "$2"; do sleep 1; done 2>/dev/null; kill -9 "$2"'


def _exit_with_tritonserver():
    subprocess.Popen(
        ["/bin/sh", "-c", _WATCHDOG, "stub-watchdog", str(os.getppid()), str(os.getpid())],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


class TritonPythonModel:
    def initialize(self, args):
        _exit_with_tritonserver()
        parameters = json.loads(args["model_config"]).get("parameters", {})
        self.limits = {name: int(spec["string_value"]) for name, spec in parameters.items()}
        self.loras = {DECLARED_LORA: _adapter(DECLARED_LORA)}
        self.embedded = set()  # (adapter, image digest): what the "vision tower" has seen

    def execute(self, requests):
        for request in requests:
            describe = _input(request, "describe")
            if describe.size and bool(describe[0]):
                limits = json.dumps(self.limits).encode("utf-8")
                text = pb_utils.Tensor("text_output", np.array([limits], dtype=np.object_))
                response = pb_utils.InferenceResponse(output_tensors=[text])
                request.get_response_sender().send(response, flags=FINAL)
                continue
            task = _text(request, "task")
            if task in LORA_TASKS:
                self._lora_task(request, task)
                continue
            lora = _text(request, "lora")
            if lora and lora not in self.loras:
                _send_error(request, "not_found", f"no LoRA adapter {lora}", "model")
                continue
            self._answer(request, lora)
        return None

    def _lora_task(self, request, task):
        name = _text(request, "lora")
        if task == "load_lora":
            path = _text(request, "lora_path")
            if not path.startswith(LORA_ROOT):
                _send_error(request, "invalid_request", "not under the adapter roots", "lora_path")
                return
            self.loras[name] = _adapter(name)
            answer = [self.loras[name]]
        elif task == "unload_lora":
            if name not in self.loras:
                _send_error(request, "not_found", f"no LoRA adapter {name}", "lora")
                return
            answer = [self.loras.pop(name)]
        else:
            answer = list(self.loras.values())
        text = json.dumps(answer).encode("utf-8")
        tensor = pb_utils.Tensor("text_output", np.array([text], dtype=np.object_))
        response = pb_utils.InferenceResponse(output_tensors=[tensor])
        request.get_response_sender().send(response, flags=FINAL)

    def _cache_hits(self, lora, images):
        keys = [(lora, hashlib.sha256(bytes(image)).digest()) for image in images]
        hits = sum(key in self.embedded for key in keys)
        self.embedded.update(keys)
        return hits

    def _answer(self, request, lora):
        sender = request.get_response_sender()
        messages = json.loads(_input(request, "messages")[0].decode("utf-8"))
        images = _input(request, "image")
        params = json.loads(_input(request, "sampling_parameters")[0].decode("utf-8"))
        stream = bool(_input(request, "stream")[0])
        if "echo_error" in params:
            error = pb_utils.TritonError(params["echo_error"])
            sender.send(pb_utils.InferenceResponse(error=error), flags=FINAL)
            return
        words = [f"lora={lora}"] * bool(lora) + _describe(messages, images, params)
        prompt_tokens = len(json.dumps(messages).split())
        counts = (prompt_tokens, 10 * len(images), self._cache_hits(lora, images))
        logprobs = bool(params.get("logprobs"))
        top = int(params.get("top_logprobs", 0))
        if not stream:
            text = " ".join(words)
            entries = [_logprob(w, top) for w in words] if logprobs else None
            sender.send(_response(text, "stop", counts, len(words), entries), flags=FINAL)
            return
        delay = float(params.get("echo_delay_s", 0))
        flag_last = bool(params.get("echo_flag_last", False))
        for index, word in enumerate(words):
            if delay:
                time.sleep(delay)
            if request.is_cancelled():
                with open(params["echo_cancel_marker"], "w") as marker:
                    marker.write("cancelled")
                sender.send(flags=FINAL)
                return
            last = index == len(words) - 1
            delta = word if index == 0 else " " + word
            finish = "stop" if last else ""
            entries = [_logprob(word, top)] if logprobs else None
            response = _response(delta, finish, counts, 1, entries)
            sender.send(response, flags=FINAL if last and flag_last else 0)
        if not flag_last:
            sender.send(flags=FINAL)


def _adapter(name):
    return {"name": name, "rank": 8, "vision": False, "resident": True}


def _text(request, name):
    values = _input(request, name)
    return values[0].decode("utf-8") if values.size else ""


def _send_error(request, kind, message, param):
    text = ERROR_PREFIX + json.dumps({"kind": kind, "message": message, "param": param})
    response = pb_utils.InferenceResponse(error=pb_utils.TritonError(text))
    request.get_response_sender().send(response, flags=FINAL)


def _input(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return tensor.as_numpy() if tensor is not None else np.array([], dtype=np.object_)


def _describe(messages, images, params):
    digests = ",".join(hashlib.sha256(bytes(image)).hexdigest()[:8] for image in images) or "-"
    content = messages[-1]["content"]
    if isinstance(content, list):
        texts = [part.get("text", "<image>") for part in content]
        content = "|".join(texts)
    keys = ",".join(sorted(params)) or "-"
    return [f"messages={len(messages)}", f"images={digests}", f"params={keys}", *content.split()]


def _logprob(word, top):
    alternatives = [(word, -1.0), ("~", -3.0)][:top]
    entry = {"token": word, "logprob": -1.0, "bytes": list(word.encode("utf-8"))}
    entry["top_logprobs"] = [
        {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))} for t, lp in alternatives
    ]
    return entry


def _response(text, finish_reason, counts, output_tokens, logprobs=None):
    prompt_tokens, image_tokens, cache_hits = counts
    tensors = [
        pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_)),
        pb_utils.Tensor("finish_reason", np.array([finish_reason.encode()], dtype=np.object_)),
        pb_utils.Tensor("num_input_tokens", np.array([prompt_tokens], dtype=np.uint32)),
        pb_utils.Tensor("num_output_tokens", np.array([output_tokens], dtype=np.uint32)),
        pb_utils.Tensor("num_image_tokens", np.array([image_tokens], dtype=np.uint32)),
    ]
    if finish_reason:  # the request's last response
        tensors.append(pb_utils.Tensor("media_cache_hits", np.array([cache_hits], dtype=np.uint32)))
    if logprobs is not None:
        raw = json.dumps(logprobs, ensure_ascii=False).encode("utf-8")
        tensors.append(pb_utils.Tensor("logprobs", np.array([raw], dtype=np.object_)))
    return pb_utils.InferenceResponse(output_tensors=tensors)
