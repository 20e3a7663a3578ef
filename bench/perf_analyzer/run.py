#!/usr/bin/env python3
"""Benchmark the qwen2_5_vl Triton model with perf_analyzer (gRPC streaming), and optionally
the OpenAI proxy with NVIDIA AIPerf, and print one table per tool.

    .venv/bin/python bench/perf_analyzer/run.py                        # Triton at localhost:8001
    .venv/bin/python bench/perf_analyzer/run.py --start-stack --concurrency 1:4 --request-count 24
    .venv/bin/python bench/perf_analyzer/run.py --start-stack --aiperf   # also AIPerf via the proxy

perf_analyzer runs once per input file and concurrency level (`--request-count` cannot be
combined with a concurrency range in one perf_analyzer run). For a decoupled model its latency
figure is request sent -> *final* response (its "using the first response" banner
notwithstanding); the time to the first response (TTFT) and output tokens come from its
`--profile-export-file`, which this script reads. All raw outputs (CSV, profile exports, logs)
stay in --output-dir.

Run it with the project's venv (.venv/bin/python): --start-stack starts tritonserver and the
proxy with this interpreter, and LD_LIBRARY_PATH for perf_analyzer comes from its
`nvidia-cuda-runtime-cu12` package. AIPerf (`aiperf==0.13.0`) is installed on first use into
its own venv (.cache/aiperf-venv), never into .venv: its pins clash with the model's.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import stack as stack_launcher  # noqa: E402

SHIPPED_INPUTS = ("text.json", "image.json", "image_b64.json")
AIPERF_VERSION = "0.13.0"
DEFAULT_AIPERF_VENV = ROOT / ".cache" / "aiperf-venv"
DEFAULT_SERVED_NAME = "qwen2.5-vl-7b-instruct"
# Values in a perf_analyzer profile export for an output a response did not carry are
# uninitialised memory (seen: 1073741968); a chunk never holds this many tokens.
_MAX_PLAUSIBLE_TOKENS = 1 << 20


# ---------------------------------------------------------------- perf_analyzer


def find_perf_analyzer(explicit: str | None) -> str:
    if explicit:
        return explicit
    found = (
        shutil.which("perf_analyzer", path=str(Path(sys.executable).parent))
        or shutil.which("perf_analyzer", path=str(ROOT / ".venv" / "bin"))
        or shutil.which("perf_analyzer")
    )
    if not found:
        raise SystemExit(
            "perf_analyzer not found: it ships in the tritonclient wheel (.venv/bin), "
            "or in the nvcr.io/nvidia/tritonserver:<tag>-py3-sdk image; or pass --perf-analyzer"
        )
    return found


def perf_analyzer_env() -> dict:
    """The environment with the pip-installed libcudart.so.12 on LD_LIBRARY_PATH (perf_analyzer
    links it even on a CPU); unchanged where that package is absent (the SDK image has CUDA)."""
    env = dict(os.environ)
    try:
        import nvidia.cuda_runtime
    except ImportError:
        return env
    for base in nvidia.cuda_runtime.__path__:
        lib = Path(base) / "lib"
        if (lib / "libcudart.so.12").exists():
            env["LD_LIBRARY_PATH"] = os.pathsep.join(
                p for p in (str(lib), env.get("LD_LIBRARY_PATH", "")) if p
            )
            break
    return env


def parse_concurrency(text: str) -> list[int]:
    """ "2", "1:4" (1,2,3,4), "1:8:2" (1,3,5,7) or "1,2,4"."""
    try:
        if "," in text:
            levels = [int(x) for x in text.split(",") if x.strip()]
        else:
            parts = [int(x) for x in text.split(":")]
            start, end, step = (
                parts[0],
                parts[1] if len(parts) > 1 else parts[0],
                parts[2] if len(parts) > 2 else 1,
            )
            levels = list(range(start, end + 1, step)) if len(parts) <= 3 and step >= 1 else []
    except ValueError:
        levels = []
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(
            f"bad concurrency {text!r}: use N, START:END[:STEP] or N,M,..."
        )
    return levels


def resolve_inputs(names: list[str] | None) -> list[Path]:
    paths = []
    for name in names or SHIPPED_INPUTS:
        path = Path(name)
        if not path.exists() and (HERE / name).exists():
            path = HERE / name
        if not path.is_file():
            raise SystemExit(f"input file not found: {name}")
        paths.append(path.resolve())
    return paths


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (as perf_analyzer reports them)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def parse_stdout(text: str) -> dict:
    out = {}
    for key, pattern in (
        ("infer_per_sec", r"Throughput: ([\d.]+) infer/sec"),
        ("avg_us", r"Avg latency: (\d+) usec"),
        ("p50_us", r"p50 latency: (\d+) usec"),
        ("p99_us", r"p99 latency: (\d+) usec"),
        ("request_count", r"Request count: (\d+)"),
    ):
        match = re.search(pattern, text)
        if match:
            out[key] = float(match.group(1))
    return out


_LATENCY_PARTS = (
    "Client Send",
    "Network+Server Send/Recv",
    "Server Queue",
    "Server Compute Input",
    "Server Compute Infer",
    "Server Compute Output",
    "Client Recv",
)


def parse_csv(path: Path) -> dict:
    """perf_analyzer's -f report (one row per concurrency level; we run one level per file)."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return {}
    row = rows[-1]
    out = {
        "infer_per_sec": float(row["Inferences/Second"]),
        "p50_us": float(row["p50 latency"]),
        "p99_us": float(row["p99 latency"]),
        # Without --percentile the components add up to the average latency.
        "avg_us": sum(float(row[k]) for k in _LATENCY_PARTS if k in row),
    }
    if "Response Throughput" in row:
        out["responses_per_sec"] = float(row["Response Throughput"])
    return out


