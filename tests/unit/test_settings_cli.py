"""server.settings and server.cli: defaults < MICROTUNE_* environment < CLI flags; frozen;
validated; `microtune --help` works. No test here starts a server."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest

from server import __version__
from server.cli import build_parser, main, settings_from_args
from server.settings import DEMO_REPOSITORY, Settings

FLAGS = ["--" + name.replace("_", "-") for name in Settings.model_fields]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.upper().startswith("MICROTUNE_"):
            monkeypatch.delenv(key)


def from_cli(*argv: str) -> Settings:
    return settings_from_args(build_parser().parse_args(["serve", *argv]))


def test_defaults() -> None:
    s = Settings()
    assert s.model_repository == DEMO_REPOSITORY
    assert (s.grpc_host, s.grpc_port) == ("127.0.0.1", 8001)
    assert s.shm_slot_bytes % 4096 == 0
    assert s.server_name == "triton"
    assert from_cli() == s


@pytest.mark.parametrize(
    ("env", "value", "field", "want"),
    [
        ("MICROTUNE_GRPC_PORT", "9100", "grpc_port", 9100),
        ("MICROTUNE_GRPC_HOST", "0.0.0.0", "grpc_host", "0.0.0.0"),
        ("MICROTUNE_LOG_LEVEL", "DEBUG", "log_level", "DEBUG"),
        ("MICROTUNE_MODEL_REPOSITORY", "/models", "model_repository", Path("/models")),
        ("MICROTUNE_SHM_SLOT_BYTES", "8192", "shm_slot_bytes", 8192),
        ("microtune_worker_threads", "3", "worker_threads", 3),  # case-insensitive
    ],
)
def test_env_prefix(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, field: str, want: object
) -> None:
    monkeypatch.setenv(env, value)
    assert getattr(Settings(), field) == want
    assert getattr(from_cli(), field) == want  # the CLI without flags keeps the environment


def test_unprefixed_env_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRPC_PORT", "1234")
    assert Settings().grpc_port == 8001


def test_cli_flags_override_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MICROTUNE_GRPC_PORT", "9100")
    monkeypatch.setenv("MICROTUNE_LOG_LEVEL", "ERROR")
    monkeypatch.setenv("MICROTUNE_SERVER_NAME", "from-env")
    s = from_cli(
        "--grpc-port",
        "9200",
        "--log-level",
        "WARNING",
        "--model-repository",
        str(tmp_path),
        "--port-file",
        str(tmp_path / "port"),
    )
    assert s.grpc_port == 9200
    assert s.log_level == "WARNING"
    assert s.model_repository == tmp_path
    assert s.port_file == tmp_path / "port"
    assert s.server_name == "from-env"  # not given on the command line: the environment's


def test_frozen() -> None:
    s = Settings()
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        s.grpc_port = 1  # type: ignore[misc]
    assert s.grpc_port == 8001


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"shm_slot_bytes": 4096 + 1}, "shm_slot_bytes\n  Value error, must be a multiple of 4096"),
        ({"shm_slot_bytes": 4096 * 5 // 2}, "shm_slot_bytes\n  Value error, must be a multiple of"),
        ({"shm_slot_bytes": 1024}, "greater than or equal to 4096"),
        ({"grpc_port": 70000}, "less than or equal to 65535"),
        ({"grpc_port": -1}, "greater than or equal to 0"),
        ({"worker_threads": 0}, "greater than or equal to 1"),
        ({"log_level": "TRACE"}, "log_level"),
        ({"no_such_setting": 1}, "Extra inputs are not permitted"),
        # (a "gpu" or "tpu" served on the CPU, saying "connected on gpu")
        ({"device": "gpu"}, "String should match pattern"),
        ({"device": "cuda:x"}, "String should match pattern"),
        # (ended in a traceback once the server listened; "" is ".", a directory)
        ({"port_file": ""}, "port_file\n  Value error, an empty path"),
        ({"port_file": "/no/such/dir/port"}, "not a file in an existing directory"),
        ({"port_file": "/tmp"}, "not a file in an existing directory"),
        # ("" served the working directory, / in the image, each directory a failed model)
        ({"model_repository": ""}, "model_repository\n  Value error, an empty path"),
        ({"routing_file": " "}, "routing_file\n  Value error, an empty path"),
        ({"shutdown_grace_s": -1}, "greater than or equal to 0"),
        # (inf: a front read the supervisor's JSON null and died, restart after restart; a
        # huge finite one overflowed grpc's milliseconds or the supervisor's join at SIGTERM)
        ({"shutdown_grace_s": float("inf")}, "Input should be a finite number"),
        ({"shutdown_delay_s": float("nan")}, "Input should be a finite number"),
        ({"max_connection_age_s": 1e300}, "less than or equal to 86400"),
        ({"shutdown_grace_s": 3_000_000}, "less than or equal to 86400"),
        ({"repository_poll_s": float("inf")}, "Input should be a finite number"),
        ({"trace_sampling_ratio": float("nan")}, "Input should be a finite number"),
    ],
)
def test_validation_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=message):
        Settings(**kwargs)  # type: ignore[arg-type]


def test_invalid_env_is_a_validation_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MICROTUNE_SHM_SLOT_BYTES", "5000")
    with pytest.raises(pydantic.ValidationError, match="multiple of 4096"):
        Settings()


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--shm-slot-bytes", "5000"], {}, "--shm-slot-bytes '5000': must be a multiple of 4096"),
        (
            ["--grpc-port", "http"],
            {},
            "--grpc-port 'http': Input should be a valid integer, unable to parse string as an "
            "integer",
        ),
        ([], {"MICROTUNE_GRPC_PORT": "abc"}, "MICROTUNE_GRPC_PORT='abc': Input should be a valid"),
        ([], {"microtune_shm_slot_bytes": "5000"}, "microtune_shm_slot_bytes='5000': must be a"),
        (["--model-repository", ""], {}, "--model-repository '': an empty path"),
        (
            ["--log-level", "trace"],
            {"MICROTUNE_SHM_SLOTS": "0"},
            "--log-level 'trace': Input should be 'DEBUG', 'INFO', 'WARNING' or 'ERROR'; "
            "MICROTUNE_SHM_SLOTS='0': Input should be greater than or equal to 1",
        ),
    ],
)
def test_main_reports_invalid_settings_in_one_line_naming_the_flag_or_variable(
    argv: list[str],
    env: dict[str, str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """(pydantic's text: 3-4 lines per error, naming the field rather than the flag or the
    variable, with a link to its documentation.)"""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"microtune: invalid settings: {message}"), err
    assert err.count("\n") == 1
    assert "pydantic" not in err


@pytest.mark.parametrize(
    "var", ["MICROTUNE_MODEL_REPOSITORY", "MICROTUNE_ROUTING_FILE", "MICROTUNE_GRPC_PORT"]
)
def test_an_empty_variable_counts_as_unset(var: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a template leaves for a value it lacks. MICROTUNE_MODEL_REPOSITORY= served the
    working directory (in the image, `/`: bin, boot, dev... each a failed model)."""
    monkeypatch.setenv(var, "")
    assert Settings() == Settings.model_construct()
    assert from_cli() == Settings()


