"""The Prefect flows: `data`, `pretrain`, `finetune`, `evaluate`, the whole `build-llm`
pipeline and `retrain`.

Every stage runs as a Prefect task that opens an MLflow child run under the flow's
parent run (run ids passed explicitly: MLflow's active run is thread-local), logs the
stage's config, counts and manifest, and reports "Cached" when the stage's output
was already on disk. Stage groups are plain functions chained by the flows, so each
flow can be started on its own (its upstream stages are reused when unchanged).
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NONE
from prefect.exceptions import ParameterTypeError, TerminationSignal
from prefect.runtime import flow_run
from prefect.states import Completed
from prefect.settings import PREFECT_UI_URL
from tqdm import tqdm

from tasks.clean import clean, drop_reasons, split_note
from tasks.collect import collect
from tasks.config import PipelineConfig, switched_preset
from tasks.evaluate import compare_with_champion, decide_promotion, evaluate, metrics_of, resolve
from tasks.finetune import EXAMPLE_FILES, finetune
from tasks.inference import DEFAULT_REF, resolve_model
from tasks.instructions import eval_texts
from tasks.pretrain import pretrain
from tasks.register import MODEL_NAME, champion_version, log_model, make_challenger, promote, register
from tasks.report import markdown_table, write_report
from tasks.stage import Ref, user_errors, workspace
from tasks.tokenize import TokenData, tokenize, vocabulary_note
from tasks.tracking import MetricsCallback, Tracker, run_tags, system_metrics
from tasks.training import read_history

StageWork = Callable[[Callable[[int, dict[str, float]], None]], Ref]
# how a run ends when it is stopped rather than failing: Ctrl-C, or a served run cancelled (SIGTERM)
INTERRUPTIONS = (KeyboardInterrupt, TerminationSignal)


class TracebackOnlyForBugs(logging.Filter):
    """Prefect logs a failed task or flow run with its traceback. A `user_errors()` message
    already says what to fix, as does the list of a run's invalid parameters (a config from
    a deployment's form that does not validate: the run's state message), and an interrupted
    run (Ctrl-C, a served run cancelled) is no fault: two pages of engine frames would bury
    the line that says so. Any other exception keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, (*user_errors(), ParameterTypeError, *INTERRUPTIONS)):
            record.exc_info = record.exc_text = None
            if str(error) not in record.getMessage():  # "Engine execution exited ...": say why
                record.msg, record.args = f"{record.getMessage()}: {error}", ()
        return True


class NoParameterDump(logging.Filter):
    """Prefect logs invalid parameters twice: as pydantic's raw error list with every input,
    and as the readable list that is also the run's state message. Only the second is kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Parameter validation failed for flow")


for _run_logger in ("prefect.task_runs", "prefect.flow_runs"):
    logging.getLogger(_run_logger).addFilter(TracebackOnlyForBugs())
logging.getLogger("prefect.flows").addFilter(NoParameterDump())


@dataclass
class PipelineRun:
    """What the stages of one flow run share: the workspace, the tracker and the parent run."""

    config: PipelineConfig
    root: Path
    tracker: Tracker
    parent_id: str
    refs: dict[str, Ref] = field(default_factory=dict)
    child_runs: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    measured_on: dict[str, str] = field(default_factory=dict)  # `tasks.evaluate.measured_on` of the metrics
    decision: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    @classmethod
    def start(cls, name: str, config: PipelineConfig, workspace_dir: str | None) -> PipelineRun:
        root = workspace(workspace_dir)
        tracker = Tracker(root)
        orphans = tracker.end_orphaned_runs()
        if orphans:
            get_run_logger().info(f"{len(orphans)} MLflow run(s) left RUNNING by a killed process ended as KILLED")
        # the whole config as params, so that runs compare in the MLflow UI by any setting
        parent = tracker.start_run(name, tags=_tags(config.preset, "pending"), params=config.with_model_defaults())
        return cls(config=config, root=root, tracker=tracker, parent_id=parent)

    @contextmanager
    def child_run(self, name: str, **details: Any) -> Iterator[str]:
        """An MLflow child run of this pipeline's run (`details`: its tags and params) that
        ends FINISHED, or KILLED or FAILED when the block raises, as `ended_status` says."""
        with self.tracker.run(name, self.parent_id, interruptions=INTERRUPTIONS, **details) as child:
            self.child_runs[name] = child
            yield child

    def finish(self, status: str) -> None:
        """Close the parent run; after a failure, a tracking error here must not hide the cause."""
        try:
            self.tracker.end_run(self.parent_id, status)
        except Exception:
            if status == "FINISHED":
                raise


# the flow log hears from a slow training run at least this often (seconds)
PROGRESS_SECONDS = 60.0


def duration(seconds: float) -> str:
    """A rough length of time for people: '40 s', '12 min', '3 h 5 min', '2 d 4 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        hours, minutes = divmod(round(seconds / 60), 60)  # rounded first: never "2 h 60 min"
        return f"{hours} h {minutes} min"
    days, hours = divmod(round(seconds / 3600), 24)
    return f"{days} d {hours} h"


