"""Using a trained model: find it, generate with it, chat with it, look inside it, export it.

A model is named by a REF: a registered version (`models:/tinyseek@champion`, the default;
`models:/tinyseek@challenger`; `models:/tinyseek/3`), a logged model (`models:/m-<id>`), an
MLflow run (`runs:/<run_id>/<path>`, or a bare run id: the model it logged, else the one
its pretrain or finetune stage wrote into the workspace) or a local model directory. MLflow
refs are resolved through an explicit client on the workspace's tracking store (never the
process-wide MLflow URIs) down to a concrete artifact location, and the model's files are
downloaded once into `<workspace>/models-cache/<key>/` (the user's cache directory when the
workspace cannot be written, e.g. a shared read-only copy); registered versions and logged
models are immutable, so an alias that moves simply points at another cache entry.
Training checkpoints that travel inside a logged model directory are not downloaded.

Each CLI command is one call here: `complete` (generate), `chat_loop` (chat),
`next_token` + `format_table` (next-token) and `export_hf` (export-hf).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TextIO

import mlflow
import torch
from mlflow.entities import FileInfo
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from tokenizers import Tokenizer
from tokenizers.processors import TemplateProcessing

from model.checkpoint import MODEL_CONFIG_FILE, MODEL_FILE, load_model, one_line
from model.generate import CACHE_DTYPES, generate, stream
from model.hf import export_hf as export_hf_weights
from model.perf import cpp_compiler
from model.transformer import Transformer
from tasks.chat import (BOS, END, EOS, PAD, SPECIAL_TOKENS, encode_text, hf_tokenizer_files, read_tokenizer,
                        render_prompt)
from tasks.stage import StageError, resolve_device, user_cache
from tasks.tokenize import show_token, write_tokenizer_json
from tasks.tracking import EXPERIMENT, moved, moved_root, readable_store, tracking_uri, workspace_move

DEFAULT_REF = "models:/tinyseek@champion"
MODEL_FILES = (MODEL_FILE, MODEL_CONFIG_FILE)
TOKENIZER_FILE = "tokenizer.json"
CACHE_DIR = "models-cache"
DEFAULT_MAX_NEW_TOKENS = 64
EXIT_COMMANDS = ("/exit", "/quit")
RESET_COMMAND = "/reset"
COMMAND_LIKE = re.compile(r"/[A-Za-z]+$")
HELP_COMMAND = "/help"
CHAT_HELP = f"{RESET_COMMAND} clears the conversation, {' or '.join(EXIT_COMMANDS)} (or Ctrl-D) ends the chat"
REF_FORMS = "a model directory, models:/NAME@ALIAS, models:/NAME/VERSION, models:/m-<id>, runs:/RUN_ID/PATH or a run id"

REGISTERED = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")
LOGGED_MODEL = re.compile(r"^models:/(?P<model_id>m-[0-9a-f]+)/?$")
RUN_URI = re.compile(r"^runs:/(?P<run_id>[0-9a-f]+)(?:/(?P<path>.*))?$")
RUN_ID = re.compile(r"^[0-9a-f]{32}$")


# --- finding a model -------------------------------------------------------------------


def is_model_dir(path: Path) -> bool:
    return all((path / name).is_file() for name in MODEL_FILES)


def resolve_model(ref: str, workspace: Path) -> Path:
    """A local directory holding the model named by `ref` (see the module docstring).

    Raises `StageError` with one line saying what was tried and what exists.
    """
    local = Path(ref).expanduser()
    if local.exists():
        if not local.is_dir() or not is_model_dir(local):
            raise StageError(f"{local} is not a model directory: it needs {' and '.join(MODEL_FILES)}")
        return local.resolve()
    if not ref.startswith(("models:/", "runs:/")) and not RUN_ID.match(ref):
        raise StageError(f"no model directory at {local}; --model takes {REF_FORMS}")
    registry = _Registry(tracking_uri(workspace))  # first: without a store, nothing is created
    return registry.fetch(ref, model_cache(Path(workspace)))


def model_cache(workspace: Path) -> Path:
    """Where models from the tracking store are downloaded: `<workspace>/models-cache`, else,
    when that cannot be written, `tinyseek/models-cache` in the user's cache directory."""
    cache = workspace / CACHE_DIR
    try:
        cache.mkdir(parents=True, exist_ok=True)
        if os.access(cache, os.W_OK):
            return cache
    except OSError:
        pass
    return user_cache() / CACHE_DIR