def parse_export(path: Path) -> dict:
    """TTFT, end-to-end latency and output tokens per request from --profile-export-file.

    The export copies BYTES inputs verbatim, so with raw image bytes it is not valid UTF-8:
    decode with replacement (perf_analyzer escapes quotes and control characters)."""
    doc = json.loads(path.read_bytes().decode("utf-8", "replace"), strict=False)
    experiment = doc["experiments"][-1]
    bounds = experiment.get("window_boundaries") or []
    requests = experiment["requests"]
    if len(bounds) >= 2:  # only requests inside the measurement windows
        requests = [r for r in requests if bounds[0] <= r["timestamp"] <= bounds[-1]]
    ttft, e2e, tokens = [], [], []
    for req in requests:
        stamps = req.get("response_timestamps") or []
        if not stamps:
            continue
        ttft.append((stamps[0] - req["timestamp"]) / 1e6)
        e2e.append((stamps[-1] - req["timestamp"]) / 1e6)
        counts = [o.get("num_output_tokens") for o in req.get("response_outputs") or []]
        if counts and all(isinstance(c, int) and 0 <= c < _MAX_PLAUSIBLE_TOKENS for c in counts):
            tokens.append(sum(counts))
    # perf_analyzer's infer/s divides by its measurement window, which with --request-count
    # ends on a ~1 s polling tick after the last response: short runs under-report. Rates here
    # use the span from the first request sent to the last response received.
    answered = [r for r in requests if r.get("response_timestamps")]
    span_s = (
        (
            (
                max(r["response_timestamps"][-1] for r in answered)
                - min(r["timestamp"] for r in answered)
            )
            / 1e9
        )
        if answered
        else None
    )
    out = {
        "requests": len(e2e),
        "span_s": span_s,
        "req_per_sec": len(e2e) / span_s if span_s else None,
        "ttft_avg_ms": sum(ttft) / len(ttft) if ttft else None,
        "ttft_p50_ms": percentile(ttft, 50),
        "ttft_p99_ms": percentile(ttft, 99),
        "e2e_p99_ms": percentile(e2e, 99),
    }
    if tokens and len(tokens) == len(e2e):
        out["output_tokens"] = sum(tokens)
        if span_s:
            out["output_tok_per_sec"] = sum(tokens) / span_s
    return out