class TrainingProgress:
    """Mirrors training steps into a Prefect progress artifact, the flow log and, on a
    terminal, a progress bar. The log has the first step, every 5% and, for a slow run
    (a large preset on a CPU), a line at least every PROGRESS_SECONDS, each with the time
    left at the rate since the first step. The artifact is made at the first step reported,
    so a reused stage, which trains no step, leaves none behind at 0%."""

    def __init__(self, stage: str, total: int):
        self.stage, self.total = stage, total
        self.artifact = None
        self.logger = get_run_logger()
        self.every = max(1, total // 20)
        self.bar = tqdm(total=total, desc=stage, unit="step", leave=False, disable=not sys.stderr.isatty())
        self.first: tuple[int, float] | None = None  # the first step reported (a resumed run's is not 1), and when
        self.logged = 0.0

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        now = time.monotonic()
        self.first = self.first or (step, now)
        self.bar.update(step - self.bar.n)
        if "loss" in metrics:
            self.bar.set_postfix(loss=f"{metrics['loss']:.3f}", refresh=False)
        if step == self.total:
            self.bar.close()
        due = step == self.first[0] or now - self.logged >= PROGRESS_SECONDS
        if step % self.every and step != self.total and not due:
            return
        self.logged = now
        progress = 100.0 * step / self.total
        if self.artifact is None:
            self.artifact = create_progress_artifact(progress=progress, description=f"{self.stage} training progress")
        else:
            update_progress_artifact(self.artifact, progress=progress)
        shown = ", ".join(f"{k} {metrics[k]:.4g}" for k in ("loss", "val_loss", "tokens_per_s", "max_vio") if k in metrics)
        self.logger.info(f"{self.stage} step {step}/{self.total}: {shown}{self._left(step, now)}")

    def _left(self, step: int, now: float) -> str:
        first_step, started = self.first
        if step <= first_step or step == self.total:
            return ""
        return f", about {duration((self.total - step) * (now - started) / (step - first_step))} left"


def system_metrics_interval() -> float:
    """Seconds between system metric samples (CPU, memory, GPU) of each stage's run."""
    return float(os.environ.get("TINYSEEK_SYSTEM_METRICS_INTERVAL", "10"))


@task(cache_policy=NONE, persist_result=False)
def run_stage_task(stage: str, work: StageWork, run: PipelineRun, params: dict[str, Any], inputs: dict[str, Ref]):
    """Run one stage inside its MLflow child run; a reused output finishes as Cached."""
    logger = get_run_logger()
    tracker = run.tracker
    with run.child_run(stage, params=params, tags=_stage_tags(run)) as child:
        for name, upstream in inputs.items():
            # the digest names the content where the stage hashes it (MLflow keeps 36 characters)
            tracker.log_dataset(child, name, upstream.path, upstream.dir, context="input", digest=upstream.key[:16])
        # a failed or interrupted stage logs its last steps too: they show how it ended
        with (MetricsCallback(tracker, child, every=10) as metrics,
              system_metrics(tracker, child, interval=system_metrics_interval())):
            ref = work(metrics)
        tracker.log_metrics(child, {k: v for k, v in ref.counts.items() if isinstance(v, (int, float))})
        manifest = ref.manifest()
        if ref.cached and manifest.get("final_metrics"):  # a reused training run: where it ended
            tracker.log_metrics(child, manifest["final_metrics"], step=ref.counts.get("steps", 0))
        tracker.log_dict(child, manifest, f"{stage}/manifest.json")
        # a training stage's precision as `auto` resolved it (its param says `auto`)
        trained_in = {"precision": manifest["precision"]} if "precision" in manifest else {}
        tracker.set_tags(child, {"fingerprint": ref.fingerprint, "output": ref.path, "cached": str(ref.cached),
                                 **trained_in})
    run.refs[stage] = ref
    logger.info(f"{stage}: {'reused' if ref.cached else 'built'} {ref.path} {ref.counts}")
    return Completed(data=ref, name="Cached" if ref.cached else "Completed",
                     message=f"reused {ref.path}" if ref.cached else None)


def ended_status(exc: BaseException) -> str:
    """The MLflow status of a run that `exc` ended: KILLED when it was interrupted (Ctrl-C) or
    terminated (a served flow run cancelled, SIGTERM), FAILED otherwise."""
    return "KILLED" if isinstance(exc, INTERRUPTIONS) else "FAILED"


def _flow_run_url() -> str | None:
    """The flow run's page in the Prefect UI; None under the temporary server `tinyseek run`
    starts when PREFECT_API_URL is unset, which has no UI."""
    return flow_run.get_flow_run_ui_url() if PREFECT_UI_URL.value() else None


def _tags(preset: str, data_fp: str) -> dict[str, str]:
    return run_tags(preset, data_fingerprint=data_fp, flow_run_id=flow_run.get_id(), flow_run_url=_flow_run_url())


def _stage_tags(run: PipelineRun) -> dict[str, str]:
    return _tags(run.config.preset, _data_fp(run))


def _data_fp(run: PipelineRun) -> str:
    ref = run.refs.get("tokenize") or run.refs.get("clean") or run.refs.get("collect")
    return ref.fingerprint if ref else "pending"


def _stage(stage: str, run: PipelineRun, work: StageWork, params: dict[str, Any], **inputs: Ref) -> Ref:
    """Run `work` as the Prefect task `stage`; `inputs` are logged as the MLflow run's datasets."""
    task_fn = run_stage_task.with_options(name=stage)
    return task_fn(stage, work, run, params, inputs, return_state=True).result()


def _params(config: PipelineConfig, *sections: str) -> dict[str, Any]:
    """The config sections a stage reads, keyed as in the config and the parent run's params
    (`clean.min_chars`), so one name means one setting across the runs of a pipeline."""
    return {section: getattr(config, section).model_dump(mode="json") for section in sections}


def _log_examples(run: PipelineRun, stage: str, tuned: Ref, split: str, context: str) -> None:
    """The instruction examples of `split`, as the fine-tuning stage wrote them, as a dataset of
    the stage's run; its digest is the file's content, the same for the same examples."""
    path = tuned.dir / EXAMPLE_FILES[split]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    run.tracker.log_dataset(run.child_runs[stage], f"instructions-{split}", str(path), path, context=context,
                            digest=digest)


def log_table(run: PipelineRun, stage: str, table: pd.DataFrame, name: str) -> None:
    """A table for people: in the stage's MLflow run (`<stage>/<name>.json`) and as a Prefect
    table artifact, keyed by stage and name so the UI keeps each table's history across runs."""
    run.tracker.log_table(run.child_runs[stage], table, f"{stage}/{name}.json")
    create_table_artifact(table=table.to_dict(orient="records"), key=f"{stage}-{name}".replace("_", "-"),
                          description=f"{stage}: {name.replace('_', ' ')}")


def data_steps(run: PipelineRun) -> dict[str, Ref]:
    cfg, root = run.config, run.root
    collected = _stage("collect", run, lambda cb: collect(cfg.collect, root), _params(cfg, "collect"))
    cleaned = _stage("clean", run, lambda cb: clean(collected, cfg.clean, root, eval_texts(cfg.instructions)),
                     _params(cfg, "clean", "instructions"), corpus=collected)
    log_table(run, "clean", drop_reasons(cleaned), "drop_reasons")
    tokens = _stage("tokenize", run, lambda cb: tokenize(cleaned, cfg.tokenize, root), _params(cfg, "tokenize"),
                    clean_corpus=cleaned)
    for note in (split_note(cfg.clean.val_fraction, tokens.counts), vocabulary_note(cfg.tokenize, tokens.counts)):
        if note:
            _stage_log(note)
    # the data stages ran before it was known: every run of the pipeline names the same data
    for run_id in (run.parent_id, *(run.child_runs[stage] for stage in ("collect", "clean", "tokenize"))):
        run.tracker.set_tags(run_id, {"data_fingerprint": tokens.fingerprint})
    return run.refs


def _stage_log(message: str) -> None:
    """What a stage says (resuming, compiling, examples cut, a lopsided validation split): into
    the flow run's log, which the CLI prints and the Prefect UI keeps."""
    get_run_logger().info(message)


def _with_progress(stage: str, total: int, callback):
    progress = TrainingProgress(stage, total)

    def both(step: int, metrics: dict[str, float]) -> None:
        callback(step, metrics)
        progress(step, metrics)

    return both


def pretrain_steps(run: PipelineRun) -> Ref:
    cfg = run.config
    tokens = data_steps(run)["tokenize"]
    data = TokenData(tokens)
    model = cfg.model_for(data.vocab_size, data.special_ids).to_dict()  # every field, the defaults too
    return _stage("pretrain", run,
                  lambda cb: pretrain(tokens, cfg, run.root, _with_progress("pretrain", cfg.pretrain.steps, cb),
                                      _stage_log),
                  {"model": model, **_params(cfg, "pretrain")}, tokens=tokens)


def finetune_steps(run: PipelineRun) -> Ref:
    cfg = run.config
    base = pretrain_steps(run)
    tuned = _stage("finetune", run,
                   lambda cb: finetune(base, cfg, run.root, _with_progress("finetune", cfg.finetune.steps, cb),
                                       _stage_log),
                   _params(cfg, "instructions", "finetune"), pretrained=base)
    _log_examples(run, "finetune", tuned, "train", "training")
    return tuned


def evaluate_steps(run: PipelineRun) -> dict[str, Any]:
    cfg = run.config
    tuned = finetune_steps(run)
    base, data = run.refs["pretrain"], TokenData(run.refs["tokenize"])
    ref = _stage("evaluate", run,
                 lambda cb: evaluate(base, tuned, cfg.evaluate, cfg.instructions, data.files("validation"), data.dtype,
                                     data.bytes_per_token("validation") or 1.0, run.root, log=_stage_log),
                 _params(cfg, "evaluate", "instructions"), base=base, tuned=tuned)
    _log_examples(run, "evaluate", tuned, "test", "eval")
    child = run.child_runs["evaluate"]
    run.metrics = metrics_of(ref)
    run.measured_on = ref.manifest().get("measured_on", {})
    run.tracker.log_metrics(child, run.metrics)
    run.tracker.log_metrics(run.parent_id, run.metrics)  # the scores on the run people compare
    for table in sorted(ref.dir.glob("*.parquet")):
        log_table(run, "evaluate", pd.read_parquet(table), table.stem)
    return run.metrics


MEASURED_ON_TAG = "measured_on."  # + a score kind: the tags of a register run that say what its metrics measured
SCORED_BY_TAG = "scored_by_run"  # a version's tag: the register run that last scored it, when not the one that made it


def champion_metrics(tracker: Tracker) -> tuple[int | None, dict[str, float] | None, dict[str, str]]:
    """The champion's version, the evaluation metrics recorded with it and what they were
    measured on (empty for a version registered before that was recorded, or by hand without
    a run)."""
    version = champion_version(tracker)
    if version is None:
        return None, None, {}
    found = tracker.client.get_model_version(MODEL_NAME, str(version))
    run_id = found.tags.get(SCORED_BY_TAG) or found.run_id  # its latest scores, where a rerun recorded some
    if not run_id:  # a version registered by hand, from no run: no scores recorded with it
        return version, {}, {}
    run = tracker.client.get_run(run_id)
    measured = {key.removeprefix(MEASURED_ON_TAG): value for key, value in run.data.tags.items()
                if key.startswith(MEASURED_ON_TAG)}
    return version, dict(run.data.metrics), measured


def registered_version(tracker: Tracker, fp: str) -> int | None:
    """The registered version holding the fine-tuned model with this fingerprint, if any."""
    versions = tracker.client.search_model_versions(f"name = '{MODEL_NAME}' and tags.fingerprint = '{fp}'")
    return min((int(v.version) for v in versions), default=None)


def _not_promoted(run: PipelineRun, version: int | None, reason: str, champion: int | None,
                  comparison: pd.DataFrame | None) -> dict[str, Any]:
    """End the run without a promotion decision against the champion: record why, write the report."""
    model_uri = f"models:/{MODEL_NAME}/{version}" if version is not None else None
    run.decision = {"version": version, "model_uri": model_uri, "promoted": False, "reason": reason,
                    "champion_before": champion}
    get_run_logger().info(reason)
    run.decision["report"] = str(write_run_report(run, comparison))
    return run.decision


def register_steps(run: PipelineRun) -> dict[str, Any]:
    """Evaluate, register the fine-tuned model as `challenger`, promote it if it beats the champion.

    Runs on one workspace register one after the other: the second sees the version the first
    registered, and the aliases are never set by two at once (MLflow reads, then inserts).
    """
    evaluate_steps(run)
    return register_task(run)


@task(name="register", cache_policy=NONE, persist_result=False)
def register_task(run: PipelineRun) -> dict[str, Any]:
    """Registration as the flow's last task run, so the Prefect UI shows it beside the stages."""
    with run.tracker.exclusive():
        return _register(run)


def _register(run: PipelineRun) -> dict[str, Any]:
    cfg = run.config
    tracker, tuned = run.tracker, run.refs["finetune"]
    champion, previous, previous_measured_on = champion_metrics(tracker)
    comparison = compare_with_champion(run.metrics, previous, cfg.evaluate.primary_metric, run.measured_on,
                                       previous_measured_on) if previous else None
    if cfg.evaluate.kv_cache_dtype != "auto":
        # served models decode with their own dtype's cache: their recorded scores must be those
        return _not_promoted(run, None, f"not registered: evaluated with evaluate.kv_cache_dtype="
                             f"{cfg.evaluate.kv_cache_dtype}; the registry compares models as they are served, "
                             "with a KV cache in the model's dtype", champion, comparison)
    existing = registered_version(tracker, tuned.fingerprint)
    measured = {f"{MEASURED_ON_TAG}{kind}": digest for kind, digest in run.measured_on.items()}
    register_tags = {**_stage_tags(run), "fingerprint": tuned.fingerprint, **measured}
    if existing is not None and existing == champion:
        reason = f"unchanged: version {existing} (the champion) is this model"
        if run.measured_on != previous_measured_on:  # measured another way: later challengers meet these scores
            with run.child_run("register", tags=register_tags) as child:
                _rescored(run, child, existing)
                tracker.set_tags(child, {"promoted": "False", "decision": reason, "champion_before": str(champion)})
            reason += "; its recorded scores are now this run's, measured on other problems or windows"
        return _not_promoted(run, existing, reason, champion, comparison)
    with run.child_run("register", tags=register_tags) as child:
        if existing is None:
            logged = log_model(tracker, child, tuned.dir)
            tracker.log_metrics(child, run.metrics, model_id=logged.removeprefix("models:/"))
            primary, score = cfg.evaluate.primary_metric, resolve(run.metrics, cfg.evaluate.primary_metric)
            described = f"{cfg.preset} preset; {primary} = {'not measured' if score is None else f'{score:.4g}'}"
            version = register(tracker, logged, child, description=f"{described}; pipeline run {run.parent_id}",
                               tags={"fingerprint": tuned.fingerprint, "preset": cfg.preset,
                                     "data_fingerprint": _data_fp(run), "pipeline_run_id": run.parent_id})
        else:  # registered by an earlier run, and the latest model again: the challenger, as the run says
            version = existing
            _rescored(run, child, version)
            make_challenger(tracker, version)
        promoted, reason = decide_promotion(run.metrics, previous, cfg.evaluate.primary_metric, run.measured_on,
                                            previous_measured_on)
        if promoted:
            promote(tracker, version)
        tracker.set_tags(child, {"promoted": str(promoted), "decision": reason, "champion_before": str(champion)})
    model_uri = f"models:/{MODEL_NAME}/{version}"  # as registered: what --model and MLflow's pages take
    run.decision = {"version": version, "model_uri": model_uri, "promoted": promoted, "reason": reason,
                    "champion_before": champion}
    create_markdown_artifact(decision_markdown(run.decision, comparison), description="promotion decision")
    stays = f"the champion stays version {champion}" if champion else "there is no champion yet"
    verdict = "the champion" if promoted else f"the challenger; {stays}"
    get_run_logger().info(f"registered version {version} of {MODEL_NAME} as {verdict}: {reason}")
    run.decision["report"] = str(write_run_report(run, comparison))
    return run.decision


def _rescored(run: PipelineRun, child: str, version: int) -> None:
    """This run's scores, logged to its register run `child`, become the registered version's
    (`SCORED_BY_TAG`): a later run compares with them."""
    run.tracker.log_metrics(child, run.metrics)
    run.tracker.client.set_model_version_tag(MODEL_NAME, str(version), SCORED_BY_TAG, child)


def decision_markdown(decision: dict[str, Any], comparison: pd.DataFrame | None) -> str:
    verdict = "promoted to **champion**" if decision["promoted"] else "kept as **challenger**"
    lines = [f"# tinyseek version {decision['version']}: {verdict}", "", decision["reason"], ""]
    if comparison is not None:
        lines.append(markdown_table(comparison))
    return "\n".join(lines)


def _curves(run: PipelineRun) -> pd.DataFrame:
    rows = [
        {"step": record["step"], "stage": stage, "metric": metric, "value": record[metric]}
        for stage in ("pretrain", "finetune") if stage in run.refs
        for record in read_history(run.refs[stage].dir)
        for metric in ("loss", "val_loss", "mtp_loss") if metric in record
    ]
    return pd.DataFrame(rows, columns=["step", "stage", "metric", "value"])


def _instruction_counts(counts: dict[str, Any]) -> dict[str, Any]:
    """What the fine-tuning stage made of the instruction data, as the report names it."""
    names = {"examples_train": "instruction_examples_train", "examples_test": "instruction_examples_test",
             "examples_cut": "instruction_examples_cut", "quarantined_rows": "instruction_rows_quarantined"}
    return {name: counts.get(key, 0) for key, name in names.items()}


def write_run_report(run: PipelineRun, comparison: pd.DataFrame | None) -> Path:
    """The human-readable report of this run, logged to MLflow and shown in Prefect."""
    refs, cfg = run.refs, run.config
    evaluated = refs["evaluate"].dir

    def table(name: str) -> pd.DataFrame:
        return pd.read_parquet(evaluated / f"{name}.parquet")

    counts, pretrained = refs["pretrain"].counts, refs["pretrain"].manifest()
    report = write_report(
        run.root / "reports" / run.parent_id,
        title=f"tinyseek run ({cfg.preset} preset)",
        data_summary={**refs["collect"].counts, **refs["clean"].counts, **refs["tokenize"].counts,
                      **_instruction_counts(refs["finetune"].counts),
                      "drop_reasons": drop_reasons(refs["clean"])},
        model_summary={"parameters (total)": counts.get("params_total"),
                       "parameters (activated per token)": counts.get("params_activated"),
                       **{k: v for k, v in pretrained.get("model_config", {}).items() if k in REPORTED_MODEL_FIELDS},
                       **({"pretrained in": pretrained["precision"]} if "precision" in pretrained else {})},
        timings={f"{name} (reused)" if ref.cached else name: 0.0 if ref.cached else ref.manifest().get("seconds", 0.0)
                 for name, ref in refs.items()},
        metrics=run.metrics,
        exact_match=table("exact_match"),
        curves=_curves(run),
        max_vio=table("max_vio"),
        expert_load=table("expert_load"),
        generations=table("generations"),
        next_token=table("next_token"),
        comparison=comparison,
        links={"MLflow run": f"{run.tracker.uri} run {run.parent_id}",
               "Prefect flow run": _flow_run_url() or f"{flow_run.get_id()} (temporary local server, no UI)"},
        decision=run.decision["reason"] if run.decision else "",
        champion=run.decision.get("champion_before"),
    )
    run.tracker.log_artifacts(run.parent_id, report.parent, "report")
    create_markdown_artifact(report.read_text(), description="tinyseek run report")
    return report


REPORTED_MODEL_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "n_routed_experts",
                         "n_shared_experts", "num_experts_per_tok", "kv_lora_rank", "q_lora_rank",
                         "num_nextn_predict_layers", "vocab_size")


