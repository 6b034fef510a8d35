"""Errors a user can meet are one clear line (exit code 2), never a traceback."""

import pytest

from tests.flows.helpers import free_port, tinyseek


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_help_lists_the_commands():
    result = tinyseek("--help")
    assert result.returncode == 0
    for command in ("run", "data", "pretrain", "finetune", "evaluate", "serve", "up", "generate", "chat",
                    "next-token", "export-hf"):
        assert command in result.stdout


def test_unknown_preset_names_the_closest(tmp_path):
    result = tinyseek("run", "--preset", "tinny", "--workspace", str(tmp_path))
    assert_one_line_error(result, "unknown preset 'tinny'", "tiny")


@pytest.mark.parametrize(
    "assignment, hint",
    [("pretrain.stepz=3", "steps"), ("modle.hidden_size=8", "model"), ("model.hiden_size=8", "hidden_size"),
     ("pretrain.steps", "key.path=value")],
)
def test_unknown_set_key_names_the_closest(tmp_path, assignment, hint):
    result = tinyseek("data", "--preset", "tiny", "--set", assignment, "--workspace", str(tmp_path))
    assert_one_line_error(result, hint)


def test_invalid_value_names_the_field(tmp_path):
    result = tinyseek("data", "--preset", "tiny", "--set", "pretrain.steps=-1", "--workspace", str(tmp_path))
    assert_one_line_error(result, "pretrain.steps")
    result = tinyseek("data", "--preset", "tiny", "--set", "model.qk_rope_head_dim=5", "--workspace", str(tmp_path))
    assert_one_line_error(result, "qk_rope_head_dim")


def test_workspace_that_is_a_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert_one_line_error(tinyseek("data", "--workspace", str(blocker / "ws")), "not writable")


def test_server_urls_that_do_not_answer(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    result = tinyseek("data", "--workspace", str(tmp_path), PREFECT_API_URL=f"{dead}/api")
    assert_one_line_error(result, "PREFECT_API_URL", "does not answer")
    result = tinyseek("data", "--workspace", str(tmp_path), MLFLOW_TRACKING_URI=dead)
    assert_one_line_error(result, "MLFLOW_TRACKING_URI", "does not answer")


@pytest.mark.parametrize("command", [["generate", "--prompt", "x"], ["chat"]])
def test_decode_options_take_the_names_generation_knows(command, capsys):
    from flows.cli import build_parser
    from model.generate import CACHE_DTYPES

    parser = build_parser()
    assert parser.parse_args(command).kv_cache_dtype == "auto"
    assert not parser.parse_args(command).compile and parser.parse_args([*command, "--compile"]).compile
    for name in CACHE_DTYPES:
        assert parser.parse_args([*command, "--kv-cache-dtype", name]).kv_cache_dtype == name
    with pytest.raises(SystemExit):
        parser.parse_args([*command, "--kv-cache-dtype", "fp4"])
    assert "invalid choice: 'fp4'" in capsys.readouterr().err


def test_missing_model_reference(tmp_path):
    result = tinyseek("generate", "--workspace", str(tmp_path), "--prompt", "hi", "--model", str(tmp_path / "none"))
    assert_one_line_error(result, "no model directory")
