"""torch.compile for the lean decoder's dense parts, with one static shape per bucket.

A layer's work outside attention is two pure functions of its inputs and weights
(`LeanDecoder._attention_inputs`: norm, q/k/v GEMM, rotary; `_layer_output`: o_proj, residual,
norm, gate/up GEMM, SiLU × up, down, residual). Attention depends on the step's layout (which
slots, how long, which chunks) and stays eager between them. Each function is compiled once
(`dynamic=False`, `fullgraph=True`) and serves every layer, since the layers' weights have the
same shapes; a step runs in the smallest bucket of rows that holds it, padded with zero rows, so
serving never meets a new shape after the warm-up at load. Steps larger than the largest bucket
run eagerly.

Compiling must never cost the model its load: a failure while warming up, or later in a step,
logs a warning and the decoder goes back to eager for good. Inductor's on-disk cache
(`TORCHINDUCTOR_CACHE_DIR`, on by default) makes a restart's warm-up a cache lookup.
"""

from __future__ import annotations

import logging
import time

import torch

log = logging.getLogger(__name__)

# torch.compile's backend. Tests swap in "aot_eager" (dynamo's whole-graph capture, the same
# guards and buckets, without inductor's code generation and its C++/Triton compile time).
BACKEND = "inductor"


def power_of_two_buckets(largest: int) -> list[int]:
    """1, 2, 4, … up to the first power of two ≥ `largest`."""
    buckets = [1]
    while buckets[-1] < largest:
        buckets.append(buckets[-1] * 2)
    return buckets


class _Guarded:
    """A compiled function that hands the call to the eager one (and switches the decoder to
    eager) the first time it raises."""

    def __init__(self, decoder, compiled, eager, name: str):
        self._decoder, self._compiled, self._eager, self._name = decoder, compiled, eager, name

    def __call__(self, *args):
        try:
            return self._compiled(*args)
        except Exception:
            log.warning(
                "compiled %s failed; the decoder runs eagerly from now on",
                self._name,
                exc_info=True,
            )
            self._decoder.use_eager()
            return self._eager(*args)


def compile_decoder(decoder, buckets: list[int]) -> bool:
    """Compile `decoder`'s dense parts for `buckets` (row counts) and run each once (the
    warm-up). False, with the decoder left eager and a warning logged, if anything fails."""
    if decoder.weights.packed:
        log.warning("compile: the text weights are prepacked for oneDNN; running eagerly")
        return False
    # one graph per bucket and device (two with LoRA stacks: steps with and without adapter
    # rows), with room for a guard that differs once (e.g. a tensor made outside inference
    # mode) before the fallback to eager
    variants = 2 if decoder.lora is None else 4
    limit = variants * len(buckets) * len({w.device for w in decoder.weights.layers}) + 8
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), limit))
    started = time.perf_counter()
    try:
        decoder.attention_inputs = _Guarded(
            decoder, _compile(decoder._attention_inputs), decoder._attention_inputs, "q/k/v"
        )
        decoder.layer_output = _Guarded(
            decoder, _compile(decoder._layer_output), decoder._layer_output, "MLP"
        )
        decoder.buckets = sorted(buckets)
        for done, bucket in enumerate(decoder.buckets, start=1):
            _warm_up(decoder, bucket)
            log.info(
                "compiling the decoder: %d rows done (%d of %d buckets, %.1f s)",
                bucket,
                done,
                len(buckets),
                time.perf_counter() - started,
            )
    except Exception:
        log.warning("compile failed; the decoder runs eagerly", exc_info=True)
        decoder.use_eager()
        return False
    log.info(
        "compiled the decoder for %d step sizes (%s rows) in %.1f s",
        len(buckets),
        ",".join(map(str, decoder.buckets)),
        time.perf_counter() - started,
    )
    return True


def _compile(function):
    return torch.compile(function, backend=BACKEND, dynamic=False, fullgraph=True)


def _warm_up(decoder, rows: int) -> None:
    """One call of each compiled part at `rows` rows, per device holding layers. The guarded
    wrappers are bypassed so a failure raises here, at load. With LoRA stacks, the variant
    with adapter rows too (every row on slot 0; the stacks' shapes are fixed at load)."""
    first_per_device = {w.device: w for w in reversed(decoder.weights.layers)}
    lora_index = {w.device: i for i, w in reversed(list(enumerate(decoder.weights.layers)))}
    for device, weights in first_per_device.items():
        lora = None
        if decoder.lora is not None:
            slots = torch.zeros(rows, dtype=torch.long, device=device)
            lora = decoder.lora.step(slots, rows, full=True)[lora_index[device]]
        dtype = weights.input_norm.dtype
        hidden = torch.zeros(rows, weights.input_norm.shape[0], dtype=dtype, device=device)
        rope = torch.zeros(rows, 1, decoder.head_dim, dtype=dtype, device=device)
        with torch.inference_mode():
            inputs = (hidden, weights.input_norm, weights.qkv, weights.qkv_bias, rope, rope)
            attended = torch.zeros(
                rows, decoder.heads * decoder.head_dim, dtype=dtype, device=device
            )
            outputs = (
                hidden,
                attended,
                weights.o,
                weights.post_norm,
                weights.gate_up,
                weights.down,
            )
            decoder.attention_inputs._compiled(*inputs)
            decoder.layer_output._compiled(*outputs)
            if lora is not None:
                decoder.attention_inputs._compiled(*inputs, lora[0])
                decoder.layer_output._compiled(*outputs, lora[1:])