def summary(run: PipelineRun) -> dict[str, Any]:
    out = {
        "mlflow_run_id": run.parent_id,
        "tracking_uri": run.tracker.uri,
        "workspace": str(run.root),
        "seconds": round(time.time() - run.started, 1),
        "stages": {name: {"path": ref.path, "cached": ref.cached, "counts": ref.counts} for name, ref in run.refs.items()},
        "metrics": run.metrics,
        **run.decision,
    }
    lines = [f"# tinyseek `{run.config.preset}` run", "", f"MLflow parent run `{run.parent_id}` ({run.tracker.uri})", "",
             "| stage | reused | output |", "|---|---|---|"]
    lines += [f"| {name} | {ref.cached} | `{ref.path}` |" for name, ref in run.refs.items()]
    if run.metrics:
        lines += ["", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in run.metrics.items()]
    create_markdown_artifact("\n".join(lines), description="tinyseek run summary")
    return out


def deployment_configs() -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """In a run of a deployment, the config its run form was prefilled with (the deployment's)
    and the config the run was started with, as sent; outside one, neither."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import deployment, flow_run

    if deployment.id is None:
        return None, None
    with get_client(sync_client=True) as client:
        prefilled = client.read_deployment(deployment.id).parameters.get("config")
        submitted = client.read_flow_run(flow_run.id).parameters.get("config")
    return prefilled, submitted


def _flow(name: str, steps: Callable[[PipelineRun], Any], config: PipelineConfig, workspace_dir: str | None):
    run = PipelineRun.start(name, switched_preset(config, *deployment_configs()), workspace_dir)
    try:
        run.tracker.log_dict(run.parent_id, run.config.model_dump(mode="json"), "config.json")
        steps(run)
        result = summary(run)
    except BaseException as exc:
        run.finish(ended_status(exc))
        raise
    run.finish("FINISHED")
    return result


@flow(name="data", description="Collect, clean and tokenize the corpus.")
def data_flow(config: PipelineConfig, workspace_dir: str | None = None) -> dict[str, Any]:
    return _flow("data", data_steps, config, workspace_dir)


@flow(name="pretrain", description="Pretrain the model on the token shards (data stages reused).")
def pretrain_flow(config: PipelineConfig, workspace_dir: str | None = None) -> dict[str, Any]:
    return _flow("pretrain", pretrain_steps, config, workspace_dir)


@flow(name="finetune", description="Fine-tune the pretrained model on labeled instructions.")
def finetune_flow(config: PipelineConfig, workspace_dir: str | None = None) -> dict[str, Any]:
    return _flow("finetune", finetune_steps, config, workspace_dir)


@flow(name="evaluate", description="Evaluate the base and fine-tuned models (training stages reused).")
def evaluate_flow(config: PipelineConfig, workspace_dir: str | None = None) -> dict[str, Any]:
    return _flow("evaluate", evaluate_steps, config, workspace_dir)


@flow(name="build-llm", description="The whole pipeline: data, pretraining, fine-tuning, evaluation, registration.")
def build_llm(config: PipelineConfig, workspace_dir: str | None = None) -> dict[str, Any]:
    return _flow("build-llm", register_steps, config, workspace_dir)


# Prefect describes the fields of a deployment's run form by its flow's docstring (Google-style Args).
FORM_ARGS = """The flow's stages, each reused where its inputs did not change.