class _Registry:
    """Resolves MLflow refs to artifact locations and downloads model directories from them."""

    def __init__(self, uri: str):
        path = Path(uri.removeprefix("sqlite:///"))
        if uri.startswith("sqlite:///") and not path.is_file():
            if os.environ.get("MLFLOW_TRACKING_URI"):  # the variable, not the workspace, named it
                raise StageError(f"no MLflow store at {path}, where MLFLOW_TRACKING_URI={uri} points: fix or unset it")
            raise StageError(
                f"no MLflow store at {path} (train a model into this workspace first: `tinyseek run "
                f"--workspace {path.parent}`, or set MLFLOW_TRACKING_URI to a server)"
            )
        self.uri = uri
        with readable_store(uri):
            self.client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)

    def fetch(self, ref: str, cache: Path) -> Path:
        try:
            candidates = self._candidates(ref)
            key = hashlib.sha256(f"{self.uri}\n{candidates[0][0]}".encode()).hexdigest()[:16]
            if is_model_dir(cache / key):
                return cache / key
            for location, depth in candidates:
                model_uri = self._model_dir_uri(location, depth)
                if model_uri:
                    return self._download(model_uri, cache / key)
            if RUN_ID.match(ref) and (trained := self._stage_model(ref)):
                return trained
        except MlflowException as exc:
            raise StageError(f"{ref}: {one_line(exc.message)} (tracking store {self.uri})") from None
        raise StageError(f"{ref} holds no model directory (looked in {', '.join(loc for loc, _ in candidates)})")

    def _candidates(self, ref: str) -> list[tuple[str, int]]:
        """Artifact locations that may hold the model, each with how deep to look below it; in
        a workspace moved since (and only read here, so its store still names the old place),
        where they are now."""
        candidates = self._recorded_candidates(ref)
        experiment = self.client.get_experiment_by_name(EXPERIMENT)
        if experiment is None:
            return candidates
        recorded = experiment.artifact_location
        now = moved_root(recorded, self.uri)
        return [(moved(location, recorded, now), depth) for location, depth in candidates]

    def _recorded_candidates(self, ref: str) -> list[tuple[str, int]]:
        if match := REGISTERED.match(ref):
            version = self._version(match["name"], match["alias"], match["version"])
            return [(self.client.get_model_version_download_uri(match["name"], version), 0)]
        if match := LOGGED_MODEL.match(ref):
            return [(self.client.get_logged_model(match["model_id"]).artifact_location, 0)]
        if match := RUN_URI.match(ref):
            return self._run_candidates(match["run_id"], (match["path"] or "").strip("/"))
        if RUN_ID.match(ref):
            return self._run_candidates(ref, "")
        raise StageError(f"{ref} is not a reference this tool reads; --model takes {REF_FORMS}")

    def _version(self, name: str, alias: str | None, version: str | None) -> str:
        """The version number an alias or version names, checked against what is registered."""
        try:
            registered = self.client.get_registered_model(name)
        except MlflowException:
            names = [m.name for m in self.client.search_registered_models()]
            have = f"registered models: {', '.join(names)}" if names else "run `tinyseek run` first"
            raise StageError(f"no registered model {name!r} in {self.uri} ({have})") from None
        versions = sorted(int(v.version) for v in self.client.search_model_versions(f"name='{name}'"))
        aliases = registered.aliases
        listed = ", ".join(f"{a} -> v{v}" for a, v in sorted(aliases.items())) or "none"
        have = f"aliases: {listed}; versions: {', '.join(map(str, versions)) or 'none'}"
        if alias is not None:
            if alias not in aliases:
                raise StageError(
                    f"no model version with alias {alias!r} in registered model {name!r} ({have}; "
                    "run `tinyseek run` first or name a version)"
                )
            return str(aliases[alias])
        if int(version) not in versions:
            raise StageError(f"registered model {name!r} has no version {version} ({have})")
        return version

    def _stage_model(self, run_id: str) -> Path | None:
        """The model a run's stage wrote into the workspace, the fine-tuned one when the run
        fine-tuned: only `tinyseek run` logs one to MLflow, and a `pretrain` or `finetune`
        command's run (or its stage's own run) names its output folder in the stage run's
        `output` tag. None for a run without such a stage; an error when the stage wrote no
        model, or it is gone."""
        run = self.client.get_run(run_id)
        children = self.client.search_runs([run.info.experiment_id],
                                           filter_string=f"tags.mlflow.parentRunId = '{run_id}'")
        stages = {child.info.run_name: child for child in children}
        if MLFLOW_PARENT_RUN_ID in run.data.tags:  # a stage's own run
            stages[run.info.run_name] = run
        stage = next((stages[name] for name in ("finetune", "pretrain") if name in stages), None)
        if stage is None:
            return None
        name, output = stage.info.run_name, stage.data.tags.get("output")
        if not output:
            raise StageError(f"{run_id}: its {name} stage wrote no model (its run is {stage.info.status})")
        experiment = self.client.get_experiment(run.info.experiment_id)
        if now := moved_root(experiment.artifact_location, self.uri):  # a moved workspace, only read here
            output = moved(output, *map(str, workspace_move(experiment.artifact_location, now)))
        if not is_model_dir(Path(output)):
            raise StageError(f"{run_id}: the model its {name} stage wrote is no longer at {output}")
        return Path(output)

    def _run_candidates(self, run_id: str, path: str) -> list[tuple[str, int]]:
        """A run's logged models (newest first; `path` may start with a model's name); for a bare
        run id also those of its child runs (a pipeline run's model is logged by its `register`
        child); then the run's artifacts."""
        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            raise StageError(f"no MLflow run {run_id} in {self.uri}") from None
        experiment = run.info.experiment_id
        sources = [run_id]
        if not path:
            children = self.client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{run_id}'")
            sources += [child.info.run_id for child in children]
        head, _, rest = path.partition("/")
        found = [
            (_join(m.artifact_location, rest if path else ""), 0)
            for source in sources
            for m in self.client.search_logged_models(
                experiment_ids=[experiment], filter_string=f"source_run_id = '{source}'",
                order_by=[{"field_name": "creation_timestamp", "ascending": False}])
            if not path or m.name == head
        ]
        return [*found, (_join(run.info.artifact_uri, path), 0 if path else 1)]

    def _list(self, uri: str) -> list[FileInfo]:
        return mlflow.artifacts.list_artifacts(artifact_uri=uri, tracking_uri=self.uri)

    def _model_dir_uri(self, uri: str, depth: int) -> str | None:
        """Where the model files are: `uri` itself, the pyfunc `model` artifact of an MLmodel there,
        or (depth > 0) one of its subdirectories."""
        entries = self._list(uri)
        names = {PurePosixPath(entry.path).name: entry for entry in entries}
        if all(name in names for name in MODEL_FILES):
            return uri
        if "MLmodel" in names:
            with tempfile.TemporaryDirectory() as tmp:
                local = mlflow.artifacts.download_artifacts(
                    artifact_uri=_join(uri, "MLmodel"), dst_path=tmp, tracking_uri=self.uri
                )
                flavor = Model.load(local).flavors.get("python_function", {})
            artifact = flavor.get("artifacts", {}).get("model")
            if artifact:
                return self._model_dir_uri(_join(uri, artifact["path"]), 0)
        subdirs = [name for name, entry in names.items() if entry.is_dir] if depth > 0 else []
        return next(filter(None, (self._model_dir_uri(_join(uri, name), depth - 1) for name in subdirs)), None)

    def _download(self, uri: str, target: Path) -> Path:
        """Download the files (not subdirectories such as checkpoints) at `uri` into `target`, atomically."""
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        tmp.mkdir()
        try:
            for entry in self._list(uri):
                if not entry.is_dir:
                    name = PurePosixPath(entry.path).name
                    mlflow.artifacts.download_artifacts(
                        artifact_uri=_join(uri, name), dst_path=str(tmp), tracking_uri=self.uri
                    )
            os.rename(tmp, target)
        except OSError:
            if not is_model_dir(target):
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target


