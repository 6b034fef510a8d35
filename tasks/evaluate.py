"""The evaluate stage: how good the pretrained (base) and the fine-tuned model are, side by side.

Both models are measured the same way, so the effect of fine-tuning is visible:

- validation loss (nats per token) and bits per byte on the held-out validation tokens;
  bits per byte divides out the tokenizer, so runs with different vocabularies compare;
- exact match on the held-out instruction problems, per task family: a greedy answer is
  right when it equals the expected one after `normalize_answer`;
- MoE health: the share of validation tokens routed to each expert of each MoE layer,
  and its MaxVio, next to the MaxVio the training runs ended with;
- greedy generations for fixed prompts and the most likely next tokens, for people to read.

The output (`evaluate/<fingerprint>/`) holds `metrics.json`, one flat dict whose names end
in `_base` or `_tuned` but for `max_vio_final` (the MaxVio fine-tuning ended with, when it
recorded one), and the tables as Parquet. Whether the fine-tuned model beats the
registered champion is deliberately not part of it: the champion changes independently of
this stage's inputs, so `compare_with_champion` and `decide_promotion` are cheap pure
functions the flow calls after `evaluate` on every run, whether the stage was reused or not.
Scores compare only when measured on the same things: the manifest's `measured_on` holds a
digest per kind of score (`measured_on`), which the registry keeps beside them.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

import model.fused
import model.generate
import tasks.chat
import tasks.files
import tasks.instructions
from model.checkpoint import MODEL_CONFIG_FILE, load_model
from model.data import eval_batches
from model.generate import CACHE_DTYPES, generate
from model.transformer import Transformer
from tasks.chat import BOS, END, EOS, encode_text, read_tokenizer, render_prompt
from tasks.evaluate_config import EvaluateConfig
from tasks.instructions import Example, InstructionConfig, build_examples, normalize_answer
from tasks.stage import Ref, StageError, code_version, fingerprint, json_digest, resolve_device, run_stage, workspace
from tasks.tokenize import show_token

MODELS = ("base", "tuned")
METRICS_FILE = "metrics.json"
# metric names containing one of these are better when lower
LOWER_IS_BETTER = ("loss", "bpb", "max_vio")
MAX_VIO_KEY = "max_vio/moe_"
NEXT_TOKEN_COLUMNS = ["rank", "token", "token_id", "probability", "prompt"]

Messages = list[dict[str, str]]
ChatFn = Callable[[list[Messages]], list[str]]


# ---------------------------------------------------------------------------
# Metrics


def exact_match(predictions: Sequence[str], answers: Sequence[str]) -> float:
    """Share of predictions equal to their answer after `normalize_answer` (0.0 when there are none)."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    if not answers:
        return 0.0
    hits = sum(normalize_answer(p) == normalize_answer(a) for p, a in zip(predictions, answers))
    return hits / len(answers)


def bits_per_byte(mean_loss_nats_per_token: float, bytes_per_token: float) -> float:
    """Cross-entropy in bits per UTF-8 byte of text: independent of the tokenizer."""
    if bytes_per_token <= 0:
        raise ValueError(f"bytes_per_token must be positive, got {bytes_per_token}")
    return mean_loss_nats_per_token / math.log(2) / bytes_per_token


def _device_of(net: torch.nn.Module) -> torch.device:
    return next(net.parameters()).device


