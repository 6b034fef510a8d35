"""The model registry step: the fine-tuned model as an MLflow pyfunc model, registered as `tinyseek`.

The pyfunc model takes prompts and returns completions, so `mlflow models serve` and
`mlflow.pyfunc.load_model` work on any registered version. Its artifact is the plain
model directory (weights, config, tokenizer); the code is referenced, not packaged (a
three-line `tasks/served_model.py` that builds `TinyseekModel`, as MLflow's "models from code"
wants; nothing is pickled), so it is served with `--env-manager local` from an environment
where tinyseek is installed.

A new version gets the alias `challenger`; the version that wins evaluation is promoted
to `champion`. Everything goes through the tracker's client with explicit run ids.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from mlflow.entities import LoggedModelOutput, LoggedModelStatus
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.pyfunc import PythonModel, PythonModelContext, save_model
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from packaging.version import Version

from model.checkpoint import load_model
from model.generate import CACHE_DTYPES, generate
from tasks.chat import BOS, END, EOS, encode_text, read_tokenizer, render_prompt
from tasks.tracking import Tracker

MODEL_NAME = "tinyseek"
CHALLENGER = "challenger"
CHAMPION = "champion"
DESCRIPTION = ("A small DeepSeek-V3-style language model (MLA, DeepSeekMoE, MTP), pretrained and fine-tuned on "
               "instructions by the tinyseek pipeline. Alias champion: the version served, which won evaluation; "
               "challenger: the latest registered.")
TOKENIZER_FILE = "tokenizer.json"
PROMPT_COLUMN = "prompt"
RUNTIME_PACKAGES = ("mlflow", "torch", "tokenizers", "safetensors", "numpy", "pandas")

# Inference params and their defaults; `chat` renders each prompt as one user turn,
# `kv_cache_dtype` names the decode cache's element type (`model.generate.CACHE_DTYPES`), and
# `compile` decodes through torch.compile (the first such request compiles; later ones reuse it).
# `seed` (none: unseeded) makes sampling repeatable.
DEFAULT_PARAMS: dict[str, Any] = {"max_new_tokens": 64, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": None,
                                  "chat": True, "kv_cache_dtype": "auto", "compile": False}

# the file MLflow runs to rebuild `TinyseekModel` where it is loaded ("models from code")
SERVED_MODEL_CODE = Path(__file__).with_name("served_model.py")

INPUT_EXAMPLE = pd.DataFrame({PROMPT_COLUMN: ["What is 2 + 2?"]})
SIGNATURE = ModelSignature(
    # One unnamed string column: MLflow then accepts a frame with a `prompt` column, a list of
    # strings and `{"prompt": ...}` records alike (a named column would refuse a plain list).
    inputs=Schema([ColSpec("string")]),
    outputs=Schema([ColSpec("string")]),
    params=ParamSchema([
        ParamSpec("max_new_tokens", "long", DEFAULT_PARAMS["max_new_tokens"]),
        ParamSpec("temperature", "double", DEFAULT_PARAMS["temperature"]),
        ParamSpec("top_p", "double", DEFAULT_PARAMS["top_p"]),
        ParamSpec("top_k", "long", DEFAULT_PARAMS["top_k"]),
        ParamSpec("seed", "long", DEFAULT_PARAMS["seed"]),
        ParamSpec("chat", "boolean", DEFAULT_PARAMS["chat"]),
        ParamSpec("kv_cache_dtype", "string", DEFAULT_PARAMS["kv_cache_dtype"]),
        ParamSpec("compile", "boolean", DEFAULT_PARAMS["compile"]),
    ]),
)


def _prompt_column(frame: pd.DataFrame) -> list[str]:
    """The prompts as text; a missing one (JSON null) is refused, not answered as the text "None"."""
    column = frame[PROMPT_COLUMN] if PROMPT_COLUMN in frame.columns else frame.iloc[:, 0]
    missing = column.isna().to_numpy()
    if missing.any():
        raise _refused(f"prompt {int(missing.argmax()) + 1} is missing: every prompt needs a text")
    return column.astype(str).tolist()


class TinyseekModel(PythonModel):
    """Prompts in, completions out, greedy or sampled (temperature, top-k, top-p, seed)."""

    def load_context(self, context: PythonModelContext) -> None:
        model_dir = Path(context.artifacts["model"])
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_model(model_dir, device)
        self.tokenizer = read_tokenizer(model_dir / TOKENIZER_FILE)
        self.stop_ids = [self.tokenizer.token_to_id(END), self.tokenizer.token_to_id(EOS)]

    def _encode(self, prompt: str, chat: bool) -> list[int]:
        """A prompt's ids: one user turn in the chat format, or BOS and the text."""
        if chat:
            return render_prompt([{"role": "user", "content": prompt}], self.tokenizer)
        return [self.tokenizer.token_to_id(BOS), *encode_text(self.tokenizer, prompt)]

    def predict(
        self, context: PythonModelContext, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> list[str]:
        """Completions for the `prompt` column (or the only column) of the frame MLflow builds from the input.

        Params out of range, and a prompt that leaves no room for `max_new_tokens` in the
        model's context, are refused with a message the scoring server answers with (HTTP 400),
        as the CLI refuses them: cutting the prompt would drop its beginning or its chat markup."""
        options = {**DEFAULT_PARAMS, **(params or {})}
        max_new_tokens, context = int(options["max_new_tokens"]), self.model.config.max_position_embeddings
        _check_params(options, context)
        prompts = [self._encode(p, bool(options["chat"])) for p in _prompt_column(model_input)]
        for number, ids in enumerate(prompts, start=1):
            if len(ids) + max_new_tokens > context:
                raise _refused(f"prompt {number} is {len(ids)} tokens; with max_new_tokens={max_new_tokens} that "
                               f"exceeds the model's context of {context} tokens: shorten the prompt or lower "
                               "max_new_tokens")
        if not prompts:
            return []
        completions = generate(
            self.model,
            prompts,
            max_new_tokens=max_new_tokens,
            temperature=float(options["temperature"]),
            top_k=int(options["top_k"]),
            top_p=float(options["top_p"]),
            stop_ids=self.stop_ids,
            seed=None if options["seed"] is None else int(options["seed"]),
            cache_dtype=CACHE_DTYPES[options["kv_cache_dtype"]],
            compile=bool(options["compile"]),
        )
        return [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in completions]


def _refused(message: str) -> MlflowException:
    """An error whose message MLflow's scoring server returns (HTTP 400); any other exception
    it answers with a generic message, the reason buried in a stack trace."""
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _check_params(options: Mapping[str, Any], context: int) -> None:
    if options["kv_cache_dtype"] not in CACHE_DTYPES:
        raise _refused(f"kv_cache_dtype={options['kv_cache_dtype']!r}: use one of {', '.join(CACHE_DTYPES)}")
    if not 1 <= int(options["max_new_tokens"]) < context:
        raise _refused(f"max_new_tokens={options['max_new_tokens']}: use 1 to {context - 1} (the model's context "
                       f"is {context} tokens, prompt included)")
    if not 0 <= float(options["temperature"]) < math.inf:
        raise _refused(f"temperature={options['temperature']}: use 0 (greedy) or more")
    if not 0 < float(options["top_p"]) <= 1:
        raise _refused(f"top_p={options['top_p']}: use a value above 0 and at most 1")
    if int(options["top_k"]) < 0:
        raise _refused(f"top_k={options['top_k']}: use 0 (off) or more")
    if options["seed"] is not None and not 0 <= int(options["seed"]) < 2**63:
        raise _refused(f"seed={options['seed']}: use a whole number from 0 to 2**63 - 1")


def _requirements() -> list[str]:
    """Pinned runtime libraries, recorded with the model for reference."""
    return [f"{name}=={Version(metadata.version(name)).public}" for name in RUNTIME_PACKAGES]


def log_model(tracker: Tracker, run_id: str, model_dir: str | Path, name: str = MODEL_NAME) -> str:
    """Log the model directory's files as a pyfunc model output of `run_id`; return its `models:/`
    URI. Its subdirectories (the training checkpoints, with their optimizer state several
    times the weights' size) stay in the workspace."""
    client = tracker.client
    logged = client.create_logged_model(
        tracker.experiment_id, name=name, source_run_id=run_id, params=client.get_run(run_id).data.params
    )
    try:
        with tempfile.TemporaryDirectory() as tmp:
            files = Path(tmp) / Path(model_dir).name  # the artifact keeps the directory's name
            files.mkdir()
            for path in Path(model_dir).iterdir():
                if path.is_file():
                    shutil.copy2(path, files / path.name)
            local = Path(tmp) / "model"
            mlmodel = Model(
                artifact_path=logged.artifact_location,
                model_uuid=logged.model_id,
                run_id=run_id,
                model_id=logged.model_id,
            )
            save_model(
                path=str(local),
                mlflow_model=mlmodel,
                python_model=str(SERVED_MODEL_CODE),
                artifacts={"model": str(files)},
                signature=SIGNATURE,
                input_example=INPUT_EXAMPLE,
                pip_requirements=_requirements(),
            )
            client.log_model_artifacts(logged.model_id, str(local))
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    except BaseException:
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    return f"models:/{logged.model_id}"


def register(
    tracker: Tracker,
    model_uri: str,
    run_id: str,
    tags: Mapping[str, Any] | None = None,
    name: str = MODEL_NAME,
    description: str | None = None,
) -> int:
    """Register `model_uri` as a new version of `name`, aliased `challenger`; return the version."""
    client = tracker.client
    try:
        client.create_registered_model(name, description=DESCRIPTION)
    except MlflowException as exc:
        if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
    # The logged model's own location, not its models:/ URI: MLflow's SQL registry resolves
    # that URI through the process-wide tracking URI, not this tracker's.
    logged = client.get_logged_model(model_uri.removeprefix("models:/"))
    version = client.create_model_version(
        name,
        source=logged.artifact_location,
        run_id=run_id,
        tags={key: str(value) for key, value in (tags or {}).items()},
        model_id=logged.model_id,
        description=description,
    )
    # Link the logged model to its version, as `mlflow.register_model` does (shown in the UI).
    linked = json.loads(logged.tags.get(MLFLOW_MODEL_VERSIONS, "[]"))
    linked.append({"name": name, "version": int(version.version)})
    client.set_logged_model_tags(logged.model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(linked)})
    make_challenger(tracker, int(version.version), name)
    return int(version.version)


def make_challenger(tracker: Tracker, version: int, name: str = MODEL_NAME) -> None:
    """Make `version` the challenger: the latest model a run registered, or found registered."""
    tracker.client.set_registered_model_alias(name, CHALLENGER, str(version))


def promote(tracker: Tracker, version: int, name: str = MODEL_NAME) -> None:
    """Make `version` the champion: the one served and compared against."""
    tracker.client.set_registered_model_alias(name, CHAMPION, str(version))


def champion_version(tracker: Tracker, name: str = MODEL_NAME) -> int | None:
    """The champion's version number, or None before any version has won."""
    for model in tracker.client.search_registered_models(filter_string=f"name = '{name}'"):
        if CHAMPION in model.aliases:
            return int(model.aliases[CHAMPION])
    return None