def _join(uri: str, path: str) -> str:
    return f"{uri.rstrip('/')}/{path}" if path else uri


# --- loading ---------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A model ready to generate: the network, its tokenizer, where they came from, the
    element type of its decode cache (None: the model's dtype; `model.generate.CACHE_DTYPES`),
    and whether it decodes compiled (`model.generate.compiled_step`)."""

    model: Transformer
    tokenizer: Tokenizer
    directory: Path
    cache_dtype: torch.dtype | None = None
    compile: bool = False

    def token_id(self, token: str) -> int:
        """The id of a special token (`load` makes sure the tokenizer has each)."""
        return self.tokenizer.token_to_id(token)

    @property
    def stop_ids(self) -> list[int]:
        """Tokens that end a reply: the end of a turn and the end of a document."""
        return [self.token_id(END), self.token_id(EOS)]

    @property
    def context(self) -> int:
        return self.model.config.max_position_embeddings


def load(ref: str, workspace: Path, device: str = "cpu", kv_cache_dtype: str = "auto",
         compile: bool = False) -> LoadedModel:
    """Resolve `ref` and load its model (eval mode) and tokenizer onto `device`; it decodes
    with a cache of `kv_cache_dtype` (a name in `CACHE_DTYPES`), compiled with `compile`."""
    if kv_cache_dtype not in CACHE_DTYPES:
        raise StageError(f"unknown KV cache dtype {kv_cache_dtype!r}: use one of {', '.join(CACHE_DTYPES)}")
    device = resolve_device(device, "--device", "--device cpu").type
    if compile and device == "cpu" and cpp_compiler() is None:  # said before loading, not at the first reply
        raise StageError("compiled decoding (--compile) needs a C++ compiler on a CPU and none was found "
                         "(g++, clang++ or $CXX): install one, or decode without --compile")
    directory = resolve_model(ref, workspace)
    if not (directory / TOKENIZER_FILE).is_file():
        raise StageError(f"{directory} has no {TOKENIZER_FILE}: a model directory carries its tokenizer")
    try:
        tokenizer = read_tokenizer(directory / TOKENIZER_FILE)
    except Exception as exc:  # tokenizers raises a bare Exception for a file it cannot read
        raise StageError(f"cannot load the tokenizer in {directory} ({one_line(exc)})") from None
    model = load_model(directory, device)
    missing = [token for token in SPECIAL_TOKENS if tokenizer.token_to_id(token) is None]
    if missing:
        raise StageError(f"the tokenizer in {directory} lacks the special tokens {', '.join(missing)}: it is not "
                         "one the pipeline trained")
    if tokenizer.get_vocab_size() > model.config.vocab_size:
        raise StageError(f"the tokenizer in {directory} has {tokenizer.get_vocab_size()} tokens and the model "
                         f"{model.config.vocab_size}: they come from different runs")
    return LoadedModel(model, tokenizer, directory, CACHE_DTYPES[kv_cache_dtype], compile)


# --- generating ------------------------------------------------------------------------


def prompt_ids(loaded: LoadedModel, prompt: str, *, chat: bool) -> list[int]:
    """Chat: one user turn in the chat format, ending with the assistant cue. Raw: BOS + the text."""
    if chat:
        return render_prompt([{"role": "user", "content": prompt}], loaded.tokenizer)
    return [loaded.token_id(BOS), *encode_text(loaded.tokenizer, prompt)]


def check_fits(loaded: LoadedModel, prompt_tokens: int, max_new_tokens: int = 0) -> None:
    context = loaded.context
    if max_new_tokens and prompt_tokens + max_new_tokens > context:
        raise StageError(f"the prompt is {prompt_tokens} tokens; with max_new_tokens={max_new_tokens} that exceeds "
                         f"the model's context of {context} tokens: shorten the prompt or lower max_new_tokens")
    if prompt_tokens > context:
        raise StageError(f"the prompt is {prompt_tokens} tokens, which exceeds the model's context of {context} "
                         "tokens: shorten the prompt")


def complete_ids(
    loaded: LoadedModel,
    prompt: str,
    *,
    chat: bool,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
) -> list[int]:
    """The completion's token ids, without the prompt and the stop token."""
    ids = prompt_ids(loaded, prompt, chat=chat)
    check_fits(loaded, len(ids), max_new_tokens)
    return generate(loaded.model, [ids], max_new_tokens, temperature, top_k, top_p, loaded.stop_ids, seed,
                    loaded.cache_dtype, loaded.compile)[0]


def complete(loaded: LoadedModel, prompt: str, *, chat: bool, **sampling: Any) -> str:
    """The model's completion of `prompt` (a reply to it as a user turn when `chat`);
    `sampling` takes `complete_ids`' options."""
    ids = complete_ids(loaded, prompt, chat=chat, **sampling)
    return loaded.tokenizer.decode(ids, skip_special_tokens=True)


def decode_incrementally(tokenizer: Tokenizer, tokens: Iterable[int]) -> Iterator[str]:
    """Text pieces as tokens arrive; a character split across tokens is held back until complete.

    The growing id list is decoded each time and the new suffix yielded: a byte-level token
    may carry part of a UTF-8 character, which decodes to U+FFFD until the rest arrives.
    """
    ids: list[int] = []
    shown = ""
    for token in tokens:
        ids.append(token)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if len(text) > len(shown) and not text.endswith("\ufffd"):
            yield text[len(shown):]
            shown = text
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if len(text) > len(shown):
        yield text[len(shown):]


def stream_reply(
    loaded: LoadedModel,
    messages: list[dict[str, str]],
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
) -> Iterator[str]:
    """The assistant's reply to a conversation, as text pieces while tokens are generated."""
    ids = render_prompt(messages, loaded.tokenizer)
    check_fits(loaded, len(ids), max_new_tokens)
    tokens = stream(loaded.model, ids, max_new_tokens, temperature, top_k, top_p, loaded.stop_ids, seed,
                    loaded.cache_dtype, loaded.compile)
    return decode_incrementally(loaded.tokenizer, tokens)


def trim_history(messages: list[dict[str, str]], tokenizer: Tokenizer, budget: int) -> list[dict[str, str]]:
    """The conversation without its oldest exchanges, so that its prompt fits in `budget` tokens.

    A leading system message and the latest user message are always kept.
    """
    head = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(head):]
    while len(turns) > 2 and len(render_prompt(head + turns, tokenizer)) > budget:
        turns = turns[2:]
    return head + turns