@pytest.mark.parametrize("level", ["debug", "Info", "warning", "ERROR"])
def test_log_level_in_any_case(level: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert from_cli("--log-level", level).log_level == level.upper()
    monkeypatch.setenv("MICROTUNE_LOG_LEVEL", level)
    assert Settings().log_level == level.upper()


@pytest.mark.parametrize(
    ("host", "bound"),
    [
        ("::1", "[::1]"),  # (gRPC read "::1:8001" as [::0.1.0.0]:443: "address in use")
        ("::", "[::]"),
        ("fe80::1%eth0", "[fe80::1%eth0]"),
        ("[::1]", "[::1]"),
        ("0.0.0.0", "0.0.0.0"),
        ("localhost", "localhost"),
    ],
)
def test_a_bare_ipv6_host_is_bracketed(host: str, bound: str) -> None:
    assert from_cli("--grpc-host", host).grpc_host == bound


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: microtune" in out
    assert "serve" in out


def test_serve_help_lists_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: microtune serve" in out
    assert "MICROTUNE_<NAME>" in out
    for flag in FLAGS:
        assert flag in out, flag
    # the field docstrings are the help texts
    assert "Address to bind the gRPC server to" in out
    assert "(default: 8001)" in out


def test_every_setting_has_a_description() -> None:
    missing = [n for n, f in Settings.model_fields.items() if not f.description]
    assert missing == []


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"microtune {__version__}"


@pytest.mark.parametrize("argv", [[], ["bogus"], ["serve", "--no-such-flag", "1"]])
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "usage: microtune" in capsys.readouterr().err


@pytest.mark.parametrize("frontends", ["1", "2"])
def test_a_missing_model_repository_stops_the_server_with_one_line(
    frontends: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """(A lone front ended with a traceback and code 1; a supervisor restarted its fronts, each
    dying the same way, for ever.)"""
    missing = tmp_path / "not-there"
    argv = ["serve", "--model-repository", str(missing), "--grpc-port", "0"]
    assert main([*argv, "--metrics-port", "-1", "--frontends", frontends]) == 78
    err = capsys.readouterr().err
    assert f"cannot start: model repository {missing} is not a directory" in err


@pytest.mark.parametrize("frontends", ["1", "2"])
def test_a_load_model_name_the_repository_lacks_stops_the_server_with_one_line(
    frontends: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """(A typo in --load-model left a server that said it was ready, one ERROR line aside, and
    never served the model; Triton does not start.)"""
    (tmp_path / "dense").mkdir()
    argv = ["serve", "--model-repository", str(tmp_path), "--grpc-port", "0", "--metrics-port"]
    argv += ["-1", "--frontends", frontends, "--model-control-mode", "explicit"]
    assert main([*argv, "--load-model", "dense, desne,other"]) == 78
    err = capsys.readouterr().err
    assert f"cannot start: --load-model desne, other: no such model in {tmp_path}" in err
    assert main([*argv, "--load-model", "*,dense"]) == 78
    err = capsys.readouterr().err
    assert "cannot start: --load-model '*' loads every model: it cannot stand beside" in err


@pytest.mark.parametrize("mode", ["none", "poll"])
def test_load_model_outside_explicit_mode_stops_the_server_with_one_line(
    mode: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """(It was ignored without a word: every model loaded, and a name the repository lacks
    said nothing. Triton: "Use of '--load-model' requires setting
    '--model-control-mode=explicit' as well.")"""
    (tmp_path / "dense").mkdir()
    argv = ["serve", "--model-repository", str(tmp_path), "--grpc-port", "0", "--metrics-port"]
    argv += ["-1", "--model-control-mode", mode]
    assert main([*argv, "--load-model", "dense,no_such_model"]) == 78
    err = capsys.readouterr().err
    assert "cannot start: --load-model requires --model-control-mode explicit as well" in err
    monkeypatch.setenv("MICROTUNE_LOAD_MODEL", "*")
    assert main(argv) == 78
    err = capsys.readouterr().err
    assert "cannot start: MICROTUNE_LOAD_MODEL requires --model-control-mode explicit" in err


def test_a_load_model_variable_naming_a_missing_model_is_named_as_such(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MICROTUNE_LOAD_MODEL", "desne")
    monkeypatch.setenv("MICROTUNE_MODEL_CONTROL_MODE", "explicit")
    argv = ["serve", "--model-repository", str(tmp_path), "--grpc-port", "0"]
    assert main([*argv, "--metrics-port", "-1"]) == 78
    err = capsys.readouterr().err
    assert f"cannot start: MICROTUNE_LOAD_MODEL desne: no such model in {tmp_path}" in err


def test_a_front_finds_its_model_repository_gone(tmp_path: Path) -> None:
    """A front of the supervisor (or a lone one started otherwise than by `main`) checks too."""
    from server.cli import serve_front

    settings = Settings(model_repository=tmp_path / "gone", grpc_port=0, metrics_port=-1)
    assert serve_front(settings) == 78


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_devices_accepted(device: str) -> None:
    assert Settings(device=device).device == device
