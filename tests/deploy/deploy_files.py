"""Readers for the deployment files (Dockerfiles, compose, .dockerignore) shared by the tests.

No Docker engine runs on the development or CI machines, so the images are linted and their
files checked for structure here, never built.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
MODEL_DOCKERFILE = DOCKER / "model.Dockerfile"
PROXY_DOCKERFILE = DOCKER / "proxy.Dockerfile"
COMPOSE = DOCKER / "compose.yaml"
COMPOSE_OFFLINE = DOCKER / "compose.offline.yaml"
DOCKERIGNORE = ROOT / ".dockerignore"
MODEL_CONFIG = ROOT / "model_repository" / "qwen2_5_vl" / "config.pbtxt"
K8S = DOCKER / "k8s"


# --- Dockerfiles -------------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int


def dockerfile_instructions(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped."""
    out: list[Instruction] = []
    buf, start = "", 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue  # a comment line inside a continued instruction
        if not buf:
            start = number
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        keyword, _, args = buf.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
        buf = ""
    return out


def arg_defaults(path: Path) -> dict[str, str]:
    defaults = {}
    for ins in dockerfile_instructions(path):
        if ins.keyword == "ARG" and "=" in ins.args:
            name, value = ins.args.split("=", 1)
            defaults[name.strip()] = value.strip()
    return defaults


def env_values(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for ins in dockerfile_instructions(path):
        if ins.keyword == "ENV":
            for token in shlex.split(ins.args):
                name, sep, value = token.partition("=")
                if sep:
                    values[name] = value
    return values


def exec_form(args: str) -> list[str]:
    """JSON (exec form) arguments of CMD / ENTRYPOINT / HEALTHCHECK CMD."""
    return json.loads(args)


def copies(path: Path) -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY, flags such as --chown dropped."""
    result = []
    for ins in dockerfile_instructions(path):
        if ins.keyword == "COPY":
            parts = [p for p in shlex.split(ins.args) if not p.startswith("--")]
            result.append((parts[:-1], parts[-1]))
    return result


def last(path: Path, keyword: str) -> Instruction:
    found = [ins for ins in dockerfile_instructions(path) if ins.keyword == keyword]
    assert found, f"{path.name} has no {keyword}"
    return found[-1]


# --- compose -----------------------------------------------------------------------------------

_VAR = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}")


class MissingVariable(LookupError):
    pass


def interpolate(value, env: dict[str, str]):
    """Compose-style `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?error}`, `$$`."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name"), match.group("op"), match.group("arg")
        current = env.get(name)
        unset_or_empty = current is None or (current == "" and op and op.startswith(":"))
        if op in (":-", "-"):
            return arg if unset_or_empty else current
        if op in (":?", "?"):
            if unset_or_empty:
                raise MissingVariable(f"{name}: {arg}")
            return current
        if op in (":+", "+"):
            return "" if unset_or_empty else arg
        return current or ""

    return _VAR.sub(substitute, value)


def load_compose(path: Path = COMPOSE) -> dict:
    return yaml.safe_load(path.read_text())


def compose_with_defaults(path: Path = COMPOSE, env: dict[str, str] | None = None) -> dict:
    """The compose file as `docker compose config` would see it with only `env` set."""
    return interpolate(load_compose(path), env or {})


def published_ports(service: dict) -> list[tuple[str, str]]:
    """(published, target) of each `ports` entry (short or long syntax)."""
    result = []
    for entry in service.get("ports", []) or []:
        if isinstance(entry, dict):
            result.append((str(entry.get("published", "")), str(entry["target"])))
            continue
        spec = str(entry).split("/", 1)[0]
        parts = spec.rsplit(":", 2)
        target = parts[-1]
        published = parts[-2] if len(parts) >= 2 else ""
        result.append((published, target))
    return result


def size_in_bytes(text) -> int:
    match = re.fullmatch(r"(\d+)\s*([kmg]?)b?", str(text).strip().lower())
    assert match, f"not a size: {text!r}"
    return int(match.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[match.group(2)]


def healthcheck_url(test) -> str:
    text = " ".join(test) if isinstance(test, list) else str(test)
    match = re.search(r"https?://[^\s'\"]+", text)
    assert match, f"healthcheck makes no HTTP request: {text}"
    return match.group(0)


# --- Kubernetes manifests (docker/k8s) ---------------------------------------------------------


def k8s_kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def k8s_objects() -> list[tuple[Path, dict]]:
    """(file, object) of every manifest the kustomization lists, in its order."""
    out = []
    for name in k8s_kustomization()["resources"]:
        path = K8S / name
        out.extend((path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc)
    return out


def k8s_object(kind: str, name: str) -> dict:
    found = [doc for _, doc in k8s_objects() if doc["kind"] == kind]
    found = [doc for doc in found if doc["metadata"]["name"] == name]
    assert len(found) == 1, f"{len(found)} {kind} named {name} in docker/k8s"
    return found[0]


def pod_containers(workload: dict) -> list[dict]:
    spec = workload["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def container_env(container: dict) -> dict[str, str | None]:
    """name -> value (None for one taken from a Secret or elsewhere)."""
    return {item["name"]: item.get("value") for item in container.get("env", [])}


def flag_value(args: list[str], flag: str) -> str | None:
    """`--flag=value` or `--flag value` in an argument list."""
    for i, arg in enumerate(args):
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
    return None


# --- .dockerignore -----------------------------------------------------------------------------


def dockerignore_patterns() -> list[str]:
    lines = (line.strip() for line in DOCKERIGNORE.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _pattern_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern (Go filepath.Match plus `**`), anchored at the context root."""
    segments = pattern.strip("/").split("/")
    out = []
    for i, segment in enumerate(segments):
        is_last = i == len(segments) - 1
        if segment == "**":
            out.append(".*" if is_last else "(?:[^/]+/)*")
            continue
        body = "".join(
            "[^/]*" if ch == "*" else "[^/]" if ch == "?" else re.escape(ch) for ch in segment
        )
        out.append(body if is_last else body + "/")
    return re.compile("^" + "".join(out) + "$")


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves `path` out of the build context: the last matching pattern wins,
    and a pattern that matches a parent directory matches everything under it."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _pattern_regex(pattern[1:] if negate else pattern)
        if any(regex.match(prefix) for prefix in prefixes):
            result = not negate
    return result


# --- helper scripts under docker/ --------------------------------------------------------------


def load_script(name: str) -> ModuleType:
    """Import docker/<name>.py (docker/ is not a package; the name `docker` is taken)."""
    spec = importlib.util.spec_from_file_location(f"deploy_{name}", DOCKER / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def model_config_parameters(path: Path = MODEL_CONFIG) -> dict[str, str]:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    return {key: value.string_value for key, value in config.parameters.items()}
