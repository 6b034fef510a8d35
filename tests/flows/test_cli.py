"""Errors a user can meet are one clear line (exit code 2), never a traceback."""

import contextlib
import http.server
import os
import subprocess
import sys
import threading

import pytest

from tests.flows.helpers import cli_env, free_port, tinyseek


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
                    "next-token", "export-hf", "prune"):
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
    result = tinyseek("data", "--preset", "tiny", "--set", "pretrain.steps=-1", "--workspace", str(tmp_path / "ws"))
    assert_one_line_error(result, "pretrain.steps")
    assert not (tmp_path / "ws").exists()  # nothing is created for a run that cannot start
    result = tinyseek("data", "--preset", "tiny", "--set", "model.qk_rope_head_dim=5", "--workspace", str(tmp_path))
    assert_one_line_error(result, "qk_rope_head_dim")
    result = tinyseek("data", "--preset", "tiny", "--set", "model.hidden_size=abc", "--workspace", str(tmp_path))
    assert_one_line_error(result, "model.hidden_size='abc'", "integer")


def test_a_config_error_is_found_without_loading_torch(tmp_path):
    """Checking a config needs no torch (a second's work instead of several), so a mistyped
    value is reported before the heavy imports of the stages."""
    code = ("import sys; from flows.cli import main; "
            f"status = main(['run', '--set', 'pretrain.steps=-1', '--workspace', {str(tmp_path)!r}]); "
            "print(status, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), timeout=120)
    assert "error: config pretrain.steps" in result.stderr
    assert result.stdout.split() == ["2", "False"], result.stdout + result.stderr


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_error_itself_written_before_or_after_the_command(tmp_path, where):
    from flows.cli import main
    from tasks.stage import StageError

    command = ["data", "--set", "pretrain.steps=-1", "--workspace", str(tmp_path)]
    with pytest.raises(StageError, match="pretrain.steps"):
        main(["--debug", *command] if where == "before" else [*command, "--debug"])
    assert main(command) == 2  # without it, the one-line message


@pytest.mark.parametrize("host", ["::1", "203.0.113.9"])  # IPv6; an address of no interface here
def test_up_names_the_host_option_for_a_host_it_cannot_listen_on(host):
    from flows.deploy import check_free
    from tasks.stage import StageError

    with pytest.raises(StageError, match=r"pass --host with an IPv4 address or host name of this machine$"):
        check_free(host, free_port(), "--prefect-port")


def test_usr1_prints_every_threads_stack_and_the_process_goes_on(capfd):
    """Read under the GIL: faulthandler's dump of running threads once crashed a run."""
    import signal
    import threading

    from flows.cli import print_stacks

    stop, started = threading.Event(), threading.Event()

    def busy() -> None:
        started.set()
        while not stop.is_set():
            sum(range(1000))

    worker = threading.Thread(target=busy, name="busy-worker")
    before = signal.signal(signal.SIGUSR1, print_stacks)
    try:
        worker.start()
        started.wait()
        for _ in range(20):
            os.kill(os.getpid(), signal.SIGUSR1)
    finally:
        signal.signal(signal.SIGUSR1, before)
        stop.set()
        worker.join()
    err = capfd.readouterr().err
    assert err.count("(MainThread; most recent call last):") == 20
    assert err.count("(busy-worker; most recent call last):") == 20
    assert "in busy" in err and "print_stacks" not in err


def test_workspace_that_is_a_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert_one_line_error(tinyseek("data", "--workspace", str(blocker / "ws")), "not writable")
    assert_one_line_error(tinyseek("data", "--workspace", str(blocker)), "is a file, not a directory")


def test_server_urls_that_do_not_answer(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    result = tinyseek("data", "--workspace", str(tmp_path), PREFECT_API_URL=f"{dead}/api")
    assert_one_line_error(result, "PREFECT_API_URL", "does not answer")
    result = tinyseek("data", "--workspace", str(tmp_path), MLFLOW_TRACKING_URI=dead)
    assert_one_line_error(result, "MLFLOW_TRACKING_URI", "does not answer")
    result = tinyseek("generate", "--prompt", "hi", "--workspace", str(tmp_path), MLFLOW_TRACKING_URI=dead)
    assert_one_line_error(result, "MLFLOW_TRACKING_URI", "does not answer")  # not minutes of retries
    result = tinyseek("data", "--workspace", str(tmp_path), PREFECT_API_URL=dead.removeprefix("http://"))
    assert_one_line_error(result, "PREFECT_API_URL", "is not an http(s) URL")
    result = tinyseek("generate", "--prompt", "hi", "--workspace", str(tmp_path), MLFLOW_TRACKING_URI="foo://bar")
    assert_one_line_error(result, "MLflow tracking at foo://bar failed", "unsupported URI 'foo://bar'")
    assert "finished stages" not in result.stderr  # generate has none


def test_up_names_the_option_for_a_port_in_use(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = tinyseek("up", "--workspace", str(tmp_path), "--prefect-port", port, "--mlflow-port", str(free_port()))
        assert_one_line_error(result, f"cannot listen on 127.0.0.1:{port}", "--prefect-port")
        result = tinyseek("up", "--workspace", str(tmp_path), "--prefect-port", str(free_port()), "--mlflow-port", port)
        assert_one_line_error(result, "--mlflow-port")


@contextlib.contextmanager
def healthy_server():
    """The URL of a local HTTP server that answers every GET with 200, as a server's health check does."""

    class Healthy(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Healthy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()


def test_up_refuses_one_port_for_both_servers(tmp_path):
    port = str(free_port())
    result = tinyseek("up", "--workspace", str(tmp_path), "--prefect-port", port, "--mlflow-port", port)
    assert_one_line_error(result, f"--prefect-port and --mlflow-port are both {port}")


def test_mlflow_accepts_calls_that_name_it_by_the_host_up_listens_on():
    import socket

    from mlflow.server.security_utils import get_default_allowed_hosts, is_allowed_host_header

    from flows.deploy import mlflow_host_options

    assert mlflow_host_options("127.0.0.1", 5000) == [] and mlflow_host_options("localhost", 5000) == []
    option, hosts = mlflow_host_options("Build-Box", 5000)  # as clients send it: in lower case
    allowed = hosts.split(",")
    assert option == "--allowed-hosts"
    assert all(is_allowed_host_header(allowed, h) for h in ("build-box:5000", "localhost:5000", "127.0.0.1:5000"))
    assert not is_allowed_host_header(allowed, "elsewhere.example:5000")
    everywhere = mlflow_host_options("0.0.0.0", 5000)  # every address: the machine's own name too
    name = socket.gethostname().lower()
    assert is_allowed_host_header(everywhere[1].split(",") if everywhere else [], f"{name}:5000") or \
        is_allowed_host_header(get_default_allowed_hosts(), f"{name}:5000")


ORPHAN_SCRIPT = """
import subprocess, time, psutil
from flows.deploy import adopt_orphans, reap_adopted, stop_orphans
adopt_orphans()
server = subprocess.Popen(["sleep", "300"])
# parents that start processes in sessions of their own and die, as a killed `tinyseek serve` does:
# a flow run (Prefect's engine) with a child of its own, and a process that ends on its own
subprocess.run(["bash", "-c", "setsid bash -c 'sleep 303 & exec -a prefect.engine sleep 302' >/dev/null 2>&1 &"],
               check=True)
subprocess.run(["bash", "-c", "sleep 0.1 &"], check=True)
time.sleep(1)
names = lambda: sorted("zombie" if c.status() == psutil.STATUS_ZOMBIE else " ".join(c.cmdline())
                       for c in psutil.Process().children())
before = names()
reap_adopted([server])  # the ended one, a zombie until then
reaped = names()
flow_runs = stop_orphans([server], timeout=5)  # the flow run, then the child it leaves
after = names()
server.kill()
print(before, reaped, flow_runs, after)
"""


def test_up_reaps_adopted_processes_and_stops_flow_runs_a_dead_serve_left_behind():
    result = subprocess.run([sys.executable, "-c", ORPHAN_SCRIPT], capture_output=True, text=True, timeout=60,
                            cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert result.stdout.strip() == ("['prefect.engine 302', 'sleep 300', 'zombie'] ['prefect.engine 302', "
                                     "'sleep 300'] 1 ['sleep 300']"), result.stderr


def test_up_names_a_damaged_mlflow_store_before_starting_servers(tmp_path):
    (tmp_path / "mlflow.db").write_text("garbage\n")
    result = tinyseek("up", "--workspace", str(tmp_path), "--prefect-port", str(free_port()),
                      "--mlflow-port", str(free_port()))
    assert_one_line_error(result, f"the MLflow store {tmp_path / 'mlflow.db'} cannot be read (file is not a database): "
                                  "restore it from a copy, or use another --workspace")


def test_a_retrain_schedule_that_is_not_cron_is_refused_before_serving(tmp_path):
    with healthy_server() as url:
        result = tinyseek("serve", "--workspace", str(tmp_path), "--cron", "every day", PREFECT_API_URL=f"{url}/api")
    assert_one_line_error(result, "--cron 'every day' is not a cron schedule")
    result = tinyseek("up", "--workspace", str(tmp_path), "--cron", "every day")
    assert_one_line_error(result, "--cron 'every day' is not a cron schedule")


@pytest.mark.parametrize("cron", ["* * * * * *", "0 3 * * * 30"])
def test_a_cron_of_six_fields_is_refused(cron):
    """Prefect reads a sixth field as seconds: '* * * * * *' would start a retrain every second."""
    from flows.deploy import check_cron
    from tasks.stage import StageError

    with pytest.raises(StageError, match="has a sixth field, which Prefect reads as seconds: use five fields"):
        check_cron(cron)
    check_cron("@hourly")


def test_serve_without_a_server_says_so_and_leaves_no_trace(tmp_path):
    result = tinyseek("serve", "--workspace", str(tmp_path / "ws"))
    assert_one_line_error(result, "needs a Prefect server: set PREFECT_API_URL, or use `tinyseek up`")
    assert not (tmp_path / "ws").exists()


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


@pytest.mark.parametrize(
    "option, value, says",
    [("--max-new-tokens", "0", "a whole number >= 1"), ("--max-new-tokens", "many", "a whole number >= 1"),
     ("--temperature", "-0.5", "a finite number >= 0"), ("--temperature", "inf", "a finite number >= 0"),
     ("--top-p", "0", "in (0, 1]"), ("--top-k", "-3", ">= 0")],
)
def test_sampling_options_out_of_range_are_refused_before_loading(option, value, says, capsys):
    from flows.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--prompt", "x", option, value])
    last = capsys.readouterr().err.splitlines()[-1]
    assert f"argument {option}: " in last and says in last, last


def test_sampling_options_that_greedy_decoding_ignores_are_noted(capsys):
    from flows.cli import build_parser, sampling

    parser = build_parser()
    sampling(parser.parse_args(["generate", "--prompt", "x", "--top-k", "5", "--seed", "3"]))
    assert capsys.readouterr().err == ("note: --top-k and --seed only apply when sampling (--temperature above 0); "
                                       "decoding greedily\n")
    sampling(parser.parse_args(["generate", "--prompt", "x", "--seed", "3"]))
    assert capsys.readouterr().err.startswith("note: --seed only applies when sampling")
    for quiet in (["--top-k", "5", "--temperature", "0.7"], ["--top-k", "0", "--top-p", "1"]):
        assert sampling(parser.parse_args(["chat", *quiet]))["top_k"] in (0, 5)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("option, value", [("--device", "gpu"), ("--seed", str(2**64)), ("--seed", "-1")])
def test_device_and_seed_are_checked_by_the_parser(option, value, capsys):
    from flows.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--prompt", "x", option, value])
    assert f"argument {option}: " in capsys.readouterr().err.splitlines()[-1]


@pytest.mark.parametrize("option, value", [("--prefect-port", "99999"), ("--mlflow-port", "0")])
def test_ports_are_checked_by_the_parser(option, value, capsys):
    from flows.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["up", option, value])
    assert f"argument {option}: {value} is not a port number" in capsys.readouterr().err.splitlines()[-1]


def test_an_export_does_not_overwrite_files_unless_forced(tmp_path):
    out = tmp_path / "project"
    out.mkdir()
    (out / "config.json").write_text("{}")
    result = tinyseek("export-hf", "--workspace", str(tmp_path), "--out", str(out))
    assert_one_line_error(result, f"{out} already holds files", "--force")
    forced = tinyseek("export-hf", "--workspace", str(tmp_path), "--out", str(out), "--force")
    assert_one_line_error(forced, "no MLflow store")  # past the check: here no model exists
    assert (out / "config.json").read_text() == "{}"
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    for force in ([], ["--force"]):
        result = tinyseek("export-hf", "--workspace", str(tmp_path), "--out", str(a_file), *force)
        assert_one_line_error(result, f"{a_file} is a file: --out names the folder")


def test_an_export_folder_may_start_with_a_tilde(tmp_path):
    """`--out=~/hf` reaches the command unexpanded by the shell."""
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    result = tinyseek("export-hf", "--workspace", str(tmp_path), "--out=~/hf", HOME=str(tmp_path))
    assert_one_line_error(result, f"{tmp_path / 'hf'} already holds files")


def test_missing_model_reference(tmp_path):
    result = tinyseek("generate", "--workspace", str(tmp_path), "--prompt", "hi", "--model", str(tmp_path / "none"))
    assert_one_line_error(result, "no model directory")


def test_inference_commands_only_read_the_workspace(tmp_path):
    """Using a model writes nothing into the workspace (which may be a read-only copy): here
    it is not even created."""
    absent = tmp_path / "workspace"
    result = tinyseek("generate", "--workspace", str(absent), "--prompt", "hi")
    assert_one_line_error(result, f"no MLflow store at {absent / 'mlflow.db'}")
    assert not absent.exists()


def test_an_error_inside_a_stage_is_one_line_in_the_log_too(tmp_path):
    """A stage's own error reaches the user as one line; Prefect's log of the failed task and
    flow says it without the engine's traceback (the data stages before it run for real)."""
    result = tinyseek("pretrain", "--preset", "tiny", "--workspace", str(tmp_path), "--set", "pretrain.micro_batch=100000")
    assert_one_line_error(result, "pretraining data: only", "lower pretrain.seq_len or pretrain.micro_batch")
    assert "Task run failed with exception: StageError('pretraining data: only" in result.stderr


def test_a_damaged_model_directory(tmp_path):
    from tokenizers import Tokenizer, models

    from model.checkpoint import MODEL_FILE, save_model
    from model.transformer import Transformer
    from tests.model.helpers import config

    model_dir = tmp_path / "model"
    save_model(Transformer(config()), model_dir)
    Tokenizer(models.BPE()).save(str(model_dir / "tokenizer.json"))
    weights = model_dir / MODEL_FILE
    weights.write_bytes(weights.read_bytes()[:100])  # cut short, as by a full disk
    result = tinyseek("generate", "--workspace", str(tmp_path), "--prompt", "hi", "--model", str(model_dir))
    assert_one_line_error(result, f"cannot load the model in {model_dir}")
    (model_dir / "tokenizer.json").write_text("{")
    result = tinyseek("generate", "--workspace", str(tmp_path), "--prompt", "hi", "--model", str(model_dir))
    assert_one_line_error(result, f"cannot load the tokenizer in {model_dir}")


@pytest.mark.parametrize(
    "decision, says",
    [({"version": 1, "promoted": True, "champion_before": None, "reason": "no champion yet; m = 0.5"},
      "version 1 (models:/tinyseek/1), now the champion: no champion yet"),
     ({"version": 2, "promoted": False, "champion_before": 1, "reason": "m 0.4 does not beat the champion's 0.5"},
      "version 2 (models:/tinyseek/2) as challenger only: m 0.4 does not beat the champion's 0.5; "
      "models:/tinyseek@champion stays version 1"),
     ({"version": 1, "promoted": False, "champion_before": None, "reason": "not promoted: this run measured no val_loss"},
      "version 1 (models:/tinyseek/1) as challenger only: not promoted: this run measured no val_loss; "
      "there is no champion yet"),
     ({"version": 1, "promoted": False, "champion_before": 1, "reason": "unchanged: version 1 (the champion) is this model"},
      "unchanged: version 1 (the champion) is this model")],
)
def test_the_summary_says_which_model_serves(decision, says, capsys):
    from flows.cli import print_summary

    result = {"seconds": 1.0, "workspace": "ws", "stages": {}, "metrics": {}, "mlflow_run_id": "abc",
              "tracking_uri": "sqlite:///ws/mlflow.db", "model_uri": f"models:/tinyseek/{decision['version']}",
              "report": "ws/reports/abc/report.md", **decision}
    print_summary(result, as_json=False)
    lines = capsys.readouterr().out.splitlines()
    assert says in lines[-2] and lines[-1] == "report: ws/reports/abc/report.md", lines


def test_prune_lists_then_removes_what_an_interrupted_run_left(tmp_path):
    work = tmp_path / "finetune" / ".5e1f5e1f5e1f5e1f.work"
    (work / "step-000250").mkdir(parents=True)
    (work / "step-000250" / "model.safetensors").write_bytes(b"x" * 2_500_000)
    (tmp_path / "finetune" / ".5e1f5e1f5e1f5e1f.lock").touch()
    download = tmp_path / "models-cache" / ".0123456789abcdef.tmp-7-ab12"  # a model download, not a stage's
    download.mkdir(parents=True)
    listed = tinyseek("prune", "--dry-run", "--workspace", str(tmp_path))
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines() == [
        f"would remove 1 leftover(s) of interrupted runs in {tmp_path}, 2.5 MB:",
        "  finetune/.5e1f5e1f5e1f5e1f.work  checkpoints of an unfinished training run, 2.5 MB"]
    assert work.exists()
    removed = tinyseek("prune", "--workspace", str(tmp_path))
    assert removed.stdout.startswith("removed 1 leftover(s)") and not work.exists()
    assert tinyseek("prune", "--workspace", str(tmp_path)).stdout == f"nothing to remove in {tmp_path}\n"
    assert_one_line_error(tinyseek("prune", "--workspace", str(tmp_path / "none")), "no workspace at")
    assert download.exists() and not list(download.parent.glob("*.lock"))


def test_a_failure_on_a_full_workspace_disk_says_so(tmp_path, monkeypatch, capsys):
    """Prefect's and MLflow's SQLite stores fail each in its own way there: the cause is named instead."""
    import shutil
    from collections import namedtuple

    from flows import cli

    def fails(args):
        raise RuntimeError("Server error '500 Internal Server Error' for url …/set_state")

    monkeypatch.setattr(cli, "prune_command", fails)
    monkeypatch.setenv("TINYSEEK_WORKSPACE", str(tmp_path))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 << 30, 10 << 30, 3 << 20))
    assert cli.main(["prune", "--workspace", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"error: the disk holding the workspace {tmp_path} is full (3.0 MiB free): "
                                       "free some space and run again\n")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 << 30, 5 << 30, 5 << 30))
    with pytest.raises(RuntimeError):  # with room on the disk, a failure is what it is
        cli.main(["prune", "--workspace", str(tmp_path)])