def chat_loop(
    loaded: LoadedModel,
    input_fn: Callable[[str], str] = input,
    output: TextIO = sys.stdout,
    *,
    system: str | None = None,
    name: str | None = None,
    **sampling: Any,
) -> None:
    """An interactive chat with the model `name` (else its directory): each reply streams
    to `output`; /reset clears the conversation; /exit, /quit, end of input (Ctrl-D) or
    Ctrl-C at the prompt end it; /help lists these, as does any other slash and word
    (`/rest`), which is not sent. Ctrl-C during a reply stops that
    reply. When the conversation outgrows the context, its oldest exchanges are dropped,
    with a note. `sampling` takes `stream_reply`'s options."""
    max_new_tokens = sampling.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    budget = loaded.context - max_new_tokens
    start = [{"role": "system", "content": system}] if system else []
    opening = len(render_prompt([*start, {"role": "user", "content": ""}], loaded.tokenizer))
    if opening >= budget:  # no message could ever be answered
        room = f"no room for a message in the model's context of {loaded.context} tokens"
        if system:
            raise StageError(f"the system message ({opening} tokens with the chat markup) and max_new_tokens="
                             f"{max_new_tokens} leave {room}: shorten --system or lower --max-new-tokens")
        raise StageError(f"max_new_tokens={max_new_tokens} leaves {room}: lower --max-new-tokens")
    messages = list(start)
    output.write(f"chatting with {name or loaded.directory} ({HELP_COMMAND} lists the commands)\n")
    while True:
        try:
            line = input_fn(">>> ").strip()
        except (EOFError, KeyboardInterrupt):
            output.write("\n")
            return
        if line in EXIT_COMMANDS:
            return
        if line == RESET_COMMAND:
            messages = list(start)
            output.write("(conversation cleared)\n")
            continue
        if line == HELP_COMMAND:
            output.write(f"({CHAT_HELP})\n")
            continue
        if COMMAND_LIKE.match(line):  # a mistyped command, not a message (a path such as /etc/hosts is one)
            output.write(f"(unknown command {line}: {CHAT_HELP})\n")
            continue
        if not line:
            continue
        asked = [*messages, {"role": "user", "content": line}]
        fitted = trim_history(asked, loaded.tokenizer, budget)
        needed = len(render_prompt(fitted, loaded.tokenizer))
        if needed > budget:  # the conversation so far stays as it was
            output.write(f"(message too long: the conversation needs {needed} tokens, the model reads {budget})\n")
            continue
        if len(fitted) < len(asked):
            dropped = (len(asked) - len(fitted)) // 2
            output.write(f"(the {dropped} oldest exchange{'s' * (dropped > 1)} dropped to fit the model's context "
                         f"of {loaded.context} tokens)\n")
        messages = fitted
        reply = ""
        try:
            for piece in stream_reply(loaded, messages, **sampling):
                reply += piece
                output.write(piece)
                output.flush()
        except KeyboardInterrupt:
            output.write(" [interrupted]")
        output.write("\n")
        output.flush()
        messages.append({"role": "assistant", "content": reply})