@torch.no_grad()
def validation_loss(net: Transformer, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float | None:
    """Mean next-token cross-entropy (nats per target token), or None when the batches hold no targets."""
    device = _device_of(net)
    total, count = 0.0, 0
    for inputs, targets in batches:
        logits = net(inputs.to(device)).logits
        targets = targets.to(device)
        losses = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")
        total += float(losses)
        count += int((targets != -100).sum())
    return total / count if count else None


@contextmanager
def routed_load(net: Transformer) -> Iterator[torch.Tensor]:
    """Count the tokens routed to each expert while the block runs: yields [MoE layers, experts].

    Rows follow `net.moe_layers()`, the order of the trainer's `max_vio/moe_<i>` metrics.
    """
    layers = net.moe_layers()
    experts = layers[0].config.n_routed_experts if layers else 0
    loads = torch.zeros(len(layers), experts)

    def counter(row: int):
        def hook(_module, _inputs, outputs) -> None:
            loads[row] += torch.bincount(outputs[1].flatten(), minlength=experts).float().cpu()

        return hook

    handles = [moe.gate.register_forward_hook(counter(row)) for row, moe in enumerate(layers)]
    try:
        yield loads
    finally:
        for handle in handles:
            handle.remove()


def expert_load_table(loads: torch.Tensor) -> pd.DataFrame:
    """(layer, expert, share): each expert's share of its layer's routed tokens; layers that saw none are left out."""
    rows = [
        {"layer": layer, "expert": expert, "share": float(count / row.sum())}
        for layer, row in enumerate(loads)
        if row.sum() > 0
        for expert, count in enumerate(row)
    ]
    return pd.DataFrame(rows, columns=["layer", "expert", "share"])


def max_vio(shares: pd.Series) -> float:
    """MaxVio of one layer's load: (max - mean) / mean; 0 is perfectly balanced."""
    return float((shares.max() - shares.mean()) / shares.mean())


def max_vio_table(final_metrics: dict[str, Any]) -> pd.DataFrame:
    """(layer, max_vio) from a training manifest's `final_metrics` (`max_vio/moe_<layer>` keys)."""
    rows = [
        {"layer": int(key.removeprefix(MAX_VIO_KEY)), "max_vio": float(value)}
        for key, value in final_metrics.items()
        if key.startswith(MAX_VIO_KEY)
    ]
    return pd.DataFrame(rows, columns=["layer", "max_vio"]).sort_values("layer", ignore_index=True)


# ---------------------------------------------------------------------------
# Generation


def special_ids(tokenizer: Tokenizer, *tokens: str) -> list[int]:
    """Ids of special tokens; a tokenizer without one cannot have been built by this pipeline."""
    ids = [tokenizer.token_to_id(token) for token in tokens]
    missing = [token for token, token_id in zip(tokens, ids) if token_id is None]
    if missing:
        raise StageError(
            f"the tokenizer has no {', '.join(missing)}; it was not trained with tasks.chat.SPECIAL_TOKENS"
        )
    return ids


def _text_prompt(tokenizer: Tokenizer, text: str) -> list[int]:
    return special_ids(tokenizer, BOS) + encode_text(tokenizer, text)


def completions(
    net: Transformer,
    tokenizer: Tokenizer,
    prompts: Sequence[Sequence[int]],
    stop_ids: Sequence[int],
    max_new_tokens: int,
    batch_size: int,
    cache_dtype: torch.dtype | None = None,
) -> list[str]:
    """Greedy completions of token prompts as text, in the prompts' order.

    Prompts are batched by length (less padding). A prompt too long to leave room for
    `max_new_tokens` within the model's context keeps only its last tokens. The decode
    cache holds `cache_dtype` (None: the model's dtype).
    """
    room = net.config.max_position_embeddings - max_new_tokens
    if room < 1:
        raise StageError(
            f"evaluate.max_new_tokens={max_new_tokens} leaves no room for a prompt within the model's "
            f"max_position_embeddings={net.config.max_position_embeddings}"
        )
    clipped = [list(p)[-room:] for p in prompts]
    order = sorted(range(len(clipped)), key=lambda i: len(clipped[i]))
    texts = [""] * len(clipped)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        outputs = generate(net, [clipped[i] for i in chunk], max_new_tokens, stop_ids=stop_ids,
                           cache_dtype=cache_dtype)
        for i, ids in zip(chunk, outputs):
            texts[i] = tokenizer.decode(ids)
    return texts


def chat_completer(net: Transformer, tokenizer: Tokenizer, max_new_tokens: int, batch_size: int,
                   cache_dtype: torch.dtype | None = None) -> ChatFn:
    """A function from conversations (without the final answer) to the model's greedy answers."""
    stops = special_ids(tokenizer, END, EOS)

    def answer(conversations: list[Messages]) -> list[str]:
        prompts = [render_prompt(messages, tokenizer) for messages in conversations]
        texts = completions(net, tokenizer, prompts, stops, max_new_tokens, batch_size, cache_dtype)
        return [text.strip() for text in texts]

    return answer


def _first_per_family(examples: Sequence[Example], limit: int | None) -> list[Example]:
    taken: dict[str, int] = {}
    chosen = []
    for example in examples:
        if limit is None or taken.get(example.family, 0) < limit:
            taken[example.family] = taken.get(example.family, 0) + 1
            chosen.append(example)
    return chosen


def validation_window(seq_len: int, context: int, val: Validation) -> int:
    """Tokens per validation window: `seq_len` within the model's context, and shorter than the
    longest validation file. Windows do not cross files, so a window longer than every file
    (a small corpus's validation split) would score nothing, and the validation metrics would
    be missing without a word."""
    itemsize = np.dtype(val.dtype).itemsize
    longest = max((file.stat().st_size // itemsize for file in val.files), default=0)
    return max(1, min(seq_len, context, longest - 1))


def limit_notes(examples: Sequence[Example], tokenizer: Tokenizer, max_new_tokens: int, context: int) -> list[str]:
    """What the scoring cannot get right as configured, said before it runs: an expected answer
    of more than `max_new_tokens` tokens is cut before its end and cannot match exactly, and a
    prompt longer than the context leaves beside them loses its first tokens (`completions`)."""
    room = context - max_new_tokens
    answers = sum(len(encode_text(tokenizer, e.answer)) > max_new_tokens for e in examples)
    prompts = sum(len(render_prompt(e.messages[:-1], tokenizer)) > room for e in examples)
    notes = []
    if answers:
        notes.append(f"evaluate: {answers} of {len(examples)} expected answers are longer than "
                     f"evaluate.max_new_tokens={max_new_tokens} tokens and cannot match exactly: raise it")
    if prompts:
        notes.append(f"evaluate: {prompts} of {len(examples)} prompts are longer than the {room} tokens the model's "
                     f"context of {context} leaves beside evaluate.max_new_tokens={max_new_tokens}: their first "
                     "tokens are dropped")
    return notes


def exact_match_by_family(
    examples: Sequence[Example], answer: ChatFn, max_per_family: int | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Score `answer` on the examples (the first `max_per_family` of each family).

    Returns (family, n, exact_match) per family and the per-example table
    (family, prompt, expected, got, correct); the prompt shown is the last user turn.
    """
    chosen = _first_per_family(examples, max_per_family)
    got = answer([example.messages[:-1] for example in chosen])
    rows = pd.DataFrame(
        {
            "family": [e.family for e in chosen],
            "prompt": [next(m["content"] for m in reversed(e.messages) if m["role"] == "user") for e in chosen],
            "expected": [e.answer for e in chosen],
            "got": got,
            "correct": [normalize_answer(g) == normalize_answer(e.answer) for g, e in zip(got, chosen)],
        }
    )
    summary = (
        rows.groupby("family", sort=False)
        .agg(n=("correct", "size"), exact_match=("correct", "mean"))
        .reset_index()
        .astype({"n": int, "exact_match": float})
    )
    return summary, rows


def generations_table(
    net: Transformer,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    chat_prompts: Sequence[str],
    max_new_tokens: int = 32,
    batch_size: int = 32,
    cache_dtype: torch.dtype | None = None,
) -> pd.DataFrame:
    """(kind, prompt, completion): greedy continuations of plain text and answers to chat prompts."""
    continued = completions(
        net, tokenizer, [_text_prompt(tokenizer, p) for p in prompts], special_ids(tokenizer, EOS, BOS),
        max_new_tokens, batch_size, cache_dtype,
    )
    answered = chat_completer(net, tokenizer, max_new_tokens, batch_size, cache_dtype)(
        [[{"role": "user", "content": p}] for p in chat_prompts]
    )
    return pd.DataFrame(
        {
            "kind": ["continuation"] * len(prompts) + ["chat"] * len(chat_prompts),
            "prompt": [*prompts, *chat_prompts],
            "completion": [*continued, *answered],
        }
    )


@torch.no_grad()
def next_token_table(net: Transformer, tokenizer: Tokenizer, prompt: str, k: int = 5) -> pd.DataFrame:
    """(rank, token, token_id, probability): the `k` most likely tokens after BOS + `prompt`."""
    ids = _text_prompt(tokenizer, prompt)[-net.config.max_position_embeddings :]
    logits = net(torch.tensor([ids], device=_device_of(net))).logits[0, -1].float()
    top = logits.softmax(-1).topk(min(k, logits.numel()))
    token_ids = top.indices.tolist()
    return pd.DataFrame(
        {
            "rank": range(1, len(token_ids) + 1),
            "token": [show_token(tokenizer, t) for t in token_ids],
            "token_id": token_ids,
            "probability": top.values.tolist(),
        }
    )


# ---------------------------------------------------------------------------
# Champion comparison


def lower_is_better(name: str) -> bool:
    return any(part in name for part in LOWER_IS_BETTER)


def resolve(metrics: dict[str, Any], name: str) -> float | None:
    """A metric by name; a name without `_base`/`_tuned` means the fine-tuned model's."""
    for key in (name, f"{name}_tuned"):
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    return None


def _better(name: str, challenger: float, champion: float) -> str:
    if challenger == champion:
        return "same"
    challenger_wins = challenger < champion if lower_is_better(name) else challenger > champion
    return "challenger" if challenger_wins else "champion"


def _candidate_names(metrics: dict[str, Any]) -> list[str]:
    """The fine-tuned model's metric names, suffix dropped, in metrics order."""
    names = (key.removesuffix("_tuned") for key in metrics if not key.endswith("_base"))
    return list(dict.fromkeys(names))


def compare_with_champion(
    metrics: dict[str, Any], champion_metrics: dict[str, Any] | None, primary_metric: str,
    ours_measured_on: dict[str, str] | None = None, champion_measured_on: dict[str, str] | None = None,
) -> pd.DataFrame:
    """(metric, challenger, champion, better) for every metric both have, the primary one first.

    Both dicts are metrics.json-style; the fine-tuned model's values are compared. A metric
    the two measured on other things (`measured_on`) is listed as "not comparable".
    """
    champion_metrics = champion_metrics or {}
    rows = []
    for name in _candidate_names(metrics):
        ours, theirs = resolve(metrics, name), resolve(champion_metrics, name)
        if ours is not None and theirs is not None:
            apart = _measured_apart(name, ours_measured_on, champion_measured_on)
            better = "not comparable" if apart else _better(name, ours, theirs)
            rows.append({"metric": name, "challenger": ours, "champion": theirs, "better": better})
    table = pd.DataFrame(rows, columns=["metric", "challenger", "champion", "better"])
    primary_first = table["metric"].ne(primary_metric).astype(int)
    return table.iloc[primary_first.argsort(kind="stable")].reset_index(drop=True)


def score_kind(metric: str) -> str | None:
    """Which `measured_on` digest a metric's value depends on (None: the model's own, as max_vio_final)."""
    if "exact_match" in metric:
        return "exact_match"
    return "validation" if metric.startswith("val_") else None


MEASURED_ON = {"exact_match": "instruction problems, answer budget (evaluate.max_new_tokens) or decode cache "
                              "(evaluate.kv_cache_dtype)",
               "validation": "validation tokens or windows (a new tokenizer or corpus, evaluate.seq_len, "
                             "val_batches or batch_size)"}


def _measured_apart(metric: str, ours: dict[str, str] | None, theirs: dict[str, str] | None) -> bool:
    """Whether both record what `metric` was measured on, and it differs."""
    kind = score_kind(metric)
    ours_on, theirs_on = (ours or {}).get(kind), (theirs or {}).get(kind)
    return bool(ours_on and theirs_on and ours_on != theirs_on)


def measured_on(scored: Sequence[Example], val: Validation, config: EvaluateConfig) -> dict[str, str]:
    """A digest of what each kind of score is measured on (`score_kind`): the problems scored and
    the answer budget; the validation tokens and the windows taken from them."""
    problems = [(e.family, e.messages, e.answer) for e in scored]
    windows = {"dtype": val.dtype, "seq_len": config.seq_len, "batches": config.val_batches,
               "batch_size": config.batch_size, "tokens": tasks.files.content_digest(val.files)}
    # a narrower decode cache rounds what the answers are decoded from (with `auto`, as before it was recorded)
    cache = {"kv_cache_dtype": config.kv_cache_dtype} if config.kv_cache_dtype != "auto" else {}
    return {"exact_match": json_digest({"problems": problems, "max_new_tokens": config.max_new_tokens, **cache}),
            "validation": json_digest(windows)}


def decide_promotion(
    metrics: dict[str, Any], champion_metrics: dict[str, Any] | None, primary_metric: str,
    ours_measured_on: dict[str, str] | None = None, champion_measured_on: dict[str, str] | None = None,
) -> tuple[bool, str]:
    """Promote when there is no champion, or the challenger is strictly better on the primary
    metric. A champion without the metric is beaten; one whose value was measured on other
    things (`measured_on`, where both record it) is not compared, nor is a value that is not
    a finite number (a diverged run), or none (the metric was not measured), promoted."""
    ours = resolve(metrics, primary_metric)
    if ours is None:
        recorded = [metrics[key] for key in (primary_metric, f"{primary_metric}_tuned") if key in metrics]
        if recorded:
            return False, f"not promoted: {primary_metric} is {recorded[0]}, not a finite number"
        # a name the config accepts, that this run measured nothing for: no validation split, no
        # held-out rows of that family, or no expert load recorded
        return False, (f"not promoted: this run measured no {primary_metric} (evaluate.primary_metric) to decide on; "
                       f"it measured {', '.join(_candidate_names(metrics)) or 'nothing'}")
    direction = "lower" if lower_is_better(primary_metric) else "higher"
    if champion_metrics is None:
        return True, f"no champion yet; {primary_metric} = {ours:.4g}"
    if _measured_apart(primary_metric, ours_measured_on, champion_measured_on):
        kind = score_kind(primary_metric)
        return False, (f"not compared: the champion's {primary_metric} was measured on other {MEASURED_ON[kind]}; "
                       f"this model's is {ours:.4g}. Set the champion alias in MLflow to serve it anyway")
    theirs = resolve(champion_metrics, primary_metric)
    if theirs is None:
        return True, f"the champion has no {primary_metric}; {primary_metric} = {ours:.4g}"
    if _better(primary_metric, ours, theirs) == "challenger":
        return True, f"{primary_metric} {ours:.4g} beats the champion's {theirs:.4g} ({direction} is better)"
    return False, f"{primary_metric} {ours:.4g} does not beat the champion's {theirs:.4g} ({direction} is better)"


# ---------------------------------------------------------------------------
# The stage


@dataclass(frozen=True)
class Validation:
    """The validation token files of the tokenize stage and what one token is worth in bytes."""

    files: list[Path]
    dtype: str
    bytes_per_token: float


@dataclass
class ModelResults:
    """Everything measured on one model; metric names without the _base/_tuned suffix."""

    metrics: dict[str, float]
    exact_match: pd.DataFrame
    examples: pd.DataFrame
    generations: pd.DataFrame
    next_token: pd.DataFrame
    expert_load: pd.DataFrame


def _validation_metrics(
    net: Transformer, config: EvaluateConfig, val: Validation
) -> tuple[dict[str, float], pd.DataFrame]:
    seq_len = min(config.seq_len, net.config.max_position_embeddings)
    with routed_load(net) as loads:
        batches = eval_batches(val.files, val.dtype, seq_len, config.batch_size, config.val_batches)
        loss = validation_loss(net, batches)
    load = expert_load_table(loads)
    metrics: dict[str, float] = {}
    if loss is not None:
        metrics["val_loss"] = loss
        if val.bytes_per_token > 0:
            metrics["val_bpb"] = bits_per_byte(loss, val.bytes_per_token)
    if not load.empty:
        metrics["val_max_vio"] = max(max_vio(group["share"]) for _, group in load.groupby("layer"))
    return metrics, load


def evaluate_model(
    model_dir: Path, config: EvaluateConfig, examples: Sequence[Example], val: Validation
) -> ModelResults:
    """Measure one finished model directory (weights, config and tokenizer)."""
    net = load_model(model_dir, resolve_device(config.device, "evaluate.device", "'auto' or 'cpu'"))
    tokenizer = read_tokenizer(model_dir / "tokenizer.json")
    metrics, load = _validation_metrics(net, config, val)
    cache_dtype = CACHE_DTYPES[config.kv_cache_dtype]
    answer = chat_completer(net, tokenizer, config.max_new_tokens, config.batch_size, cache_dtype)
    scores, rows = exact_match_by_family(examples, answer, config.max_examples_per_family)
    metrics.update({f"exact_match_{r.family}": r.exact_match for r in scores.itertuples()})
    if not scores.empty:
        metrics["exact_match_mean"] = float(scores["exact_match"].mean())
    samples = generations_table(net, tokenizer, config.prompts, config.chat_prompts, config.max_new_tokens,
                                config.batch_size, cache_dtype)
    top = [next_token_table(net, tokenizer, p, config.top_k_tokens).assign(prompt=p) for p in config.next_token_prompts]
    next_tokens = pd.concat(top, ignore_index=True) if top else pd.DataFrame(columns=NEXT_TOKEN_COLUMNS)
    return ModelResults(metrics, scores, rows, samples, next_tokens, load)


def _side_by_side(tables: dict[str, pd.DataFrame], keys: list[str], values: list[str]) -> pd.DataFrame:
    """The base and tuned versions of a table row by row (both measured on the same items, in the
    same order): the `keys` columns once, the `values` columns suffixed with _base and _tuned."""
    parts = [tables["base"][keys].reset_index(drop=True)]
    parts += [tables[name][values].reset_index(drop=True).add_suffix(f"_{name}") for name in MODELS]
    return pd.concat(parts, axis=1)


def _training_max_vio(base: Ref, tuned: Ref) -> pd.DataFrame:
    tables = [
        max_vio_table(ref.manifest().get("final_metrics", {})).set_index("layer")["max_vio"] for ref in (base, tuned)
    ]
    return pd.DataFrame({"pretrain": tables[0], "finetune": tables[1]}).rename_axis("layer").reset_index()


def _write_tables(out: Path, results: dict[str, ModelResults], base: Ref, tuned: Ref) -> dict[str, pd.DataFrame]:
    def frames(attr: str) -> dict[str, pd.DataFrame]:
        return {name: getattr(results[name], attr) for name in MODELS}

    em = _side_by_side(frames("exact_match"), ["family", "n"], ["exact_match"])
    tables = {
        "exact_match": em.rename(columns={"exact_match_base": "base", "exact_match_tuned": "tuned"}),
        "examples": pd.concat([r.examples.assign(model=name) for name, r in results.items()], ignore_index=True),
        "generations": _side_by_side(frames("generations"), ["kind", "prompt"], ["completion"]).rename(
            columns={"completion_base": "base", "completion_tuned": "tuned"}
        ),
        "next_token": _side_by_side(frames("next_token"), ["prompt", "rank"], ["token", "probability"]),
        "expert_load": pd.concat([r.expert_load.assign(model=name) for name, r in results.items()], ignore_index=True),
        "max_vio": _training_max_vio(base, tuned),
    }
    for name, table in tables.items():
        table.to_parquet(out / f"{name}.parquet", index=False)
    return tables


def evaluate_fingerprint(base: Ref, tuned: Ref, config: EvaluateConfig, instructions: InstructionConfig,
                         val: Validation) -> str:
    # the files by name only: their content is the tokenize stage's, which the models' fingerprints
    # already hold, and a workspace moved to another path should not evaluate again
    settings = {
        "evaluate": config.model_dump(exclude={"device"}),
        "instructions": instructions.model_dump(mode="json"),
        "user_data": tasks.instructions.user_data_state(instructions),
        "validation": {"files": [f.name for f in val.files], "dtype": val.dtype,
                       "bytes_per_token": val.bytes_per_token},
    }
    code = code_version(sys.modules[__name__], model.generate, tasks.chat, tasks.instructions, tasks.files)
    return fingerprint("evaluate", settings, [base.fingerprint, tuned.fingerprint], code)


def evaluate(
    base: Ref,
    tuned: Ref,
    config: EvaluateConfig,
    instructions: InstructionConfig,
    val_files: list[Path],
    dtype: str,
    bytes_per_token: float,
    root: Path | str | None = None,
    log: Callable[[str], None] = print,
) -> Ref:
    """Measure the pretrained (`base`) and fine-tuned (`tuned`) models and return the stage's Ref.

    `val_files`, `dtype` and `bytes_per_token` describe the validation token files of the
    tokenize stage. The models are evaluated one after the other, so only one is in memory.
    `log` hears what the scoring cannot get right as configured (`limit_notes`).
    """
    root = workspace(root)
    val = Validation([Path(f) for f in val_files], dtype, bytes_per_token)
    fp = evaluate_fingerprint(base, tuned, config, instructions, val)

    def build(out: Path) -> dict[str, Any]:
        model.fused.compile_afresh()  # as when evaluated alone, not with the kernels training compiled
        examples = build_examples(instructions)["test"]
        context = json.loads((tuned.dir / MODEL_CONFIG_FILE).read_text())["max_position_embeddings"]
        scored = _first_per_family(examples, config.max_examples_per_family)
        for note in limit_notes(scored, read_tokenizer(tuned.dir / "tokenizer.json"),
                                config.max_new_tokens, context):
            log(note)
        window = validation_window(config.seq_len, context, val)
        if not any(file.stat().st_size for file in val.files):
            log("evaluate: the validation split holds no tokens (clean.val_fraction=0, or a corpus too small to "
                "give one): val_loss and val_bpb are not measured")
        elif window < min(config.seq_len, context):
            log(f"evaluate: no validation file holds more than {window + 1} tokens: validation windows of {window} "
                f"tokens instead of evaluate.seq_len={config.seq_len}")
        measured = config.model_copy(update={"seq_len": window})
        results = {name: evaluate_model(ref.dir, measured, examples, val) for name, ref in zip(MODELS, (base, tuned))}
        metrics = {f"{key}_{name}": value for name, r in results.items() for key, value in r.metrics.items()}
        final_vio = tuned.manifest().get("final_metrics", {}).get("max_vio")
        if final_vio is not None:
            metrics["max_vio_final"] = float(final_vio)
        (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
        tables = _write_tables(out, results, base, tuned)
        counts = {"examples": len(results["tuned"].examples), "families": len(tables["exact_match"])}
        return {"counts": counts, "metrics": metrics, "measured_on": measured_on(scored, val, measured)}

    return run_stage(
        "evaluate", fp, build, root=root,
        inputs={"base": base.model_dump(), "tuned": tuned.model_dump(),
                "validation_files": [str(f) for f in val.files]},
        config={"evaluate": config.model_dump(), "instructions": instructions.model_dump(mode="json")},
    )


def metrics_of(ref: Ref) -> dict[str, float]:
    """The flat metrics dict of a finished evaluate output."""
    return json.loads((ref.dir / METRICS_FILE).read_text())
