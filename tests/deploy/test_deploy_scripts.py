"""docker/triton_launch.py (instance_group from the environment) and docker/fetch_weights.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from deploy_files import MODEL_CONFIG, ROOT, load_script, model_config_parameters
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

launch = load_script("triton_launch")
fetch = load_script("fetch_weights")
probe = load_script("model_probe")

KIND = model_config_pb2.ModelInstanceGroup.Kind


def _parse(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


@pytest.fixture
def repository(tmp_path) -> Path:
    source = tmp_path / "models"
    shutil.copytree(
        ROOT / "model_repository", source, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    return source


# --- triton_launch -----------------------------------------------------------------------------


def test_without_instance_variables_the_command_runs_unchanged(repository, tmp_path):
    argv = ["tritonserver", f"--model-repository={repository}", "--exit-timeout-secs=30"]
    env = {"TRITON_RUNTIME_REPOSITORY": str(tmp_path / "rendered")}
    assert launch.plan(argv, env) == (argv, [])
    assert launch.plan(argv, {**env, "TRITON_INSTANCE_COUNT": "", "TRITON_INSTANCE_KIND": " "}) == (
        argv,
        [],
    )
    assert not (tmp_path / "rendered").exists()


@pytest.mark.parametrize("flag_form", ["equals", "separate"])
def test_instance_variables_render_a_copy_with_that_instance_group(repository, tmp_path, flag_form):
    rendered = tmp_path / "rendered"
    argv = (
        ["tritonserver", f"--model-repository={repository}", "--exit-timeout-secs=30"]
        if flag_form == "equals"
        else ["tritonserver", "--model-repository", str(repository), "--exit-timeout-secs=30"]
    )
    env = {
        "TRITON_INSTANCE_COUNT": "2",
        "TRITON_INSTANCE_KIND": "gpu",
        "TRITON_RUNTIME_REPOSITORY": str(rendered),
    }
    command, lines = launch.plan(argv, env)
    expected = (
        ["tritonserver", f"--model-repository={rendered}", "--exit-timeout-secs=30"]
        if flag_form == "equals"
        else ["tritonserver", "--model-repository", str(rendered), "--exit-timeout-secs=30"]
    )
    assert command == expected
    assert any("count: 2" in line and "KIND_GPU" in line for line in lines), lines

    config = _parse((rendered / "qwen2_5_vl" / "config.pbtxt").read_text())
    assert [(g.count, g.kind) for g in config.instance_group] == [(2, KIND.KIND_GPU)]
    # Everything else is the original config: parameters, inputs, decoupled policy.
    original = _parse(MODEL_CONFIG.read_text())
    config.ClearField("instance_group")
    original.ClearField("instance_group")
    assert config == original
    assert {k: v.string_value for k, v in config.parameters.items()} == model_config_parameters()
    # The model code came along; the source repository was not touched.
    assert (rendered / "qwen2_5_vl" / "1" / "model.py").is_file()
    assert (repository / "qwen2_5_vl" / "config.pbtxt").read_text() == MODEL_CONFIG.read_text()


def test_a_second_start_renders_afresh(repository, tmp_path):
    env = {"TRITON_INSTANCE_COUNT": "3", "TRITON_RUNTIME_REPOSITORY": str(tmp_path / "r")}
    argv = ["tritonserver", f"--model-repository={repository}"]
    launch.plan(argv, env)
    (tmp_path / "r" / "stale").write_text("x")
    launch.plan(argv, {**env, "TRITON_INSTANCE_COUNT": "1"})
    assert not (tmp_path / "r" / "stale").exists()
    config = _parse((tmp_path / "r" / "qwen2_5_vl" / "config.pbtxt").read_text())
    original_kind = _parse(MODEL_CONFIG.read_text()).instance_group[0].kind
    assert [(g.count, g.kind) for g in config.instance_group] == [(1, original_kind)]


@pytest.mark.parametrize(
    "count, kind, old, expected",
    [
        (4, None, "instance_group [ { count: 1, kind: KIND_AUTO } ]", (4, KIND.KIND_AUTO, [])),
        (
            None,
            "KIND_CPU",
            "instance_group [ { count: 2 kind: KIND_GPU } ]",
            (2, KIND.KIND_CPU, []),
        ),
        (
            2,
            None,
            "instance_group [\n  {\n    count: 1\n    kind: KIND_GPU\n    gpus: [ 0, 1 ]\n  }\n]",
            (2, KIND.KIND_GPU, [0, 1]),
        ),
        (3, "KIND_GPU", "", (3, KIND.KIND_GPU, [])),  # no instance_group: one is added
        (
            1,
            None,
            "# instance_group [ { count: 9 } ] in a comment\ninstance_group: [ { count: 5 } ]",
            (1, KIND.KIND_AUTO, []),
        ),
    ],
)
def test_rewrite_instance_group(count, kind, old, expected):
    base = (
        'backend: "python"\n'
        + old
        + '\nparameters [ { key: "model" value: { string_value: "m]" } } ]\n'
    )
    config = _parse(launch.rewrite_instance_group(base, count, kind))
    assert [(g.count, g.kind, list(g.gpus)) for g in config.instance_group] == [expected]
    assert config.parameters["model"].string_value == "m]"


@pytest.mark.parametrize(
    "env, message",
    [
        ({"TRITON_INSTANCE_COUNT": "0"}, "positive integer"),
        ({"TRITON_INSTANCE_COUNT": "two"}, "positive integer"),
        ({"TRITON_INSTANCE_KIND": "KIND_TPU"}, "must be one of"),
    ],
)
def test_bad_instance_settings_are_refused(env, message):
    with pytest.raises(launch.LaunchError, match=message):
        launch.instance_override(env)


def test_main_execs_tritonserver_and_reports_bad_settings(
    repository, tmp_path, monkeypatch, capsys
):
    calls = []
    monkeypatch.setattr(launch.os, "execvp", lambda file, args: calls.append((file, args)))
    watches = []
    monkeypatch.setattr(launch, "start_model_watch", lambda *target: watches.append(target))
    monkeypatch.delenv("TRITON_INSTANCE_COUNT", raising=False)
    monkeypatch.delenv("TRITON_INSTANCE_KIND", raising=False)
    monkeypatch.delenv("TRITON_WATCH_MODEL", raising=False)
    launch.main(["tritonserver", f"--model-repository={repository}"])
    assert calls == [("tritonserver", ["tritonserver", f"--model-repository={repository}"])]
    assert watches == [("http://127.0.0.1:8000", "qwen2_5_vl")]  # forked before the exec

    monkeypatch.setenv("TRITON_INSTANCE_COUNT", "-1")
    with pytest.raises(SystemExit) as exit_info:
        launch.main(["tritonserver", f"--model-repository={repository}"])
    assert exit_info.value.code == 2 and "TRITON_INSTANCE_COUNT" in capsys.readouterr().err
    assert len(calls) == 1


@pytest.mark.parametrize(
    "flags, env, target",
    [
        ([], {}, ("http://127.0.0.1:8000", "qwen2_5_vl")),
        (
            ["--http-port=8100", "--http-address=0.0.0.0"],
            {},
            ("http://127.0.0.1:8100", "qwen2_5_vl"),
        ),
        (
            ["--http-port", "8200", "--http-address", "10.0.0.5"],
            {},
            ("http://10.0.0.5:8200", "qwen2_5_vl"),
        ),
        (["--http-address=::1"], {"TRITON_WATCH_MODEL": " other "}, ("http://[::1]:8000", "other")),
        ([], {"TRITON_WATCH_MODEL": "off"}, None),
        ([], {"TRITON_WATCH_MODEL": ""}, None),
        (["--allow-http=false"], {}, None),
    ],
)
def test_the_model_watch_asks_tritons_http_endpoint(flags, env, target):
    argv = ["tritonserver", "--model-repository=/models", *flags]
    assert launch.watch_target(argv, env) == target


# --- model_probe's watch ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "deaths, believed",
    [
        ([True, True], True),  # one instance, dead
        ([True, False, True], True),  # one dead instance of two answers every other question
        ([True, False, False, False, True, False, False, False], False),  # isolated errors
        ([False] * 8, False),
    ],
)
def test_the_watch_believes_a_death_seen_twice_within_four_checks(monkeypatch, deaths, believed):
    answers = iter(deaths)
    monkeypatch.setattr(probe, "died", lambda url, model: next(answers))
    checks = iter(range(len(deaths)))
    stop = lambda seconds: next(checks, None) is None  # noqa: E731 (no waiting)
    assert probe.watch("http://triton:8000", "m", stop) is believed


# --- fetch_weights -----------------------------------------------------------------------------


def test_the_checkpoint_is_qwen_vl_model_else_config_pbtxt(tmp_path):
    repo = tmp_path / "models"
    shutil.copytree(ROOT / "model_repository", repo, ignore=shutil.ignore_patterns("__pycache__"))
    assert fetch.configured_model({"QWEN_VL_MODEL": "org/model"}, str(repo)) == "org/model"
    assert fetch.configured_model({}, str(repo)) == model_config_parameters()["model"]


def test_a_local_checkpoint_directory_is_not_downloaded(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    download = pytest.fail  # must not be called
    assert fetch.ensure_checkpoint(str(tmp_path), offline=False, download=download) == str(tmp_path)
    with pytest.raises(FileNotFoundError, match="mount the weights"):
        fetch.ensure_checkpoint(str(tmp_path / "missing"), offline=False, download=download)


@pytest.mark.parametrize("offline", [False, True])
def test_a_hub_id_is_downloaded_or_only_checked_offline(offline):
    calls = []

    def download(**kwargs):
        calls.append(kwargs)
        return "/cache/huggingface/hub/models--org--model/snapshots/abc"

    assert fetch.ensure_checkpoint("org/model", offline, download).endswith("/abc")
    assert calls == [{"repo_id": "org/model", "local_files_only": offline}]


def test_main_fails_with_one_readable_line(monkeypatch, capsys):
    import huggingface_hub

    def unavailable(**kwargs):
        raise OSError("no route to host")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unavailable)
    monkeypatch.setenv("QWEN_VL_MODEL", "org/model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert fetch.main() == 1
    err = capsys.readouterr().err
    assert "org/model is not available: OSError: no route to host" in err


def test_main_succeeds_for_a_mounted_checkpoint(monkeypatch, tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setenv("QWEN_VL_MODEL", str(tmp_path))
    assert fetch.main() == 0
    assert f"ready: {tmp_path}" in capsys.readouterr().err
