"""The registry step against a real SQLite store: the pyfunc model logged from a tiny random
model, registered with aliases, loaded back by alias and served by `mlflow models serve`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath

import mlflow
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS
from tokenizers import Tokenizer

from model import generate as generation
from model.checkpoint import load_model, save_model
from model.config import ModelConfig
from model.generate import generate
from model.transformer import Transformer
from tasks import tokenize
from tasks.chat import BOS, END, EOS, render_prompt
from tasks.register import (
    CHALLENGER,
    MODEL_NAME,
    champion_version,
    log_model,
    promote,
    register,
)
from tasks.tracking import Tracker

TEXT = ["hello world", "two plus two is four", "hi there, how are you?", "the cat sat on the mat"]
SERVE_TIMEOUT_S = 90


def tiny_tokenizer() -> Tokenizer:
    """The pipeline's own byte-level BPE with the chat special tokens, trained on a few sentences."""
    return tokenize.train_tokenizer(iter([TEXT * 10]), tokenize.TokenizeConfig(vocab_size=300, min_frequency=1))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A finished-model directory: random tiny weights, config and a byte-level BPE tokenizer."""
    tokenizer = tiny_tokenizer()
    config = ModelConfig(
        vocab_size=320, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, kv_lora_rank=16,
        qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, intermediate_size=48, moe_intermediate_size=16,
        max_position_embeddings=128,
    )
    assert tokenizer.get_vocab_size() <= config.vocab_size
    out = save_model(Transformer(config), tmp_path_factory.mktemp("model"))
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "checkpoints" / "step-000001").mkdir(parents=True)  # as a training stage leaves them
    (out / "checkpoints" / "step-000001" / "optimizer.pt").write_bytes(b"training state")
    return out


def local_tracker(root: Path) -> Tracker:
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        return Tracker(root)


@pytest.fixture(scope="module")
def champion(tmp_path_factory, model_dir) -> Tracker:
    """A store where version 1 of `tinyseek` is the champion (built once for the read-only tests)."""
    tracker = local_tracker(tmp_path_factory.mktemp("ws"))
    with tracker.run("register") as run_id:
        promote(tracker, register(tracker, log_model(tracker, run_id, model_dir), run_id))
    return tracker


@pytest.fixture
def champion_env(champion, monkeypatch) -> Tracker:
    """MLflow's module-level APIs and the CLI pointed at the champion's store."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", champion.uri)
    return champion


def test_log_register_and_promote(ws, model_dir):
    tracker = local_tracker(ws)
    client = tracker.client
    assert champion_version(tracker) is None
    with tracker.run("register", params={"preset": "tiny"}) as run_id:
        uri = log_model(tracker, run_id, model_dir)
        first = register(tracker, uri, run_id, tags={"data_fingerprint": "fp123", "preset": "tiny"})

    model_id = uri.removeprefix("models:/")
    logged = client.get_logged_model(model_id)
    assert (logged.status, logged.source_run_id, logged.name) == ("READY", run_id, MODEL_NAME)
    assert logged.params == {"preset": "tiny"}
    assert [o.model_id for o in client.get_run(run_id).outputs.model_outputs] == [model_id]
    served = f"artifacts/{model_dir.name}"
    files = {PurePosixPath(f.path).name for f in client.list_logged_model_artifacts(model_id, served)}
    assert files == {path.name for path in model_dir.iterdir() if path.is_file()}  # no checkpoints/

    assert first == 1
    version = client.get_model_version_by_alias(MODEL_NAME, CHALLENGER)
    assert int(version.version) == 1
    assert version.tags == {"data_fingerprint": "fp123", "preset": "tiny"}
    assert (version.run_id, version.source) == (run_id, logged.artifact_location)
    links = json.loads(client.get_logged_model(model_id).tags[MLFLOW_MODEL_VERSIONS])
    assert links == [{"name": MODEL_NAME, "version": 1}]
    assert champion_version(tracker) is None

    with tracker.run("register") as second_run:
        second = register(tracker, log_model(tracker, second_run, model_dir), second_run)
    assert second == 2
    assert int(client.get_model_version_by_alias(MODEL_NAME, CHALLENGER).version) == 2
    promote(tracker, first)
    assert champion_version(tracker) == 1
    aliases = client.get_registered_model(MODEL_NAME).aliases
    assert {alias: int(v) for alias, v in aliases.items()} == {"challenger": 2, "champion": 1}


def expected_completion(model_dir: Path, ids: list[int], max_new_tokens: int, cache_dtype=None) -> str:
    """What the pyfunc model must answer: greedy generation, stopped at <|end|> or <|eos|>."""
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    stops = [tokenizer.token_to_id(END), tokenizer.token_to_id(EOS)]
    model = load_model(model_dir, "cuda" if torch.cuda.is_available() else "cpu")  # as the pyfunc model does
    out = generate(model, [ids], max_new_tokens=max_new_tokens, stop_ids=stops, cache_dtype=cache_dtype)[0]
    return tokenizer.decode(out, skip_special_tokens=True)