def warm_up(args, binary: str, url: str, inputs: Path, out_dir: Path) -> None:
    """A few unmeasured requests first: a fresh server's first image request is much slower."""
    cmd = [
        binary,
        "-m",
        args.model,
        "-i",
        "grpc",
        "--streaming",
        "-u",
        url,
        "--input-data",
        str(inputs),
        "--concurrency-range",
        "1",
        "--request-count",
        str(args.warmup),
    ]
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            errors="replace",
            env=perf_analyzer_env(),
            timeout=args.timeout,
        )
        log = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired:
        log = f"warm-up timed out after {args.timeout}s"
    (out_dir / f"{inputs.stem}-warmup.log").write_text(log)  # the measured run reports failures


def run_perf_analyzer(
    args, binary: str, url: str, inputs: Path, concurrency: int, out_dir: Path
) -> dict:
    stem = f"{inputs.stem}-c{concurrency}"
    csv_path, export_path = out_dir / f"{stem}.csv", out_dir / f"{stem}-export.json"
    cmd = [
        binary,
        "-m",
        args.model,
        "-i",
        "grpc",
        "--streaming",
        "-u",
        url,
        "--input-data",
        str(inputs),
        "--concurrency-range",
        str(concurrency),
        "-f",
        str(csv_path),
        "--profile-export-file",
        str(export_path),
    ]
    if args.request_count:
        cmd += ["--request-count", str(args.request_count)]
    cmd += args.pa_arg
    print(f"[perf_analyzer] {' '.join(cmd)}", file=sys.stderr)
    started = time.monotonic()
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            errors="replace",
            env=perf_analyzer_env(),
            timeout=args.timeout,
        )
        rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as err:
        partial = err.stdout or b""
        rc, stdout, stderr = (
            -1,
            (partial.decode(errors="replace") if isinstance(partial, bytes) else partial),
            f"timed out after {args.timeout}s",
        )
    (out_dir / f"{stem}.log").write_text(stdout + stderr)
    result = {
        "file": inputs.name,
        "concurrency": concurrency,
        "rc": rc,
        "wall_s": round(time.monotonic() - started, 1),
    }
    if rc != 0:
        tail = "\n".join((stdout + stderr).strip().splitlines()[-6:])
        print(f"[perf_analyzer] FAILED (exit {rc}):\n{tail}", file=sys.stderr)
        result["error"] = tail
        return result
    result.update(parse_stdout(stdout))
    if csv_path.exists():  # fills what stdout lacks (no "Avg latency" line with --percentile)
        for key, value in parse_csv(csv_path).items():
            result.setdefault(key, value)
    if export_path.exists():
        result.update(parse_export(export_path))
    return result