# --- looking inside --------------------------------------------------------------------


@torch.no_grad()
def next_token(loaded: LoadedModel, prompt: str, top: int = 10, *, chat: bool = False) -> list[tuple[str, float]]:
    """The `top` most probable next tokens after `prompt` and their probabilities, most probable first."""
    ids = prompt_ids(loaded, prompt, chat=chat)
    check_fits(loaded, len(ids))
    device = loaded.model.embed_tokens.weight.device
    logits = loaded.model(torch.tensor([ids], device=device)).logits[0, -1]
    probs = logits.float().softmax(-1)
    values, indices = probs.topk(min(top, probs.numel()))
    return [(show_token(loaded.tokenizer, i), p) for p, i in zip(values.tolist(), indices.tolist())]


def format_table(rows: list[tuple[str, float]], bar_width: int = 20) -> str:
    """Rows of (token, probability) as an aligned table with a bar per probability."""
    width = max([len("token"), *(len(token) for token, _ in rows)])
    lines = [f"{'#':>3}  {'prob':>7}  {'token':<{width}}  "]
    for rank, (token, prob) in enumerate(rows, 1):
        lines.append(f"{rank:>3}  {prob:>7.2%}  {token:<{width}}  {'█' * round(prob * bar_width)}")
    return "\n".join(line.rstrip() for line in lines)


