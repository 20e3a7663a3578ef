import pytest

from qwen_vl_backend.settings import ModelSettings, config_parameters


def test_config_parameters_then_environment_override():
    config = {
        "parameters": {
            "model": {"string_value": "/models/a"},
            "max_pixels": {"string_value": "1000"},
        }
    }
    settings = ModelSettings.from_parameters(
        config_parameters(config), env={"QWEN_VL_MAX_PIXELS": "2000"}
    )
    assert settings.model == "/models/a"
    assert settings.max_pixels == 2000
    assert settings.default_max_tokens == ModelSettings().default_max_tokens


def test_device_and_dtype_follow_the_instance_kind():
    settings = ModelSettings()
    assert settings.resolve_device("GPU", 3) == "cuda:3"
    assert settings.resolve_device("CPU", 0) == "cpu"
    assert settings.resolve_dtype("cuda:3") == "bfloat16"
    assert settings.resolve_dtype("cpu") == "float32"
    pinned = ModelSettings(device="cuda:1", dtype="float16")
    assert (
        pinned.resolve_device("GPU", 0) == "cuda:1" and pinned.resolve_dtype("cuda:1") == "float16"
    )


def test_bad_number_names_the_parameter():
    try:
        ModelSettings.from_parameters({"max_pixels": "many"}, env={})
    except ValueError as err:
        assert "max_pixels" in str(err)
    else:
        raise AssertionError("expected ValueError")


def test_empty_environment_variable_falls_back_to_the_config_value():
    settings = ModelSettings.from_parameters({"max_pixels": "1000"}, env={"QWEN_VL_MAX_PIXELS": ""})
    assert settings.max_pixels == 1000


def test_forward_and_compile_modes_are_checked_and_name_the_parameter():
    assert ModelSettings().forward == "lean"
    assert ModelSettings.from_parameters({"forward": "hf"}, env={}).forward == "hf"
    for name, bad in [("forward", "fast"), ("compile", "maybe")]:
        try:
            ModelSettings.from_parameters({name: bad}, env={})
        except ValueError as err:
            assert f"parameter {name}={bad!r}" in str(err)
        else:
            raise AssertionError(f"{name}={bad} accepted")


def test_compile_is_off_by_default_until_it_has_run_on_a_gpu_and_forced_either_way():
    auto = ModelSettings()
    assert not auto.resolve_compile("cuda:0") and not auto.resolve_compile("cpu")
    assert ModelSettings(compile="on").resolve_compile("cpu")
    assert not ModelSettings(compile="off").resolve_compile("cuda:1")


def test_compile_buckets_parse_sorted_and_refuse_non_positive_counts():
    assert ModelSettings().compile_bucket_sizes() == []
    settings = ModelSettings.from_parameters({"compile_buckets": "8, 1,64,8"}, env={})
    assert settings.compile_bucket_sizes() == [1, 8, 64]
    for bad in ["0,8", "eight", "-4"]:
        try:
            ModelSettings(compile_buckets=bad)
        except ValueError as err:
            assert "compile_buckets" in str(err)
        else:
            raise AssertionError(f"compile_buckets={bad} accepted")


def test_torch_threads_derived_from_cores_leave_one_from_four_up():
    derived = ModelSettings()
    assert [derived.resolve_torch_threads(c) for c in (1, 2, 3, 4, 16)] == [1, 2, 3, 3, 15]
    assert ModelSettings(torch_threads=5).resolve_torch_threads(2) == 5
    with pytest.raises(ValueError, match="torch_threads"):
        ModelSettings(torch_threads=-1)