def test_champion_loads_by_alias_and_predicts(champion_env, model_dir):
    model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion")
    answers = model.predict(pd.DataFrame({"prompt": ["hi", "2+2"]}), params={"max_new_tokens": 6})
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    chat_ids = render_prompt([{"role": "user", "content": "hi"}], tokenizer)
    assert answers[0] == expected_completion(model_dir, chat_ids, 6)

    raw = model.predict(["hello world"], params={"max_new_tokens": 5, "chat": False})
    raw_ids = [tokenizer.token_to_id(BOS), *tokenizer.encode("hello world", add_special_tokens=False).ids]
    assert raw == [expected_completion(model_dir, raw_ids, 5)]

    # refused as the CLI refuses them, by the message MLflow's server answers with
    too_long = r"prompt 2 is \d+ tokens; with max_new_tokens=4 that exceeds the model's context of 128 tokens"
    with pytest.raises(MlflowException, match=too_long) as refused:
        model.predict(["hi", "the cat sat on the mat " * 40], params={"max_new_tokens": 4})
    assert refused.value.error_code == "INVALID_PARAMETER_VALUE"
    for missing in (pd.DataFrame({"prompt": ["hi", None]}), ["hi", None]):  # JSON null, not the text "None"
        with pytest.raises(MlflowException, match="prompt 2 is missing: every prompt needs a text"):
            model.predict(missing, params={"max_new_tokens": 4})
    for params, message in [({"max_new_tokens": 0}, "max_new_tokens=0: use 1 to 127"),
                            ({"max_new_tokens": 128}, "max_new_tokens=128: use 1 to 127"),
                            ({"top_p": 0.0}, "top_p=0.0: use a value above 0"),
                            ({"temperature": -1.0}, "temperature=-1.0: use 0"),
                            ({"top_k": -1}, "top_k=-1: use 0"),
                            ({"seed": -1}, "seed=-1: use a whole number from 0")]:
        with pytest.raises(MlflowException, match=message):
            model.predict(["hi"], params=params)

    # top_k and seed are taken: the single likeliest token is greedy whatever the temperature,
    # and a seed repeats a sample
    assert model.predict(["hi"], params={"max_new_tokens": 6, "temperature": 5.0, "top_k": 1}) == answers[:1]
    sampled = [model.predict(["hi", "2+2"], params={"max_new_tokens": 8, "temperature": 5.0, "seed": seed})
               for seed in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]

    cache_dtypes = []
    new_caches = Transformer.new_caches
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Transformer, "new_caches",
                      lambda self, *args: cache_dtypes.append(args[2]) or new_caches(self, *args))
        narrow = model.predict(["hi"], params={"max_new_tokens": 12, "kv_cache_dtype": "fp8"})
    assert cache_dtypes == [torch.float8_e4m3fn]
    assert narrow == [expected_completion(model_dir, chat_ids, 12, torch.float8_e4m3fn)]
    with pytest.raises(MlflowException, match="kv_cache_dtype='fp4': use one of auto, bf16, fp8"):
        model.predict(["hi"], params={"kv_cache_dtype": "fp4"})

    stepped = []  # `compile` sends decoding through the compiled step (a recording stand-in here)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(generation, "compiled_step", lambda net: stepped.append(net) or net.forward_cached)
        patch.setattr(generation, "cpp_compiler", lambda: "/usr/bin/g++")
        assert model.predict(["hi"], params={"max_new_tokens": 6, "compile": True}) == answers[:1]
    assert len(stepped) == 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_up(server: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + SERVE_TIMEOUT_S
    while time.monotonic() < deadline:
        assert server.poll() is None, f"mlflow models serve exited:\n{log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.5)
    pytest.fail(f"mlflow models serve did not answer {url} in {SERVE_TIMEOUT_S}s:\n{log.read_text()[-3000:]}")


def test_serve_champion(champion_env, tmp_path):
    bin_dir = Path(sys.executable).parent  # the CLI starts `uvicorn` from PATH
    port = free_port()
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    command = [
        str(bin_dir / "mlflow"), "models", "serve", "-m", f"models:/{MODEL_NAME}@champion",
        "--env-manager", "local", "-p", str(port), "-h", "127.0.0.1", "-w", "1",
    ]
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        server = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_up(server, f"http://127.0.0.1:{port}/ping", log)
        body = json.dumps({"dataframe_records": [{"prompt": "hello"}], "params": {"max_new_tokens": 4}}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            predictions = json.loads(response.read())["predictions"]
        assert len(predictions) == 1 and isinstance(predictions[0], str)
        body = json.dumps({"inputs": ["hello"], "params": {"max_new_tokens": 500}}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 400
        assert "Error: max_new_tokens=500: use 1 to 127" in json.loads(refused.value.read())["message"]
    finally:
        stop(server)


def stop(server: subprocess.Popen) -> None:
    """End the CLI and the uvicorn process it started: they share the session's process group."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            break
        try:
            server.wait(timeout=15)
            break
        except subprocess.TimeoutExpired:
            continue
