"""``metarec serve`` options → ServerConfig, and the errors for bad values. No server starts."""

from pathlib import Path

import pytest

from metarec_server.app import ServerConfig
from metarec_server.batcher import BatcherConfig
from metarec_server.main import TOKEN_ENV, build_parser, config_from_args, serve_main
from metarec_server.validation import Limits

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def config_of(*argv):
    return config_from_args(build_parser().parse_args(["--model-dir", "models/recs", *argv]))


@pytest.fixture(autouse=True)
def no_token_in_env(monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)


def test_every_option_reaches_the_config(tmp_path):
    token = tmp_path / "token"
    token.write_text("  s3cret\n")
    config = config_of(
        "--model-name", "recs",
        "--extra-model", "other=models/other",
        "--extra-model", "third=/srv/models/third=odd",
        "--host", "0.0.0.0",
        "--port", "9100",
        "--reuse-port",
        "--log-db", str(tmp_path / "log.sqlite"),
        "--tls-cert", "cert.pem",
        "--tls-key", "key.pem",
        "--token-file", str(token),
        "--max-batch-size", "8",
        "--max-batch-delay-ms", "2.5",
        "--max-queue", "77",
        "--cache-size", "0",
        "--poll-interval", "0.5",
        "--grace", "3",
        "--max-message-mb", "1.5",
        "--max-concurrent-rpcs", "12",
        "--max-interactions", "40",
        "--max-candidates", "300",
        "--max-k", "20",
        "--max-log-rows", "500",
        "--max-id-length", "64",
        "--max-user-features", "9",
    )
    assert config.model_dir == Path("models/recs") and config.model_name == "recs"
    # Only the first "=" separates the name: a folder may contain one.
    assert config.extra_models == {"other": Path("models/other"), "third": Path("/srv/models/third=odd")}
    assert (config.host, config.port, config.reuse_port) == ("0.0.0.0", 9100, True)
    assert config.log_path == tmp_path / "log.sqlite"
    assert (config.tls_cert_file, config.tls_key_file) == (Path("cert.pem"), Path("key.pem"))
    assert config.auth_token == "s3cret"
    assert config.batching == BatcherConfig(max_batch_size=8, max_delay_s=0.0025, max_queue=77)
    assert (config.cache_entries, config.poll_interval_s, config.grace_s) == (0, 0.5, 3.0)
    assert config.max_message_bytes == int(1.5 * 1024 * 1024)
    assert config.max_concurrent_rpcs == 12
    assert config.limits == Limits(max_interactions=40, max_candidates=300, max_k=20, max_log_rows=500,
                                   max_id_length=64, max_user_features=9)


def test_defaults_are_the_sdk_defaults():
    config = config_of()
    assert config.extra_models == {}
    assert config.auth_token is None
    assert config.limits == Limits()
    assert config.batching == BatcherConfig()
    assert (config.tls_cert_file, config.tls_key_file) == (None, None)


def test_token_comes_from_the_environment_unless_a_file_is_given(tmp_path, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    assert config_of().auth_token == "from-env"
    token = tmp_path / "token"
    token.write_text("from-file")
    assert config_of("--token-file", str(token)).auth_token == "from-file"


def run_serve(capsys, tmp_path, *argv):
    status = serve_main(["--model-dir", str(tmp_path / "models"), "--log-db", str(tmp_path / "log.sqlite"), *argv])
    captured = capsys.readouterr()
    assert "listening" not in captured.out  # no server started
    return status, captured.err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--cache-size", "-1"], "cache_entries must be >= 0, got -1"),
        (["--poll-interval", "-0.5"], "poll_interval_s must be > 0, got -0.5"),
        (["--poll-interval", "0"], "poll_interval_s must be > 0, got 0.0"),
        (["--grace", "-1"], "grace_s must be >= 0, got -1.0"),
        (["--port", "70000"], "port must be in 0..65535, got 70000"),
        (["--max-concurrent-rpcs", "0"], "max_concurrent_rpcs must be None or >= 1, got 0"),
        (["--extra-model", "no-equals-sign"], "--extra-model takes NAME=DIR, got 'no-equals-sign'"),
        (["--extra-model", "=models/x"], "--extra-model takes NAME=DIR, got '=models/x'"),
        (["--extra-model", "x="], "--extra-model takes NAME=DIR, got 'x='"),
        (["--extra-model", "a=1", "--extra-model", "a=2"], "--extra-model names 'a' twice"),
        (["--extra-model", "default=models/x"], "model name 'default' is given twice"),
        (["--max-log-rows", "0"], "max_log_rows must be >= 1, got 0"),
        (["--max-id-length", "0"], "max_id_length must be >= 1, got 0"),
        (["--max-user-features", "-3"], "max_user_features must be >= 1, got -3"),
        (["--max-queue", "0"], "max_queue must be >= 1, got 0"),
        (["--workers", "0"], "--workers must be >= 1, got 0"),
    ],
    ids=["cache-size", "poll-negative", "poll-zero", "grace", "port", "concurrent-rpcs", "extra-no-equals",
         "extra-no-name", "extra-no-dir", "extra-twice", "extra-is-default", "log-rows", "id-length",
         "user-features", "queue", "workers"],
)
def test_bad_values_exit_2_with_the_reason(capsys, tmp_path, argv, message):
    status, err = run_serve(capsys, tmp_path, *argv)
    assert status == 2
    assert err.startswith("metarec serve: error: ") and message in err, err
    assert "Traceback" not in err


def test_unreadable_or_empty_token_file_exits_2(capsys, tmp_path):
    status, err = run_serve(capsys, tmp_path, "--token-file", str(tmp_path / "missing"))
    assert status == 2 and "cannot read --token-file" in err and "missing" in err
    (tmp_path / "empty").write_text("\n")
    status, err = run_serve(capsys, tmp_path, "--token-file", str(tmp_path / "empty"))
    assert status == 2 and "is empty" in err


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("cache_entries", -1, "cache_entries must be >= 0, got -1"),
        ("poll_interval_s", float("nan"), "poll_interval_s must be > 0, got nan"),
        ("poll_interval_s", 0, "poll_interval_s must be > 0, got 0"),
        ("grace_s", -0.1, "grace_s must be >= 0, got -0.1"),
        ("max_concurrent_rpcs", 0, "max_concurrent_rpcs must be None or >= 1, got 0"),
        ("port", -1, "port must be in 0..65535, got -1"),
        ("port", 65536, "port must be in 0..65535, got 65536"),
        ("extra_models", {"": "models/x"}, "extra model names must be non-empty strings, got ''"),
    ],
)
def test_server_config_checks_its_values(tmp_path, field, value, message):
    with pytest.raises(ValueError) as info:
        ServerConfig(model_dir=tmp_path, **{field: value})
    assert message in str(info.value)


def test_server_config_accepts_the_edges(tmp_path):
    config = ServerConfig(model_dir=tmp_path, port=65535, cache_entries=0, grace_s=0, max_concurrent_rpcs=None,
                          extra_models={"other": tmp_path / "other"})
    assert config.port == 65535 and config.max_concurrent_rpcs is None
    assert ServerConfig(model_dir=tmp_path, port=0, max_concurrent_rpcs=1).port == 0
