"""The pipeline's configuration: one pydantic model with a section per stage.

A run's config is built in layers: the stage defaults, then a preset from `configs/`
(`tiny`, `demo`, `gpu-small`, ...), then an optional YAML file, then `--set a.b=value`
overrides. Unknown names are errors that suggest the closest valid name.
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, TypeAdapter, ValidationError, ValidationInfo, field_validator, model_validator

from model.config import ConfigError, ModelConfig
from tasks.clean import CleanConfig
from tasks.collect import CollectConfig
from tasks.evaluate_config import EvaluateConfig, metric_names
from tasks.instructions import InstructionConfig
from tasks.settings import Settings, refuse_bool
from tasks.stage import REPO_ROOT, StageError
from tasks.tokenize import TokenizeConfig
from tasks.training_config import TrainingConfig

PRESETS_DIR = REPO_ROOT / "configs"

# model fields the tokenizer decides: a value in the model section would be overridden
FROM_TOKENIZER = {"vocab_size": "set tokenize.vocab_size instead", "bos_token_id": "the tokenizer's <bos> sets it",
                  "eos_token_id": "the tokenizer's <eos> sets it", "pad_token_id": "the tokenizer's <pad> sets it"}


class PipelineConfig(Settings):
    """Everything one `build-llm` run needs, stage by stage."""

    preset: str = Field("custom", description="Name of the preset these values came from.")
    collect: CollectConfig = Field(default_factory=CollectConfig, description="Where the corpus comes from.")
    clean: CleanConfig = Field(default_factory=CleanConfig, description="Normalisation, filters, dedup, decontamination.")
    tokenize: TokenizeConfig = Field(default_factory=TokenizeConfig, description="BPE tokenizer and token shards.")
    instructions: InstructionConfig = Field(
        default_factory=InstructionConfig, description="Labeled instruction data for fine-tuning and evaluation."
    )
    model: dict[str, Any] = Field(
        default_factory=dict,
        description="DeepSeek-V3 architecture (HF DeepseekV3Config field names); vocab_size comes from the tokenizer.",
    )
    pretrain: TrainingConfig = Field(default_factory=TrainingConfig, validate_default=True,
                                     description="Pretraining on the token shards.")
    finetune: TrainingConfig = Field(
        default_factory=lambda: TrainingConfig(steps=200, lr=1e-3, min_lr=1e-4, warmup_steps=10),
        validate_default=True, description="Instruction fine-tuning from the pretrained model.",
    )
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig, description="What to measure after training.")

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, name: str) -> str:
        """A misspelt preset would otherwise leave every value at the stage defaults."""
        available = presets()
        if name != "custom" and name not in available:
            raise ValueError(f"unknown preset {name!r}; {_suggest(name, available)}")
        return name

    @field_validator("pretrain", "finetune")
    @classmethod
    def _named(cls, section: TrainingConfig, info: ValidationInfo) -> TrainingConfig:
        """The section knows its name, which its messages use (`pretrain.device`)."""
        section._section = info.field_name
        return section

    @field_validator("model")
    @classmethod
    def _model_fields(cls, values: dict[str, Any]) -> dict[str, Any]:
        return model_section(values)

    @model_validator(mode="after")
    def _consistent(self) -> PipelineConfig:
        """What can be checked before any stage runs, so that a run does not fail after hours
        of training: the model's shape (with a placeholder vocabulary), the sequence lengths
        and evaluation's answer length against its context, and the promotion metric against the metrics evaluate writes."""
        model = self._placeholder_model()
        if self.finetune.init_from is not None:
            raise ValueError("finetune.init_from: fine-tuning starts from this run's pretrained model; to start from "
                             "another model, set pretrain.init_from")
        for stage in ("pretrain", "finetune"):
            seq_len = getattr(self, stage).seq_len
            if seq_len > model.max_position_embeddings:
                raise ValueError(f"{stage}.seq_len={seq_len} exceeds model.max_position_embeddings="
                                 f"{model.max_position_embeddings}: lower one or raise the other")
        if self.evaluate.max_new_tokens >= model.max_position_embeddings:
            raise ValueError(f"evaluate.max_new_tokens={self.evaluate.max_new_tokens} leaves no room for a prompt "
                             f"within model.max_position_embeddings={model.max_position_embeddings}: lower one or "
                             "raise the other")
        families = [*self.instructions.families, *(["user"] if self.instructions.user_data else [])]
        metric, known = self.evaluate.primary_metric, metric_names(families)
        if metric not in known:
            close = difflib.get_close_matches(metric, known, n=3, cutoff=0.6)
            hint = ("did you mean " + " or ".join(close) + "?" if close else
                    "use one of " + ", ".join(name for name in known if not name.endswith(("_base", "_tuned")))
                    + " (the fine-tuned model's; with a _base suffix the pretrained model's)")
            raise ValueError(f"evaluate.primary_metric={metric!r} is not a metric evaluate writes; {hint}")
        return self

    @model_validator(mode="before")
    @classmethod
    def _preset_underneath(cls, data: Any) -> Any:
        """A known `preset` supplies every value the data leaves out, so a deployment or a UI
        form can say `{"preset": "demo", "pretrain": {"steps": 50}}` and get the rest of demo."""
        if isinstance(data, dict) and isinstance(data.get("preset"), str) and data["preset"] in presets():
            return merge(_read_yaml(PRESETS_DIR / f"{data['preset']}.yaml"), data)
        return data

    def with_model_defaults(self) -> dict[str, Any]:
        """The whole config as plain values, the model section with every setting, its defaults
        too, but those the tokenizer decides later (vocabulary size, special token ids)."""
        model = self._placeholder_model().to_dict()
        return {**self.model_dump(mode="json"), "model": {k: v for k, v in model.items() if k not in FROM_TOKENIZER}}

    def model_identity(self) -> dict[str, Any]:
        """The model section as it decides the network, for fingerprints: every setting (a
        default restated builds the same model), and an integer where a float is wanted as the
        float (rope_theta 10000 and 10000.0 are one model)."""
        types = typing.get_type_hints(ModelConfig)
        model = self.with_model_defaults()["model"]
        return {name: float(value) if types[name] is float and isinstance(value, int) else value
                for name, value in model.items()}

    def training_identity(self, stage: str, *ignored: str) -> dict[str, Any]:
        """`TrainingConfig.identity` of the pretrain or finetune section, for its fingerprint;
        without MTP modules in the model `mtp_lambda` weighs nothing and is left out too."""
        if not self._placeholder_model().num_nextn_predict_layers:
            ignored = (*ignored, "mtp_lambda")
        return getattr(self, stage).identity(*ignored)

    def _placeholder_model(self) -> ModelConfig:
        """The model config before the tokenizer exists: its vocabulary size as configured."""
        return ModelConfig.from_dict({**self.model, "vocab_size": max(self.tokenize.vocab_size, 8)})

    def model_for(self, vocab_size: int, special_ids: dict[str, int]) -> ModelConfig:
        """The model config with the tokenizer's vocabulary and special token ids filled in."""
        values = {**self.model, "vocab_size": vocab_size, **special_ids}
        try:
            return ModelConfig.from_dict(values)
        except ConfigError as exc:
            raise StageError(str(exc)) from None


def presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def model_section(values: dict[str, Any]) -> dict[str, Any]:
    """The model section with each value of the type `ModelConfig` declares, read as the other
    sections' values are ('256' from a --set becomes 256, '1e-6' a float, 32.5 or true for an
    integer is an error); an integer stays as written where a float is wanted. Unknown names, and the
    fields the tokenizer decides, are errors."""
    types = typing.get_type_hints(ModelConfig)
    out: dict[str, Any] = {}
    for name, value in values.items():
        if name in FROM_TOKENIZER:
            raise ValueError(f"model.{name} comes from the tokenizer: {FROM_TOKENIZER[name]}")
        if name not in types:
            raise ValueError(f"unknown model field {name!r}; {_suggest(name, list(types))}")
        refuse_bool(value, types[name], f"model.{name}")
        try:
            typed = TypeAdapter(types[name]).validate_python(value)
        except ValidationError as exc:
            raise ValueError(f"model.{name}={value!r}: {exc.errors()[0]['msg']}") from None
        keep = isinstance(value, int) and not isinstance(value, bool) and isinstance(typed, float)
        out[name] = value if keep else typed
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise StageError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise StageError(f"config file {path} is a directory: give the path of a .yaml file") from None
    except OSError as exc:
        raise StageError(f"cannot read config file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise StageError(f"config file {path} is not a text file: give the path of a .yaml file") from None
    except yaml.YAMLError as exc:
        raise StageError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise StageError(f"config file {path} must hold a mapping of sections (collect:, model:, pretrain:, ...)")
    return data


def switched_preset(config: PipelineConfig, prefilled: dict[str, Any] | None,
                    submitted: dict[str, Any] | None) -> PipelineConfig:
    """`config`, validated from `submitted`, as meant by a form prefilled with `prefilled` (a
    deployment's whole config, of one preset) whose preset was changed: the new preset's
    values, with every field the form changed on top. A whole config leaves no field for the
    preset to fill, so taken as it is it would be the old preset's values under the new
    preset's name. A config submitted in part (`--params` or the API: a preset and what differs
    from it) already has its preset underneath, and each value it names counts, the same as the
    deployment's or not. Any other `config` is returned as is."""
    if not prefilled or prefilled.get("preset") == config.preset:
        return config
    if submitted is not None and not set(prefilled) <= set(submitted):
        return config
    return PipelineConfig.model_validate(_changes(prefilled, config.model_dump(mode="json")))


def _changes(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The entries of `new` that differ from `base`, mappings compared entry by entry."""
    out = {}
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            if inner := _changes(base[key], value):
                out[key] = inner
        elif key not in base or base[key] != value:
            out[key] = value
    return out


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _valid_keys(node: Any) -> list[str]:
    return list(type(node).model_fields) if isinstance(node, BaseModel) else []


def apply_set(values: dict[str, Any], assignment: str, defaults: PipelineConfig) -> dict[str, Any]:
    """Apply one `a.b.c=value` (value parsed as YAML) after checking the path exists."""
    if "=" not in assignment:
        raise StageError(f"--set {assignment!r}: expected key.path=value, e.g. pretrain.steps=100")
    path, raw = assignment.split("=", 1)
    keys = path.strip().split(".")
    if keys == ["preset"]:  # --preset (or a file's preset:) chooses it; here it would silently replace theirs
        raise StageError(f"--set {assignment.strip()}: choose the preset with --preset {raw.strip()}")
    node: Any = defaults
    model_section = keys[0] == "model"
    for depth, key in enumerate(keys):
        if model_section and depth == 1:
            valid = list(ModelConfig.__dataclass_fields__)
            if key not in valid:
                raise StageError(f"--set {path}: unknown key {key!r}; {_suggest(key, valid)}")
            break
        if isinstance(node, dict):  # a mapping field (e.g. train_counts): validation checks its keys
            break
        if isinstance(node, list):
            whole = ".".join(keys[:depth])
            raise StageError(f"--set {path}: {whole} is a list; set it whole, e.g. --set '{whole}=[...]' "
                             f"(a YAML list, as in a config file)")
        valid = _valid_keys(node)
        if key not in valid:
            raise StageError(f"--set {path}: unknown key {key!r}; {_suggest(key, valid)}")
        node = getattr(node, key) if isinstance(node, BaseModel) else node[key]
    try:
        nested: Any = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise StageError(f"--set {path}: {raw!r} is not a valid YAML value ({str(exc).splitlines()[0]})") from None
    for key in reversed(keys):
        nested = {key: nested}
    return merge(values, nested)


def _closest(key: str, valid: list[str]) -> list[str]:
    return difflib.get_close_matches(key, valid, n=3, cutoff=0.5)


def _suggest(key: str, valid: list[str]) -> str:
    close = _closest(key, valid)
    if close:
        return "did you mean " + " or ".join(close) + "?"
    return "valid keys: " + ", ".join(valid)


def load_config(
    preset: str | None = "tiny",
    config_file: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    fallback: str | None = None,
) -> PipelineConfig:
    """Defaults <- preset <- YAML file <- --set overrides, validated. The preset is `preset`, else
    the file's `preset:`, else `fallback`; a `preset` and a file's that differ are an error,
    since either way one of them would be silently ignored."""
    written = _read_yaml(Path(config_file)) if config_file else {}
    named = written.get("preset")
    if preset and named is not None and named != preset:
        raise StageError(f"--preset {preset} but {config_file} says preset: {named}; keep one of them")
    preset = preset or (None if named is not None else fallback)
    values: dict[str, Any] = {}
    if preset:
        available = presets()
        if preset not in available:
            raise StageError(f"unknown preset {preset!r}; {_suggest(preset, available)}")
        values["preset"] = preset
    values = merge(values, written)
    defaults = PipelineConfig()
    for assignment in overrides:
        values = apply_set(values, assignment, defaults)
    try:
        return PipelineConfig.model_validate(values)
    except ValidationError as exc:
        raise StageError(config_error(exc) + _yaml_hint(exc, overrides)) from None


def _yaml_hint(exc: ValidationError, overrides: list[str] | tuple[str, ...]) -> str:
    """How to pass text that YAML reads as something else ('a: b' is a mapping, 'yes' true),
    when such a --set value is what a text field refused; and that `{kind:files}` is one
    key 'kind:files' to YAML, which needs a space after the colon."""
    refused = {".".join(str(p) for p in error["loc"]) for error in exc.errors() if error["type"] == "string_type"}
    for assignment in overrides:
        key, _, raw = assignment.partition("=")
        value = yaml.safe_load(raw)
        if key.strip() in refused and not isinstance(value, str):
            return f"; --set reads values as YAML: quote text, e.g. --set '{key.strip()}=\"{raw}\"'"
        if glued := _glued_key(value):
            return f"; --set reads values as YAML, where {glued!r} is one key: write a space after the colon"
    return ""


def _glued_key(value: Any) -> str | None:
    """A mapping key in `value` (at any depth) that holds `key:value` without a space."""
    if isinstance(value, list):
        return next((glued for item in value if (glued := _glued_key(item))), None)
    if isinstance(value, dict):
        return next((key for key in value if isinstance(key, str) and ":" in key), None) or next(
            (glued for item in value.values() if (glued := _glued_key(item))), None)
    return None


def config_error(exc: ValidationError, shown: int = 4) -> str:
    """A config's problems on one line: where and what, the first `shown` of them, and how
    many more. A misspelt name comes first, as the likely cause of the others, with the
    closest valid names; a missing name among those is not listed again (`path:` for
    `paths:` is an unknown name and a missing one)."""
    errors = sorted(exc.errors(), key=lambda error: error["type"] != "extra_forbidden")
    meant = {(*error["loc"][:-1], name) for error in errors if error["type"] == "extra_forbidden"
             for name in _closest(str(error["loc"][-1]), _fields_at(error["loc"][:-1]))}
    errors = [error for error in errors if not (error["type"] == "missing" and tuple(error["loc"]) in meant)]
    problems = [_problem(error) for error in errors]
    (where, what), others = problems[0], [f"{where}: {what}" if where else what for where, what in problems[1:shown]]
    more = [f"and {len(problems) - shown} more"] if len(problems) > shown else []
    return "; ".join([f"config{' ' + where if where else ''}: {what}", *others, *more])


def _problem(error: dict[str, Any]) -> tuple[str, str]:
    """Where and what of one validation error (no where when the message names the field)."""
    where = ".".join(str(p) for p in error["loc"] if p != "[key]")  # a bad mapping key: name the key
    what = error["msg"].removeprefix("Value error, ")  # a validator's own message, which may name the field
    if error["type"] == "extra_forbidden":
        valid = _fields_at(error["loc"][:-1])
        what = f"unknown name; {_suggest(str(error['loc'][-1]), valid)}" if valid else what
    return ("" if what.startswith(f"{where}.") else where), what


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """The field names of the config section at `loc` (list items and a tagged union's tag
    followed through the types), or [] where that cannot be told."""
    node: Any = PipelineConfig
    for part in loc:
        node = _inner(node, part)
        if node is None:
            return []
    return list(node.model_fields) if isinstance(node, type) and issubclass(node, BaseModel) else []


def _inner(node: Any, part: Any) -> Any:
    if isinstance(part, int):  # a list item: the list's model was found already
        return node
    if isinstance(node, type) and issubclass(node, BaseModel):
        field = node.model_fields.get(str(part))
        return _model_in(field.annotation) if field else None
    members = [m for m in _members(node) if getattr(m.model_fields.get("kind"), "default", None) == part]
    return members[0] if members else None  # a tagged union, e.g. a collect source by its kind


def _model_in(annotation: Any) -> Any:
    """The model a field holds, directly, in a list, or as a union of models (kept as is)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is list and args:
        return _model_in(args[0])
    if typing.get_origin(annotation) is typing.Annotated:
        return _model_in(args[0])
    return annotation if _members(annotation) else (_model_in(args[0]) if len(args) == 1 else None)


def _members(annotation: Any) -> list[type[BaseModel]]:
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return [a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