def _fmt(value, digits=1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_perf_table(results: list[dict]) -> None:
    header = [
        "input",
        "conc",
        "reqs",
        "infer/s",
        "req/s",
        "out tok/s",
        "lat avg",
        "lat p50",
        "lat p99",
        "TTFT avg",
        "TTFT p50",
        "TTFT p99",
    ]
    rows = []
    for r in results:
        if r["rc"] != 0:
            rows.append([r["file"], str(r["concurrency"]), "FAILED", f"exit {r['rc']}"] + [""] * 8)
            continue

        def ms(key: str, r: dict = r) -> str:
            return _fmt(r[key] / 1000) if r.get(key) is not None else "-"

        rows.append(
            [
                r["file"],
                str(r["concurrency"]),
                str(int(r.get("request_count", r.get("requests", 0)))),
                _fmt(r.get("infer_per_sec"), 2),
                _fmt(r.get("req_per_sec"), 2),
                _fmt(r.get("output_tok_per_sec")),
                ms("avg_us"),
                ms("p50_us"),
                ms("p99_us"),
                _fmt(r.get("ttft_avg_ms")),
                _fmt(r.get("ttft_p50_ms")),
                _fmt(r.get("ttft_p99_ms")),
            ]
        )
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def line(cells) -> str:
        return "  ".join(
            str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    print(
        "perf_analyzer, gRPC streaming. infer/s: perf_analyzer's (its window ends on a 1 s tick); "
        "req/s, out tok/s: first request sent -> last response.\n"
        "Latencies in ms: lat = request sent -> final response (perf_analyzer's figure), "
        "TTFT = -> first response (from its profile export)."
    )
    print(line(header))
    print(line(["-" * w for w in widths]))
    for row in rows:
        print(line(row))


# ---------------------------------------------------------------- AIPerf


def default_aiperf_python() -> str:
    for candidate in (
        "/usr/bin/python3.11",
        shutil.which("python3.12"),
        shutil.which("python3.11"),
        shutil.which("python3.13"),
    ):
        if candidate and Path(candidate).exists():
            return candidate
    raise SystemExit("AIPerf needs Python 3.11-3.13; pass --aiperf-python")


def ensure_aiperf(venv_dir: Path, python: str | None) -> Path:
    """The aiperf executable of venv_dir, creating the venv and installing aiperf if needed."""
    exe = venv_dir / "bin" / "aiperf"
    if exe.exists():
        probe = subprocess.run([str(exe), "--version"], capture_output=True, text=True)
        if probe.returncode == 0 and probe.stdout.strip().endswith(AIPERF_VERSION):
            return exe
    python = python or default_aiperf_python()
    print(
        f"[aiperf] installing aiperf=={AIPERF_VERSION} into {venv_dir} with {python} "
        "(about 1.2 GB, a minute or two)",
        file=sys.stderr,
    )
    venv_dir.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([python, "-m", "venv", "--clear", str(venv_dir)], check=True)
    pip = [str(venv_dir / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["install", f"aiperf=={AIPERF_VERSION}"], check=True)
    return exe


def run_aiperf(args, proxy_url: str, tokenizer: str, out_dir: Path) -> dict:
    exe = ensure_aiperf(args.aiperf_venv, args.aiperf_python)
    if Path(tokenizer).is_dir():  # a relative directory reads as a (bad) hub id to AIPerf
        tokenizer = str(Path(tokenizer).resolve())
    artifacts = out_dir / "aiperf"
    width, _, height = args.aiperf_image_size.partition("x")
    cmd = [
        str(exe),
        "profile",
        "--url",
        proxy_url,
        "--endpoint-type",
        "chat",
        "--streaming",
        "--model",
        args.served_model_name,
        "--tokenizer",
        tokenizer,
        "--isl",
        str(args.aiperf_isl),
        "--osl",
        str(args.aiperf_osl),
        "--image-batch-size",
        str(args.aiperf_images),
        "--image-width-mean",
        width,
        "--image-height-mean",
        height or width,
        "--image-format",
        "jpeg",
        "--concurrency",
        str(args.aiperf_concurrency),
        "--request-count",
        str(args.aiperf_request_count),
        "--warmup-request-count",
        str(args.aiperf_warmup),
        # The server counts prompt tokens with the image tokens and its own tokenizer.
        "--use-server-token-count",
        "--random-seed",
        "0",
        "--output-artifact-dir",
        str(artifacts),
        "--ui",
        "none",
        "--no-gpu-telemetry",
    ]
    # The proxy has no /metrics; AIPerf's probe of Triton's :8002 did not pass here either.
    cmd += ["--no-server-metrics"] + args.aiperf_arg
    print(f"[aiperf] {' '.join(cmd)}", file=sys.stderr)
    log = out_dir / "aiperf.log"
    # Not HF_HUB_OFFLINE=1: with it AIPerf 0.13 takes a local tokenizer directory for a hub id.
    env = dict(os.environ, HF_HUB_DISABLE_TELEMETRY="1")
    with open(log, "w") as handle:
        rc = subprocess.run(
            cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, timeout=args.timeout
        ).returncode
    summary = artifacts / "profile_export_aiperf.json"
    result = {"rc": rc, "log": str(log), "artifacts": str(artifacts)}
    if rc != 0 or not summary.exists():
        tail = "\n".join(log.read_text(errors="replace").strip().splitlines()[-15:])
        print(f"[aiperf] FAILED (exit {rc}); log {log}:\n{tail}", file=sys.stderr)
        result["rc"] = rc or 1
        return result
    result["metrics"] = json.loads(summary.read_text())
    return result


def print_aiperf_summary(result: dict, args) -> None:
    m = result["metrics"]
    get = lambda key, stat="avg": (m.get(key) or {}).get(stat)  # noqa: E731
    images = (
        f"{args.aiperf_images} x {args.aiperf_image_size} JPEG + "
        if args.aiperf_images
        else "text only, "
    )
    print(
        f"AIPerf {m.get('aiperf_version', '')} via the proxy (OpenAI chat, streaming): "
        f"concurrency {args.aiperf_concurrency}, {images}~{args.aiperf_isl} text tokens, "
        f"max {args.aiperf_osl} output tokens"
    )
    rows = [
        ("time to first token (ms)", "time_to_first_token"),
        ("inter-token latency (ms)", "inter_token_latency"),
        ("request latency (ms)", "request_latency"),
        ("output tokens / request", "output_sequence_length"),
        ("prompt tokens / request (server)", "input_sequence_length"),
    ]
    print(f"{'metric':34}{'avg':>10}{'p50':>10}{'p99':>10}")
    for label, key in rows:
        if key in m:
            print(
                f"{label:34}" + "".join(f"{_fmt(get(key, s)):>10}" for s in ("avg", "p50", "p99"))
            )
    print(f"{'output tokens/s (all requests)':34}{_fmt(get('output_token_throughput')):>10}")
    print(f"{'requests/s':34}{_fmt(get('request_throughput'), 2):>10}")
    print(
        f"{'requests ok / errors':34}{_fmt(get('request_count'), 0):>10}"
        f"{_fmt(get('error_request_count') or 0, 0):>10}"
    )
    print(f"(AIPerf's full tables: {result['artifacts']}/profile_export_console.txt)")


def aiperf_failed(result: dict) -> bool:
    if result.get("rc"):
        return True
    m = result["metrics"]
    errors = (m.get("error_request_count") or {}).get("avg") or 0
    return bool(errors) or bool((m.get("request_error_rate") or {}).get("avg"))


# ---------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--url", default="localhost:8001", help="Triton gRPC address (default %(default)s)"
    )
    p.add_argument(
        "--model",
        default=stack_launcher.TRITON_MODEL,
        help="Triton model name (default %(default)s)",
    )
    p.add_argument(
        "--inputs",
        nargs="+",
        metavar="FILE",
        help=f"input-data files (names in bench/perf_analyzer/ or paths); "
        f"default: {' '.join(SHIPPED_INPUTS)}",
    )
    p.add_argument(
        "--concurrency",
        type=parse_concurrency,
        default=[1, 2],
        help="N, START:END[:STEP] or N,M,... (default 1:2)",
    )
    p.add_argument(
        "--request-count",
        type=int,
        default=24,
        help="requests per measurement (default %(default)s); 0: perf_analyzer's time windows until stable",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="unmeasured requests per input file before measuring (default %(default)s)",
    )
    p.add_argument("--perf-analyzer", help="the perf_analyzer binary (default: the venv's)")
    p.add_argument(
        "--pa-arg",
        action="append",
        default=[],
        help="extra perf_analyzer argument (repeat), e.g. --pa-arg=--percentile=95",
    )
    p.add_argument("--skip-perf-analyzer", action="store_true", help="only AIPerf")
    p.add_argument(
        "--timeout", type=float, default=900, help="seconds per tool run (default %(default)s)"
    )
    p.add_argument(
        "--output-dir", type=Path, help="raw outputs (default .cache/triton-bench/<timestamp>)"
    )
    stack = p.add_argument_group("--start-stack")
    stack.add_argument(
        "--start-stack",
        action="store_true",
        help="start tritonserver + proxy on loopback free ports, stop them at the end",
    )
    stack.add_argument(
        "--stack-model", help="checkpoint for --start-stack (default: the tiny local one)"
    )
    aip = p.add_argument_group("AIPerf (against the proxy's OpenAI endpoint)")
    aip.add_argument("--aiperf", action="store_true", help="also run AIPerf")
    aip.add_argument("--proxy-url", default="http://localhost:9000", help="(default %(default)s)")
    aip.add_argument(
        "--served-model-name", default=DEFAULT_SERVED_NAME, help="(default %(default)s)"
    )
    aip.add_argument(
        "--tokenizer",
        help="HF id or directory (default: the --start-stack checkpoint, "
        "else Qwen/Qwen2.5-VL-7B-Instruct)",
    )
    aip.add_argument("--aiperf-concurrency", type=int, default=2, help="(default %(default)s)")
    aip.add_argument("--aiperf-request-count", type=int, default=16, help="(default %(default)s)")
    aip.add_argument(
        "--aiperf-warmup",
        type=int,
        default=2,
        help="warm-up requests, not measured (default %(default)s)",
    )
    aip.add_argument(
        "--aiperf-images",
        type=int,
        default=1,
        help="images per request, 0: text only (default %(default)s)",
    )
    aip.add_argument(
        "--aiperf-image-size",
        default="448x336",
        help="WIDTHxHEIGHT of the synthetic images (default %(default)s)",
    )
    aip.add_argument(
        "--aiperf-isl",
        type=int,
        default=64,
        help="synthetic prompt text tokens (default %(default)s)",
    )
    aip.add_argument(
        "--aiperf-osl",
        type=int,
        default=32,
        help="max output tokens per request (default %(default)s)",
    )
    aip.add_argument(
        "--aiperf-arg", action="append", default=[], help="extra `aiperf profile` argument (repeat)"
    )
    aip.add_argument(
        "--aiperf-venv",
        type=Path,
        default=DEFAULT_AIPERF_VENV,
        help="AIPerf's own venv, created on first use (default .cache/aiperf-venv)",
    )
    aip.add_argument(
        "--aiperf-python",
        help="interpreter for the AIPerf venv (3.11-3.13; default /usr/bin/python3.11)",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out_dir = args.output_dir or ROOT / ".cache" / "triton-bench" / time.strftime("%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs = [] if args.skip_perf_analyzer else resolve_inputs(args.inputs)
    binary = find_perf_analyzer(args.perf_analyzer) if inputs else None
    url, proxy_url, tokenizer = args.url, args.proxy_url, args.tokenizer
    running = None
    failed = False
    try:
        if args.start_stack:
            model = args.stack_model or stack_launcher.tiny_checkpoint()
            free = stack_launcher.free_port
            config = stack_launcher.StackConfig(
                model=model,
                host="127.0.0.1",
                http_port=free(),
                grpc_port=free(),
                metrics_port=free(),
                proxy_port=free(),
                log_dir=out_dir / "logs",
            )
            running = stack_launcher.Stack(config)
            print(
                f"[stack] starting tritonserver (gRPC {config.triton_grpc_url}) and proxy "
                f"({config.proxy_url}) with {model}; logs in {config.log_dir}",
                file=sys.stderr,
            )
            running.start()
            running.wait_ready(timeout=600)
            url, proxy_url = config.triton_grpc_url, config.proxy_url
            tokenizer = tokenizer or model
        results = []
        for path in inputs:
            if args.warmup:
                warm_up(args, binary, url, path, out_dir)
            for level in args.concurrency:
                results.append(run_perf_analyzer(args, binary, url, path, level, out_dir))
        if results:
            print_perf_table(results)
            failed |= any(r["rc"] != 0 for r in results)
        aiperf = None
        if args.aiperf:
            if results:
                print()
            aiperf = run_aiperf(
                args, proxy_url, tokenizer or stack_launcher.DEFAULT_HUB_MODEL, out_dir
            )
            if "metrics" in aiperf:
                print_aiperf_summary(aiperf, args)
            failed |= aiperf_failed(aiperf)
        (out_dir / "results.json").write_text(
            json.dumps(
                {
                    "perf_analyzer": results,
                    "aiperf": {k: v for k, v in (aiperf or {}).items() if k != "metrics"} or None,
                },
                indent=1,
            )
            + "\n"
        )
        print(f"\nraw outputs: {out_dir}", file=sys.stderr)
    except (RuntimeError, TimeoutError) as err:
        print(f"[stack] {err}", file=sys.stderr)
        return 2
    finally:
        if running:
            running.stop()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