Args:
    config: The pipeline config: a preset, and the settings that differ from it.
    workspace_dir: The workspace: stage outputs, reports, and MLflow's store where MLFLOW_TRACKING_URI is
        unset (default: $TINYSEEK_WORKSPACE, else data/ in the project).
"""
for _stage_flow in (data_flow, pretrain_flow, finetune_flow, evaluate_flow, build_llm):
    _stage_flow.fn.__doc__ = FORM_ARGS


def retrain_config(config: PipelineConfig, root: Path, continue_champion: bool, refresh_token: str | None) -> PipelineConfig:
    """The pipeline config of a retraining run: remote sources fetched again (`refresh`),
    and optionally pretraining continued from the champion's weights."""
    token = refresh_token or datetime.date.today().isoformat()
    refresh = int(hashlib.sha256(token.encode()).hexdigest()[:12], 16)
    update: dict[str, Any] = {"collect": config.collect.model_copy(update={"refresh": refresh})}
    if continue_champion:
        champion = resolve_model(DEFAULT_REF, root)
        update["pretrain"] = config.pretrain.model_copy(update={"init_from": str(champion)})
    return config.model_copy(update=update)


@flow(name="retrain", description="Collect the sources again, train a challenger, promote it only if it beats "
      "the champion on the primary metric.")
def retrain(
    config: PipelineConfig,
    workspace_dir: str | None = None,
    continue_champion: bool = False,
    refresh_token: str | None = None,
) -> dict[str, Any]:
    """Remote sources (URLs, hub datasets) are fetched again once per `refresh_token`: the
    corpus-updated trigger passes the event id; scheduled runs default to the day. Local files
    are re-read whenever they change. Stages whose inputs did not change are reused.

    Args:
        config: The pipeline config: a preset, and the settings that differ from it.
        workspace_dir: The workspace (default: $TINYSEEK_WORKSPACE, else data/ in the project).
        continue_champion: Pretrain from the champion's weights instead of from scratch.
        refresh_token: Remote sources are fetched again once per token (default: today's date).
    """
    root = workspace(workspace_dir)
    return _flow("retrain", register_steps, retrain_config(config, root, continue_champion, refresh_token), str(root))