# --- exporting -------------------------------------------------------------------------


def tokenizer_files(loaded: LoadedModel) -> dict[str, dict[str, Any]]:
    """`tokenizer_config.json`, `special_tokens_map.json` and `generation_config.json` for transformers."""
    return {
        **hf_tokenizer_files(model_max_length=loaded.context),
        "generation_config.json": {
            "bos_token_id": loaded.token_id(BOS),
            "eos_token_id": [loaded.token_id(EOS), loaded.token_id(END)],
            "pad_token_id": loaded.token_id(PAD),
        },
    }


def hf_tokenizer(loaded: LoadedModel) -> Tokenizer:
    """The model's tokenizer, adding <|bos|> before plain text as `prompt_ids` does, so that
    `AutoTokenizer` gives a prompt the same conditioning. Chat templates already start with
    it, and `apply_chat_template` adds no special tokens of its own."""
    tokenizer = Tokenizer.from_str(loaded.tokenizer.to_str())
    bos = (BOS, loaded.token_id(BOS))
    tokenizer.post_processor = TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B:1", special_tokens=[bos])
    return tokenizer


# the hidden folder inside an export's folder that its files are written into first
EXPORT_STAGING = ".tinyseek-export-"


def check_export_folder(out_dir: Path) -> None:
    """Refuse a folder holding a tinyseek model (the exported one itself, or a stage's
    output): both formats name their weights `model.safetensors`."""
    if (out_dir / MODEL_CONFIG_FILE).exists():
        raise StageError(f"{out_dir} holds a tinyseek model ({MODEL_CONFIG_FILE}): the export would replace its "
                         "weights; choose another --out")


def export_hf(loaded: LoadedModel, out_dir: Path) -> Path:
    """Write a directory `transformers` loads with `AutoModelForCausalLM` and `AutoTokenizer`:
    the DeepseekV3 weights and config, the tokenizer with the chat template, and a generation
    config that stops at the end of a turn.

    The files are written into a hidden folder inside `out_dir` (`EXPORT_STAGING`: on the
    filesystem of their place, writable as it is) and moved into place only once all are
    written: an export that fails (a full disk, Ctrl-C) leaves `out_dir` as it was (a folder
    it made is removed again), rather than half an export that the next try would have to
    `--force` over. The next export removes what one killed midway left there."""
    check_export_folder(out_dir)
    made, done = not out_dir.exists(), False
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for leftover in out_dir.glob(f"{EXPORT_STAGING}*"):
            shutil.rmtree(leftover, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=EXPORT_STAGING, dir=out_dir))
    except OSError as exc:
        raise StageError(f"cannot write the export to {out_dir}: {exc.strerror or exc}") from None
    try:
        export_hf_weights(loaded.model, staging)
        write_tokenizer_json(hf_tokenizer(loaded), staging / TOKENIZER_FILE)
        for name, content in tokenizer_files(loaded).items():
            (staging / name).write_text(json.dumps(content, indent=2))
        for file in sorted(staging.iterdir()):
            os.replace(file, out_dir / file.name)
        done = True
    except OSError as exc:
        raise StageError(f"cannot write the export to {out_dir}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if made and not done:
            with contextlib.suppress(OSError):
                out_dir.rmdir()
    return out_dir
