"""The tiny pipeline end to end through `tinyseek run`: MLflow runs, the registry, the
cached rerun, serving, and using the model (generate, next-token, export-hf)."""

import contextlib
import json
import shutil
import sqlite3
import time
from pathlib import Path

import mlflow
import pytest
import torch

from flows.pipeline import champion_metrics
from tasks.tracking import Tracker
from tests.flows.helpers import last_json, tinyseek

STAGES = ["collect", "clean", "tokenize", "pretrain", "finetune", "evaluate"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    started = time.time()
    first = tinyseek("run", "--preset", "tiny", "--workspace", str(root), "--json")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    return root, last_json(first.stdout), time.time() - started


def client(root):
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")


def test_mlflow_holds_parent_children_metrics_and_a_registered_model(built):
    root, summary, _ = built
    c = client(root)
    parent = c.get_run(summary["mlflow_run_id"])
    assert parent.data.tags["preset"] == "tiny"
    assert parent.data.params["preset"] == "tiny" and parent.data.params["pretrain.steps"] == "20"
    assert parent.data.metrics["exact_match_mean_tuned"] == summary["metrics"]["exact_match_mean_tuned"]
    assert parent.data.tags["data_fingerprint"] == summary["stages"]["tokenize"]["path"].rsplit("/", 1)[-1]
    assert "prefect.flow_run_id" in parent.data.tags and "mlflow.source.git.commit" in parent.data.tags
    children = c.search_runs([parent.info.experiment_id],
                             filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_name = {run.info.run_name: run for run in children}
    assert set(STAGES + ["register"]) <= set(by_name)
    assert {run.data.tags["data_fingerprint"] for run in children} == {parent.data.tags["data_fingerprint"]}
    assert by_name["collect"].data.metrics["docs"] > 0
    assert by_name["pretrain"].data.params["pretrain.steps"] == "20"
    # the precision each training stage ran in (the tiny preset's fp32); the others train nothing
    assert {name: run.data.tags.get("precision") for name, run in by_name.items() if name in STAGES} == {
        "collect": None, "clean": None, "tokenize": None, "pretrain": "fp32", "finetune": "fp32", "evaluate": None}
    assert {"model.rope_theta", "model.n_group", "model.vocab_size"} <= set(by_name["pretrain"].data.params)
    for default in ("model.rope_theta", "model.n_group"):  # not in the preset: the parent logs the defaults too
        assert parent.data.params[default] == by_name["pretrain"].data.params[default], default
    history = c.get_metric_history(by_name["pretrain"].info.run_id, "loss")
    assert len(history) == 20 and history[-1].value < history[0].value
    assert "exact_match_mean_tuned" in by_name["evaluate"].data.metrics
    assert any(m.startswith("system/") for m in by_name["pretrain"].data.metrics)
    assert c.get_run(by_name["pretrain"].info.run_id).inputs.dataset_inputs  # the token shards, as a dataset
    for stage, dataset, context in (("finetune", "instructions-train", "training"),
                                    ("evaluate", "instructions-test", "eval")):
        inputs = c.get_run(by_name[stage].info.run_id).inputs.dataset_inputs
        assert (dataset, context) in {(i.dataset.name, i.tags[0].value) for i in inputs}, stage
    # one name for one setting in every run: the config's, as the parent logs it
    for stage, key in (("collect", "collect.sources"), ("clean", "clean.min_chars"),
                       ("tokenize", "tokenize.vocab_size"), ("evaluate", "evaluate.max_new_tokens")):
        assert by_name[stage].data.params[key] == parent.data.params[key], stage
    artifacts = {a.path for a in c.list_artifacts(parent.info.run_id, "report")}
    assert "report/report.md" in artifacts
    version = c.get_model_version_by_alias("tinyseek", "challenger")
    assert int(version.version) == summary["version"]
    assert version.tags["pipeline_run_id"] == parent.info.run_id
    assert summary["model_uri"] == f"models:/tinyseek/{summary['version']}"  # what --model takes
    assert version.description.startswith("tiny preset; exact_match_mean = ")
    assert version.description.endswith(f"; pipeline run {parent.info.run_id}")
    assert "DeepSeek-V3" in c.get_registered_model("tinyseek").description
    [output] = c.get_run(version.run_id).outputs.model_outputs
    scores = {m.key: m.value for m in c.get_logged_model(output.model_id).metrics}
    assert scores["exact_match_mean_tuned"] == summary["metrics"]["exact_match_mean_tuned"]
    assert c.get_model_version_by_alias("tinyseek", "champion").version == version.version  # first one wins
    # what its scores were measured on, beside them, so that a later run compares like with like
    evaluated = json.loads((Path(summary["stages"]["evaluate"]["path"]) / "manifest.json").read_text())
    assert set(evaluated["measured_on"]) == {"exact_match", "validation"}
    assert {key: value for key, value in c.get_run(version.run_id).data.tags.items()
            if key.startswith("measured_on.")} == {f"measured_on.{k}": v for k, v in evaluated["measured_on"].items()}


def test_second_run_reuses_every_stage(built):
    root, first, first_seconds = built
    started = time.time()
    second = tinyseek("run", "--preset", "tiny", "--workspace", str(root), "--json")
    assert second.returncode == 0, second.stderr[-3000:]
    summary = last_json(second.stdout)
    assert all(summary["stages"][stage]["cached"] for stage in STAGES)
    assert "Cached" in second.stdout + second.stderr
    # tiny's 28 documents put one long module, about half the tokens, into validation: said on every run
    assert "clean: the validation split holds" in second.stdout + second.stderr
    assert summary["version"] == first["version"]  # the same model is not registered twice
    c = client(root)
    reused = c.search_runs([c.get_run(summary["mlflow_run_id"]).info.experiment_id],
                           filter_string=f"tags.mlflow.parentRunId = '{summary['mlflow_run_id']}'")
    pretrain = next(run for run in reused if run.info.run_name == "pretrain")
    assert pretrain.data.tags["cached"] == "True" and "loss" in pretrain.data.metrics  # where the reused run ended
    report = (root / "reports" / summary["mlflow_run_id"] / "report.md").read_text()
    assert "| pretrain (reused) | 0 |" in report and "Total: 0.0 s." in report
    # the champion is this very model: its recorded scores beside this run's, the same
    assert "Decision: unchanged: version 1 (the champion) is this model" in report
    assert "| exact_match_mean |" in report.split("Comparison with the champion")[1] and "no champion" not in report
    assert time.time() - started < first_seconds


def test_generate_next_token_and_export_match_transformers(built, tmp_path):
    root, _, _ = built
    out = tinyseek("generate", "--workspace", str(root), "--prompt", "What is 2 + 3?", "--chat",
                   "--max-new-tokens", "8", "--temperature", "0")
    assert out.returncode == 0, out.stderr
    table = tinyseek("next-token", "--workspace", str(root), "--prompt", "def ", "--top", "3")
    assert table.returncode == 0 and len(table.stdout.strip().splitlines()) == 4
    exported = tinyseek("export-hf", "--workspace", str(root), "--out", str(tmp_path / "hf"))
    assert exported.returncode == 0, exported.stderr

    import transformers

    from tasks import inference

    loaded = inference.load("models:/tinyseek@champion", root)
    ours = inference.complete_ids(loaded, "What is 2 + 3?", chat=True, max_new_tokens=8)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    prompt = hf_tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    generated = hf_model.generate(**prompt, do_sample=False, max_new_tokens=8)
    theirs = generated[0, prompt["input_ids"].shape[1]:].tolist()
    assert theirs[: len(ours)] == ours
    assert hf_tok.decode(ours) in out.stdout or not ours


def test_a_narrower_evaluation_cache_is_scored_but_not_registered(built):
    root, first, _ = built
    result = tinyseek("run", "--preset", "tiny", "--workspace", str(root), "--set", "evaluate.kv_cache_dtype=fp8",
                      "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = last_json(result.stdout)
    assert all(summary["stages"][stage]["cached"] for stage in STAGES[:-1])
    assert not summary["stages"]["evaluate"]["cached"]
    assert "exact_match_mean_tuned" in summary["metrics"]
    assert summary["version"] is None and not summary["promoted"]
    assert "not registered: evaluated with evaluate.kv_cache_dtype=fp8" in result.stdout
    versions = client(root).search_model_versions("name = 'tinyseek'")
    assert [int(v.version) for v in versions] == [first["version"]]  # nothing new in the registry
    assert (root / "reports" / summary["mlflow_run_id"] / "report.md").read_text().count("not registered") == 1


def test_report_has_every_section(built):
    root, summary, _ = built
    report = root / "reports" / summary["mlflow_run_id"] / "report.md"
    text = report.read_text()
    for heading in ("data", "model", "scor", "MoE", "generation", "next"):
        assert heading.lower() in text.lower(), heading
    assert text.count("**drop reasons**") == 1
    assert "| instruction_rows_quarantined | 0 |" in text and "| instruction_examples_test | 88 |" in text
    assert "| pretrained in | fp32 |" in text  # the tiny preset's precision
    assert "None/" not in text  # the temporary Prefect server has no UI to link to
    assert list(report.parent.glob("*.png"))


def test_tables_for_people_are_prefect_table_artifacts_too(built):
    root, _, _ = built
    with contextlib.closing(sqlite3.connect(root / "prefect" / "prefect.db")) as db:
        keys = {key for (key,) in db.execute("select key from artifact where type = 'table'")}
    assert {"clean-drop-reasons", "evaluate-exact-match", "evaluate-generations"} <= keys, keys


def test_a_model_registered_before_is_the_challenger_again(built, tmp_path, monkeypatch):
    """A run whose model an earlier run registered registers nothing new: that version is the
    challenger again, as the run says, not the later model the alias was left on (here one
    registered by hand, without a run: no scores to compare with, so it is beaten)."""
    root, first, _ = built
    ws = tmp_path / "ws"
    shutil.copytree(root, ws, symlinks=True)  # a workspace copies whole
    c = client(ws)
    ours = c.get_model_version("tinyseek", str(first["version"]))
    later = c.create_model_version("tinyseek", source=ours.source, tags={"fingerprint": "another model"})
    for alias in ("challenger", "champion"):  # as a later run, then a user in MLflow's UI, left them
        c.set_registered_model_alias("tinyseek", alias, later.version)
    # the same model, its validation loss measured on fewer windows
    again = tinyseek("run", "--preset", "tiny", "--workspace", str(ws), "--json",
                     "--set", "evaluate.val_batches=1")
    assert again.returncode == 0, again.stderr[-3000:]
    summary = last_json(again.stdout)
    assert summary["version"] == first["version"]
    assert int(c.get_model_version_by_alias("tinyseek", "challenger").version) == first["version"]
    # promoted over the scoreless one, its scores are now those this run measured, not the first run's
    assert int(c.get_model_version_by_alias("tinyseek", "champion").version) == first["version"]
    scored = c.search_runs([c.get_run(summary["mlflow_run_id"]).info.experiment_id],
                           filter_string=f"tags.mlflow.parentRunId = '{summary['mlflow_run_id']}' "
                                         "and attributes.run_name = 'register'")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert champion_metrics(Tracker(ws))[1] == scored[0].data.metrics != first["metrics"]


def test_the_champion_measured_another_way_keeps_the_new_scores(built, tmp_path, monkeypatch):
    """A rerun of the champion's own model, scored on other windows, records those scores as
    the champion's, so later challengers measured the same way are compared with them."""
    root, first, _ = built
    ws = tmp_path / "ws"
    shutil.copytree(root, ws, symlinks=True)
    again = tinyseek("run", "--preset", "tiny", "--workspace", str(ws), "--json", "--set", "evaluate.val_batches=1")
    assert again.returncode == 0, again.stderr[-3000:]
    summary = last_json(again.stdout)
    assert summary["reason"] == (f"unchanged: version {first['version']} (the champion) is this model; its recorded "
                                 "scores are now this run's, measured on other problems or windows")
    c = client(ws)
    scored = c.search_runs([c.get_run(summary["mlflow_run_id"]).info.experiment_id],
                           filter_string=f"tags.mlflow.parentRunId = '{summary['mlflow_run_id']}' "
                                         "and attributes.run_name = 'register'")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _, metrics, measured = champion_metrics(Tracker(ws))
    assert metrics == scored[0].data.metrics != first["metrics"]
    assert measured["validation"] == scored[0].data.tags["measured_on.validation"]


def test_every_field_of_a_deployments_run_form_is_described():
    from prefect.utilities.callables import parameter_schema

    from flows import pipeline

    for flow in (pipeline.data_flow, pipeline.pretrain_flow, pipeline.finetune_flow, pipeline.evaluate_flow,
                 pipeline.build_llm, pipeline.retrain):
        fields = parameter_schema(flow.fn).properties
        assert {name for name, field in fields.items() if field.get("description")} == set(fields), flow.name


def test_retraining_fetches_again_once_per_token_and_can_continue_from_the_champion(tmp_path, monkeypatch):
    from flows import pipeline
    from tasks.config import load_config

    config = load_config("tiny")
    monkeypatch.setattr(pipeline, "resolve_model", lambda ref, root: root / f"champion of {ref}")
    fresh = pipeline.retrain_config(config, tmp_path, False, "event-1")
    assert fresh.pretrain.init_from is None
    assert fresh.collect.refresh == pipeline.retrain_config(config, tmp_path, False, "event-1").collect.refresh
    assert fresh.collect.refresh != pipeline.retrain_config(config, tmp_path, False, "event-2").collect.refresh
    continued = pipeline.retrain_config(config, tmp_path, True, "event-1")
    assert continued.pretrain.init_from == str(tmp_path / "champion of models:/tinyseek@champion")
