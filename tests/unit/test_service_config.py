"""ServerConfig: flag > env > file > default, validation lines, masked keys, CLI exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from loraplex.server.config import ApiKey, ConfigError, load_server_config, parse_size


def test_defaults_match_the_design():
    config = load_server_config({}, {})
    assert (config.host, config.port, config.metrics_port, config.model) == ("127.0.0.1", 50051, 9090, "default")
    assert not config.auth_enabled and not config.tls_enabled


def test_store_default_follows_loraplex_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAPLEX_CACHE", str(tmp_path))
    assert load_server_config({}, {}).store_path() == tmp_path / "store"


def test_precedence_flag_env_file_default(tmp_path):
    config_file = tmp_path / "serve.yaml"
    config_file.write_text("max-loras: 3\nport: 6000\nmetrics_port: 7000\n")
    environ = {"LORAPLEX_PORT": "6001", "LORAPLEX_CONFIG": str(config_file)}
    config = load_server_config({"port": None, "max_loras": "5"}, environ)
    assert config.max_loras == 5          # flag beats file
    assert config.port == 6001            # env beats file
    assert config.metrics_port == 7000    # file beats default
    assert config.max_lora_rank == 64     # default


def test_json_config_file_and_unknown_key(tmp_path):
    path = tmp_path / "serve.json"
    path.write_text(json.dumps({"max_new_tokens": 10, "no_such_setting": 1}))
    with pytest.raises(ConfigError) as error:
        load_server_config({"config": str(path)}, {})
    assert error.value.problems == ["config file: unknown setting 'no_such_setting'"]


def test_keys_from_flags_and_env_with_tenants():
    environ = {"LORAPLEX_API_KEYS": "acme:key-acme-1234,plainkey123", "LORAPLEX_ADMIN_KEYS": "admin-key-999"}
    config = load_server_config({}, environ)
    assert config.api_keys == (ApiKey("key-acme-1234", "acme"), ApiKey("plainkey123", None))
    assert config.admin_keys == (ApiKey("admin-key-999", None),)
    flagged = load_server_config({"api_keys": ["beta:flag-key-123"]}, environ)
    assert flagged.api_keys == (ApiKey("flag-key-123", "beta"),)


def test_repr_never_shows_keys():
    config = load_server_config({"api_keys": ["t1:supersecret-1"], "admin_keys": ["supersecret-2"]}, {})
    text = repr(config) + repr(config.api_keys) + repr(config.admin_keys)
    assert "supersecret" not in text
    assert "***" in repr(config.api_keys[0])


def test_every_problem_reported_once_per_line(tmp_path):
    values = {"port": "70000", "quantize": "int3", "max_input_tokens": "5000", "tls_key": str(tmp_path),
              "max_message_bytes": "1KiB", "admin_keys": ["short"]}
    with pytest.raises(ConfigError) as error:
        load_server_config(values, {"LORAPLEX_MAX_LORAS": "many"})
    assert error.value.problems == ["LORAPLEX_MAX_LORAS: invalid literal for int() with base 10: 'many'"]
    with pytest.raises(ConfigError) as error:
        load_server_config(values, {})
    text = "\n".join(error.value.problems)
    for expected in ("--port must be in [0, 65535]", "--quantize must be one of", "--max-input-tokens must be smaller",
                     "TLS needs both", "--max-message-bytes must be >= 2MiB", "--admin-key: keys must be at least 8",
                     "--tls-key"):
        assert expected in text
    assert len(error.value.problems) == 7


def test_model_dir_must_exist(tmp_path):
    with pytest.raises(ConfigError, match="not a Hugging Face directory"):
        load_server_config({"model": str(tmp_path)}, {})


def test_parse_size_units():
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("1048576") == 2**20
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")


def test_cli_exits_2_with_one_line_per_problem():
    result = subprocess.run([sys.executable, "-m", "loraplex.cli", "serve", "--port", "-1", "--dtype", "fp8"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == ["loraplex serve: error: --dtype must be one of auto, float32, bfloat16, float16 (got 'fp8')",
                     "loraplex serve: error: --port must be in [0, 65535]"]


def test_linear_kernel_setting_reaches_the_engine_config(tmp_path):
    config = load_server_config({}, {"LORAPLEX_LINEAR_KERNEL": "aten"})
    assert config.engine_config(tmp_path).quant.linear_kernel == "aten"
    assert load_server_config({}, {}).engine_config(tmp_path).quant.linear_kernel == "auto"
    with pytest.raises(ConfigError) as error:
        load_server_config({"linear_kernel": "mkl"}, {})
    assert error.value.problems == ["--linear-kernel must be one of auto, onednn, aten, native, library (got 'mkl')"]


def test_engine_settings_keep_their_defaults_in_the_engine_config(tmp_path):
    from loraplex.server.engine.config import EngineConfig

    assert load_server_config({}, {}).engine_config(tmp_path) == EngineConfig(model_dir=tmp_path)
    config = load_server_config({"max_total_tokens": "512", "max_input_tokens": "256"}, {})
    assert config.engine_config(tmp_path).scheduler.max_model_len == 512
    with pytest.raises(ConfigError) as error:
        load_server_config({"max_num_seqs": "0"}, {})
    assert error.value.problems == ["--max-num-seqs must be >= 1 (got 0)"]
    with pytest.raises(ConfigError) as error:
        load_server_config({"max_total_tokens": "100"}, {})
    assert error.value.problems == ["--max-input-tokens must be smaller than --max-total-tokens"]


def test_no_prefix_caching_from_flag_env_and_file(tmp_path):
    import argparse

    from loraplex.server.config import add_arguments

    assert load_server_config({}, {}).engine_config(tmp_path).cache.prefix_caching is True
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cli = vars(parser.parse_args(["--no-prefix-caching"]))
    assert load_server_config(cli, {}).engine_config(tmp_path).cache.prefix_caching is False
    assert vars(parser.parse_args([]))["no_prefix_caching"] is None          # unset: env/file/default apply
    assert load_server_config({}, {"LORAPLEX_NO_PREFIX_CACHING": "1"}).engine_config(tmp_path).cache.prefix_caching \
        is False
    assert load_server_config({}, {"LORAPLEX_NO_PREFIX_CACHING": "false"}).no_prefix_caching is False
    (tmp_path / "c.yaml").write_text("no-prefix-caching: true\n")
    assert load_server_config({"config": str(tmp_path / "c.yaml")}, {}).no_prefix_caching is True
    with pytest.raises(ConfigError, match="LORAPLEX_NO_PREFIX_CACHING: 'maybe' is not a boolean"):
        load_server_config({}, {"LORAPLEX_NO_PREFIX_CACHING": "maybe"})
