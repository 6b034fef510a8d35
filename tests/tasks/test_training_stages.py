"""The pretrain and finetune stages on the tiny preset: outputs, reuse, and torchrun DDP."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from model import fused, perf
from model.checkpoint import load_model
from tasks import distributed, stage, training
from tasks.clean import clean
from tasks.collect import collect
from tasks.config import load_config
from tasks.finetune import build_trainer as finetune_trainer, cut_examples, finetune, finetune_fingerprint
from tasks.instructions import UserDataSource, build_examples, eval_texts
from tasks.pretrain import build_trainer, pretrain, pretrain_fingerprint
from tasks.prune import prune
from tasks.stage import Ref, StageError, file_lock
from tasks.tokenize import tokenize
from tasks.training import read_history, train_into


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    config = load_config("tiny")
    cleaned = clean(collect(config.collect, root), config.clean, root, eval_texts(config.instructions))
    return root, tokenize(cleaned, config.tokenize, root)


def test_other_held_out_examples_that_decontaminate_nothing_reuse_the_tokens(tokens):
    """Clean runs again with other evaluation texts, but keeps the same documents: tokenize,
    and so pretraining, key on that content and are reused."""
    root, toks = tokens
    config = load_config("tiny", None, ["instructions.seed=7"])
    cleaned = clean(collect(config.collect, root), config.clean, root, eval_texts(config.instructions))
    assert not cleaned.cached
    again = tokenize(cleaned, config.tokenize, root)
    assert again.cached and again.fingerprint == toks.fingerprint


def quick(*overrides):
    return load_config("tiny", None, ["pretrain.steps=6", "pretrain.checkpoint_every=3", "finetune.steps=4",
                                      *overrides])


def test_each_training_stage_compiles_its_kernels_afresh(tokens, tmp_path, monkeypatch):
    """As when it runs alone: the pipeline trains both stages in one process (`fused.compile_afresh`)."""
    _, toks = tokens
    steps, afresh = [], []
    monkeypatch.setattr(fused, "compile_afresh", lambda: afresh.append(len(steps)))
    base = pretrain(toks, quick(), tmp_path, callback=lambda step, metrics: steps.append(step), log=lambda m: None)
    finetune(base, quick(), tmp_path, callback=lambda step, metrics: steps.append(step), log=lambda m: None)
    assert afresh == [0, 6]  # each before its first step


def test_pretrain_then_finetune_write_models_histories_and_checkpoints(tokens):
    root, toks = tokens
    config = quick()
    seen = []
    base = pretrain(toks, config, root, callback=lambda step, metrics: seen.append(step), log=lambda m: None)
    assert seen == list(range(1, 7))
    assert [r["step"] for r in read_history(base.dir)] == seen
    assert sorted(p.name for p in (base.dir / "checkpoints").glob("step-*")) == ["step-000003", "step-000006"]
    model = load_model(base.dir)
    assert model.config.vocab_size == json.loads((toks.dir / "manifest.json").read_text())["vocab_size"]
    assert (base.dir / "tokenizer.json").exists()
    assert pretrain(toks, config, root).cached

    tuned = finetune(base, config, root, log=lambda m: None)
    assert tuned.counts["steps"] == 4
    examples = build_examples(config.instructions)
    for split in ("train", "test"):  # what it trained and validated on, for people and MLflow
        table = pd.read_parquet(tuned.dir / f"{split}_examples.parquet")
        assert table["answer"].tolist() == [ex.answer for ex in examples[split]]
        assert [json.loads(m) for m in table["messages"]] == [ex.messages for ex in examples[split]]
    before, after = load_file(str(base.dir / "model.safetensors")), load_file(str(tuned.dir / "model.safetensors"))
    assert any(not before[name].equal(after[name]) for name in before)

    # batches regrouped by length are another fine-tuning, not another pretraining
    config.finetune.length_window = config.pretrain.length_window = 2
    assert pretrain(toks, config, root).cached
    regrouped = finetune(base, config, root, log=lambda m: None)
    assert not regrouped.cached and regrouped.dir != tuned.dir
    assert finetune_trainer(base, config, root / "scratch").train._order.length_window == 2


def test_bad_user_rows_are_quarantined_however_many_devices_train(tokens, tmp_path, monkeypatch):
    """torchrun's ranks build their own trainers: the quarantine is the stage's, not the trainer's."""
    root, toks = tokens
    rows = [{"instruction": "Name a color.", "output": "Blue"}, {"instruction": "Say hi."}]
    (tmp_path / "mine.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    config = quick("finetune.devices=2")
    config.instructions.user_data = [UserDataSource(path=str(tmp_path / "mine.jsonl"))]
    base = pretrain(toks, quick(), root, log=lambda m: None)
    launched = []
    monkeypatch.setattr(distributed, "launch", lambda *args: launched.append(args) or {"counts": {"steps": 0}})
    ref = finetune(base, config, tmp_path / "ws", log=lambda m: None)
    assert launched and ref.counts["quarantined_rows"] == 1
    assert pd.read_parquet(ref.dir / "quarantine.parquet")["reason"].tolist() == ["missing 'output'"]


def test_fine_tuning_on_few_examples(tokens, tmp_path):
    """Fewer held-out examples than a micro-batch validate in one narrower batch; too few
    training examples for one batch are a stage error that says what to change."""
    root, toks = tokens
    base = pretrain(toks, quick(), root, log=lambda m: None)
    few = quick("instructions.families=[add, reverse]", "instructions.test_per_family=2", "finetune.micro_batch=8",
                "finetune.batch_tokens=512")
    trainer = finetune_trainer(base, few, tmp_path / "ckpt")
    assert [inputs.shape[0] for inputs, _ in trainer.validation()] == [4]
    with pytest.raises(StageError, match=r"fine-tuning data: only 4 usable examples: .* lower finetune.micro_batch"):
        finetune_trainer(base, quick("instructions.families=[add]", "instructions.train_per_family=4",
                                     "finetune.micro_batch=8", "finetune.batch_tokens=512"), tmp_path / "ckpt2")
    with pytest.raises(StageError, match=r"only 0 usable examples: .*; 440 of 440 are cut before their answer by "
                                         r"finetune.seq_len=8: raise it, or add examples"):
        finetune_trainer(base, quick("finetune.seq_len=8"), tmp_path / "ckpt4")
    none_held_out = finetune_trainer(base, quick("instructions.test_per_family=0"), tmp_path / "ckpt3")
    assert none_held_out.validation is None


def test_examples_longer_than_a_window_are_counted_and_said(tokens, tmp_path):
    root, toks = tokens
    base = pretrain(toks, quick(), root, log=lambda m: None)
    said = []
    ref = finetune(base, quick("finetune.seq_len=32", "finetune.steps=1"), tmp_path, log=said.append)
    assert ref.counts["examples_cut"] > 0 and ref.counts["examples_train"] > ref.counts["examples_cut"]
    assert any(f"{ref.counts['examples_cut']} of {ref.counts['examples_train']} training examples are longer than "
               "finetune.seq_len=32" in line for line in said)
    assert "finetune: warmup_steps=2 is not less than steps=1: the learning rate warms up over the whole run" in said
    assert cut_examples([([1] * 17, [1] * 17), ([1] * 18, [1] * 18)], 16) == 1  # 16 inputs and the 17th as target


def test_sequence_longer_than_the_model_is_a_clear_error(tokens):
    root, toks = tokens
    with pytest.raises(StageError, match="pretrain.seq_len=512 exceeds model.max_position_embeddings=256"):
        pretrain(toks, quick("pretrain.seq_len=512"), root)


def test_a_corpus_too_small_for_one_batch_says_what_to_change(tokens):
    root, toks = tokens
    with pytest.raises(StageError, match="pretraining data: only .* lower pretrain.seq_len or pretrain.micro_batch"):
        pretrain(toks, quick("pretrain.micro_batch=1000"), root)


def test_training_without_validation_data_says_so(tokens, tmp_path):
    root, toks = tokens
    trainer = build_trainer(toks, quick("pretrain.steps=1"), tmp_path / "ckpt")
    trainer.validation = None  # as for a corpus whose every document fell in the training split
    said = []
    (tmp_path / "out").mkdir()
    train_into(tmp_path / "out", trainer, toks.dir, log=said.append)
    assert said[0].startswith("no validation data: this run reports no validation loss")


def test_a_half_written_history_record_is_dropped_on_resume_and_skipped_when_read(tokens, tmp_path):
    root, toks = tokens
    trainer = build_trainer(toks, quick("pretrain.steps=2"), tmp_path / "ckpt")
    trainer.checkpoint_dir.mkdir(parents=True)
    (trainer.checkpoint_dir / "history.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "lo')  # killed
    (tmp_path / "out").mkdir()
    train_into(tmp_path / "out", trainer, toks.dir, log=lambda m: None)
    lines = (tmp_path / "out" / "history.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines) and [r["step"] for r in read_history(tmp_path / "out")] == [1, 2]
    (tmp_path / "out" / "history.jsonl").write_text('{"step": 1, "lo{"step": 1, "loss": 8.0}\n{"step": 2}\n')
    assert read_history(tmp_path / "out") == [{"step": 2}]  # a finished output written before the fix


def test_a_run_resumed_at_its_last_step_keeps_its_final_metrics(tokens, tmp_path):
    """Stopped after its last checkpoint but before its output was written, a rerun trains nothing
    more: the final metrics are still those of its last step."""
    root, toks = tokens
    first = tmp_path / "first"
    first.mkdir()
    done = train_into(first, build_trainer(toks, quick("pretrain.steps=3"), tmp_path / "ckpt"), toks.dir,
                      log=lambda m: None)
    assert {"loss", "val_loss", "max_vio"} <= set(done["final_metrics"])
    shutil.copytree(first / "checkpoints", tmp_path / "left")  # as the work directory was left
    shutil.copy(first / "history.jsonl", tmp_path / "left")
    (tmp_path / "again").mkdir()
    resumed = build_trainer(toks, quick("pretrain.steps=3"), tmp_path / "left")
    again = train_into(tmp_path / "again", resumed, toks.dir, log=lambda m: None)
    assert again["counts"]["steps"] == 3 and again["final_metrics"] == done["final_metrics"]


def test_two_devices_train_under_torchrun(tokens):
    root, toks = tokens
    logged = []
    ref = pretrain(toks, quick("pretrain.devices=2", "pretrain.micro_batch=2"), root,
                   callback=lambda step, metrics: logged.append((step, metrics["loss"])), log=lambda m: None)
    assert [step for step, _ in logged] == list(range(1, 7))
    assert ref.counts["steps"] == 6 and (ref.dir / "model.safetensors").exists()
    assert not list(ref.dir.glob("ddp-*"))


def test_a_failed_or_cancelled_parent_stops_torchrun(tmp_path, monkeypatch):
    started = []

    def popen(command, **options):  # torchrun stands in as a process that would train for a minute
        started.append(real_popen([sys.executable, "-c", "import time; time.sleep(60)"], **options))
        return started[-1]

    real_popen = subprocess.Popen
    monkeypatch.setattr(distributed.subprocess, "Popen", popen)
    (tmp_path / distributed.METRICS).write_text(json.dumps({"step": 1, "metrics": {"loss": 1.0}}) + "\n")

    def callback(step, metrics):
        raise KeyboardInterrupt  # as a cancelled flow run's signal, or a tracking error, would arrive here

    with pytest.raises(KeyboardInterrupt):
        distributed.launch("pretrain", {}, quick("pretrain.devices=2"), tmp_path, tmp_path / "ckpt", callback, print)
    assert started[0].poll() is not None  # stopped, not left training


@pytest.mark.parametrize("devices", [1, 2])
def test_a_diverged_run_is_a_stage_error_that_names_the_stage(tokens, devices):
    """In one process or under torchrun, where each rank stops on it and the stage fails
    with the message alone."""
    root, toks = tokens
    config = quick("pretrain.lr=1e9", "pretrain.min_lr=0", "pretrain.warmup_steps=0", "pretrain.mtp_lambda=0",
                   f"pretrain.devices={devices}", f"pretrain.micro_batch={4 // devices}")
    with pytest.raises(StageError, match=r"^pretrain: training stopped at step \d+: the loss.* not finite \(loss nan"):
        pretrain(toks, config, root, log=lambda m: None)


def test_compiling_on_a_cpu_without_a_cpp_compiler_is_a_clear_error(tokens, monkeypatch):
    root, toks = tokens
    monkeypatch.setattr(training, "cpp_compiler", lambda: None)
    with pytest.raises(StageError, match="pretrain.compile needs a C\\+\\+ compiler .* pretrain.compile=false"):
        pretrain(toks, quick("pretrain.compile=true", "pretrain.device=cpu"), root)


def test_the_model_pretraining_continues_from_counts_by_content_not_by_path(tokens, tmp_path, monkeypatch):
    root, toks = tokens
    base = pretrain(toks, quick(), root, log=lambda m: None)
    model = tmp_path / "models" / "base"
    shutil.copytree(base.dir, model)
    monkeypatch.chdir(tmp_path)
    fp = lambda path: pretrain_fingerprint(toks, quick(f"pretrain.init_from={path}"))  # noqa: E731
    assert fp(model) == fp("models/base") == fp("./models//base/") == fp(base.dir)  # a copy counts the same
    (model / "model.safetensors").write_bytes((base.dir / "model.safetensors").read_bytes()[:-1] + b"\0")
    assert fp(model) != fp(base.dir)  # a model trained again at the same path starts a new run


def test_pretraining_can_continue_from_a_model_of_the_same_tokenizer_and_shape(tokens, tmp_path):
    root, toks = tokens
    base = pretrain(toks, quick(), root, log=lambda m: None)
    trainer = build_trainer(toks, quick(f"pretrain.init_from={base.dir}"), tmp_path / "ckpt")
    start = trainer.model.state_dict()
    for name, tensor in load_file(str(base.dir / "model.safetensors")).items():
        assert torch.equal(start[name], tensor), name
    with pytest.raises(StageError, match="is not a model directory"):
        pretrain(toks, quick(f"pretrain.init_from={tmp_path / 'nowhere'}"), root)
    with pytest.raises(StageError, match="its model config differs"):
        pretrain(toks, quick(f"pretrain.init_from={base.dir}", "model.intermediate_size=96"), root)
    other = tmp_path / "other-tokenizer"
    shutil.copytree(base.dir, other)
    with open(other / "tokenizer.json", "a") as handle:
        handle.write("\n")  # any other bytes: a tokenizer trained on another corpus
    with pytest.raises(StageError, match="the corpus produced a different tokenizer"):
        pretrain(toks, quick(f"pretrain.init_from={other}"), root)


def test_every_model_module_training_runs_is_in_the_training_fingerprint():
    import subprocess
    import sys

    from tasks.pretrain import TRAINING_CODE

    # the model modules a training step loads, in a fresh interpreter
    listing = "import sys, model.trainer; print(' '.join(n for n in sys.modules if n.startswith('model.')))"
    run = subprocess.run([sys.executable, "-c", listing], capture_output=True, text=True, check=True)
    loaded = set(run.stdout.split())
    # modules that cannot change what training computes: checkpoint files, peak FLOP/s for the mfu metric
    outside = {"model.checkpoint", "model.perf"}
    assert "model.transformer" in loaded
    # and the stages' own training settings and loop (grad_accum, the warm-up clamp, resuming)
    assert loaded - outside | {"tasks.training", "tasks.training_config"} <= {m.__name__ for m in TRAINING_CODE}


def test_a_model_written_another_way_keeps_its_fingerprint(tokens):
    """A default restated, or an integer for a float, builds the same network: the output is reused."""
    _, toks = tokens
    base = pretrain_fingerprint(toks, quick())
    for same in (["model.rope_theta=10000"], ["model.rope_theta=10000.0"], ["model.rms_norm_eps=1e-6"]):
        assert pretrain_fingerprint(toks, quick(*same)) == base, same
    assert pretrain_fingerprint(toks, quick("model.rope_theta=5000")) != base


def test_settings_that_train_the_same_run_keep_its_fingerprint(tokens):
    """What the schedule does not read, a warm-up past the run's end, and a batch_tokens that
    whole passes round to the same batch, train the same weights: the output is reused."""
    _, toks = tokens
    base = pretrain_fingerprint(toks, quick())  # tiny: cosine, 6 steps, passes of 4 x 64 = 256 tokens
    for same in (["pretrain.decay_fraction=0.5"], ["pretrain.batch_tokens=300"]):
        assert pretrain_fingerprint(toks, quick(*same)) == base, same
    fp = lambda *overrides: pretrain_fingerprint(toks, quick(*overrides))  # noqa: E731
    assert fp("pretrain.warmup_steps=6") == fp("pretrain.warmup_steps=9") != base
    assert fp("pretrain.schedule=constant", "pretrain.min_lr=0") == fp("pretrain.schedule=constant")
    assert fp("pretrain.schedule=wsd", "pretrain.decay_fraction=0.5") != fp("pretrain.schedule=wsd")
    # 6 steps: after a 1-step warm-up, fractions 0.5 and 0.45 both decay from step 3 (round(2.7) = 3);
    # 0.6 and 0.9 from the end of a 4-step warm-up; a run that is all warm-up never reaches its schedule
    wsd = ("pretrain.schedule=wsd", "pretrain.warmup_steps=1")
    assert fp(*wsd, "pretrain.decay_fraction=0.45") == fp(*wsd, "pretrain.decay_fraction=0.5") != fp(*wsd)
    assert fp("pretrain.schedule=wsd", "pretrain.warmup_steps=4", "pretrain.decay_fraction=0.6") == \
        fp("pretrain.schedule=wsd", "pretrain.warmup_steps=4", "pretrain.decay_fraction=0.9")
    assert fp("pretrain.warmup_steps=6", "pretrain.schedule=wsd", "pretrain.min_lr=0") == fp("pretrain.warmup_steps=6")
    assert fp("pretrain.min_lr=0") != base and fp("pretrain.batch_tokens=512") != base


def test_settings_of_how_a_run_goes_keep_its_fingerprint(tokens):
    """Checkpoint cadence, threads and a device choice that resolves the same build the same
    model: the output is reused. The process count counts, at least where it changes the batch."""
    _, toks = tokens
    base = pretrain_fingerprint(toks, quick())
    for same in (["pretrain.checkpoint_every=2", "pretrain.keep_last=5"], ["pretrain.threads=1"],
                 ["pretrain.device=cpu"] if not torch.cuda.is_available() else []):
        assert pretrain_fingerprint(toks, quick(*same)) == base, same
    for other in (["pretrain.eval_every=5"], ["pretrain.devices=2"]):  # 2 x 4 x 64 tokens: twice the batch
        assert pretrain_fingerprint(toks, quick(*other)) != base, other
    assert pretrain_fingerprint(toks, quick("pretrain.mtp_lambda=0.5")) != base  # the tiny model has MTP
    # without MTP modules the MTP loss weight changes nothing, in pretraining and fine-tuning
    no_mtp = quick("model.num_nextn_predict_layers=0")
    weighed = quick("model.num_nextn_predict_layers=0", "pretrain.mtp_lambda=0.5", "finetune.mtp_lambda=0.5")
    assert pretrain_fingerprint(toks, weighed) == pretrain_fingerprint(toks, no_mtp)
    base_ref = Ref(stage="pretrain", path="/nowhere", fingerprint="0" * 16)
    assert finetune_fingerprint(base_ref, weighed) == finetune_fingerprint(base_ref, no_mtp)
    assert finetune_fingerprint(base_ref, quick("finetune.mtp_lambda=0.5")) != finetune_fingerprint(base_ref, quick())


def test_auto_precision_trains_in_the_faster_one_says_so_and_fingerprints_as_it(tokens, monkeypatch):
    """`auto` counts as the precision it resolves to: the same output as asking for that one."""
    root, toks = tokens
    monkeypatch.setattr(perf, "fast_precision", lambda device: perf.Precision("fp32", "bf16 matmuls run slower"))
    auto = quick("pretrain.precision=auto", "pretrain.steps=2")
    assert pretrain_fingerprint(toks, auto) == pretrain_fingerprint(toks, quick("pretrain.steps=2"))  # tiny: fp32
    assert pretrain_fingerprint(toks, auto) != pretrain_fingerprint(toks, quick("pretrain.precision=bf16",
                                                                                "pretrain.steps=2"))
    logged = []
    ref = pretrain(toks, auto, root, log=logged.append)
    assert "pretrain: training in fp32 (pretrain.precision auto: bf16 matmuls run slower)" in logged
    assert ref.manifest()["precision"] == "fp32"


class Interrupted(Exception):
    pass


def test_a_run_stopped_as_its_output_is_committed_resumes_from_its_last_checkpoint(tokens, tmp_path, monkeypatch):
    root, toks = tmp_path, tokens[1]
    config = quick("pretrain.seed=12")
    commit = stage._fsync_tree

    def stopped(path):  # a Ctrl-C in the last second, after training, before the output is in place
        raise KeyboardInterrupt

    monkeypatch.setattr(stage, "_fsync_tree", stopped)
    with pytest.raises(KeyboardInterrupt):
        pretrain(toks, config, root, log=lambda m: None)
    monkeypatch.setattr(stage, "_fsync_tree", commit)
    work = training.work_dir(root, "pretrain", pretrain_fingerprint(toks, config))
    assert (work / "step-000006" / "model.safetensors").is_file() and (work / training.HISTORY).is_file()
    trained, said = [], []
    ref = pretrain(toks, config, root, callback=lambda step, metrics: trained.append(step), log=said.append)
    assert trained == [] and "resuming from step 6 of 6" in said
    assert len(read_history(ref.dir)) == 6 and (ref.dir / "checkpoints" / "step-000006").is_dir()
    assert not work.exists()  # gone once the output is in place
    (work / "step-000006").mkdir(parents=True)  # as a kill just after that left it
    assert pretrain(toks, config, root, log=lambda m: None).cached and not work.exists()


def test_prune_removes_the_checkpoints_of_an_interrupted_run_unless_it_is_running(tokens, tmp_path):
    """A run stopped after its step-3 checkpoint leaves them in `.<fp>.work` for a resume;
    prune keeps them while a process holds the fingerprint's lock, lists them with
    `dry_run`, then removes them with a half-built output, and nothing else."""
    root, toks = tmp_path, tokens[1]  # a workspace of its own: other tests leave interrupted runs
    config = quick("pretrain.seed=11")

    def stop_at_4(step, metrics):
        if step == 4:
            raise Interrupted

    with pytest.raises(Interrupted):
        pretrain(toks, config, root, callback=stop_at_4, log=lambda m: None)
    fp = pretrain_fingerprint(toks, config)
    work = training.work_dir(root, "pretrain", fp)
    assert (work / "step-000003" / "model.safetensors").is_file()
    half_built = root / "clean" / ".0123456789abcdef.tmp-999-feedbeef"
    (half_built / "shards").mkdir(parents=True)
    (half_built / "shards" / "part-0.parquet").write_bytes(b"x" * 1000)
    leftovers = {work, half_built}
    before = {p for p in root.rglob("*") if p not in leftovers and not leftovers & set(p.parents)}

    with file_lock(root / "pretrain" / f".{fp}.lock"):  # a run of that config in progress
        removed, running, failed = prune(root)
    assert running == [work] and not failed and [r.path for r in removed] == [half_built] and not half_built.exists()
    removed, running, failed = prune(root, dry_run=True)
    assert [(r.path, r.what) for r in removed] == [(work, "checkpoints of an unfinished training run")]
    assert removed[0].bytes == sum(p.stat().st_size for p in work.rglob("*") if p.is_file()) > 0
    assert work.exists() and not running
    prune(root)
    assert not work.exists()
    assert set(root.rglob("*")) == before  # finished outputs and lock files stay, and none is made


def test_prune_counts_what_removal_frees_and_goes_on_past_a_failure(tmp_path, monkeypatch, capsys):
    """Checkpoints hard-linked into a finished output free nothing; a file linked from two
    leftovers counts once; a leftover that cannot be removed is named, after the others go."""
    from flows.cli import main
    from tasks import prune as pruning

    done = tmp_path / "pretrain" / "0123456789abcdef"  # finished: a kill came before its work folder went
    done.mkdir(parents=True)
    (done / "model.safetensors").write_bytes(b"w" * 3000)
    work = tmp_path / "pretrain" / ".0123456789abcdef.work"
    (work / "step-000002").mkdir(parents=True)
    os.link(done / "model.safetensors", work / "step-000002" / "model.safetensors")
    (work / "step-000002" / "optimizer.pt").write_bytes(b"o" * 500)
    half = tmp_path / "pretrain" / ".fedcba9876543210.tmp-9-ab"
    other = tmp_path / "pretrain" / ".fedcba9876543210.work"
    for folder in (half, other):
        folder.mkdir()
    (other / "a").write_bytes(b"a" * 700)
    os.link(other / "a", half / "a")  # a half-built output's links to its work folder: 700 bytes, once
    stuck = tmp_path / "clean" / ".1111111111111111.tmp-9-cd"
    stuck.mkdir(parents=True)

    removed, running, failed = prune(tmp_path, dry_run=True)
    assert [(r.path, r.what, r.bytes) for r in removed] == [
        (stuck, "a half-built output", 0), (work, "checkpoints of a finished run", 500),
        (half, "a half-built output", 700), (other, "checkpoints of an unfinished training run", 0)]
    assert not running and not failed and work.exists()

    real = shutil.rmtree

    def refuse(path, *args, **kwargs):
        if Path(path) == stuck:
            raise PermissionError(13, "Permission denied", str(stuck))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(pruning.shutil, "rmtree", refuse)
    assert main(["prune", "--workspace", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == f"removed 3 leftover(s) of interrupted runs in {tmp_path}, 0.0 MB:"
    assert err == ("error: 1 leftover(s) or folder(s) could not be pruned: clean/.1111111111111111.tmp-9-cd: "
                   "cannot remove it (Permission denied)\n")
    assert stuck.exists() and not work.exists() and (done / "model.safetensors").read_bytes() == b"w" * 3000


def test_prune_names_a_stage_folder_it_cannot_list_and_prunes_the_others(tmp_path, monkeypatch):
    (tmp_path / "clean").mkdir()
    half = tmp_path / "pretrain" / ".0123456789abcdef.tmp-9-ab"
    half.mkdir(parents=True)
    real = Path.iterdir

    def locked(path):
        if path == tmp_path / "clean":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(Path, "iterdir", locked)
    removed, running, failed = prune(tmp_path)
    assert [(f.path, f.reason) for f in failed] == [(tmp_path / "clean", "cannot list it (Permission denied)")]
    assert [r.path for r in removed] == [half] and not half.exists() and not running


def test_prune_passes_over_what_a_run_removes_meanwhile(tmp_path, monkeypatch):
    """A run that finds its output in place removes its work folder without the lock prune holds."""
    from tasks import prune as pruning

    work = tmp_path / "pretrain" / ".0123456789abcdef.work"
    (work / "step-1").mkdir(parents=True)
    (work / "step-1" / "optimizer.pt").write_bytes(b"o" * 10)
    real = pruning._files

    def meanwhile(folder):
        shutil.rmtree(folder)  # between the listing and the walk
        return real(folder)

    monkeypatch.setattr(pruning, "_files", meanwhile)
    assert prune(tmp_path) == ([], [], [])


def test_more_gpu_devices_than_gpus_are_refused_and_cpu_ranks_take_gloo(tokens, tmp_path, monkeypatch):
    """Said once, before torchrun starts ranks that would each fail with 'invalid device ordinal';
    ranks told to train on the CPU join a gloo group even where CUDA is available (NCCL takes only GPU tensors)."""
    from tasks.train_worker import process_group_backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    config = quick("pretrain.devices=2", "pretrain.device=cuda", "pretrain.precision=fp32")
    with pytest.raises(StageError, match=r"pretrain.devices=2: this machine has 1 GPU\(s\); lower pretrain.devices, "
                                         r"or train on the CPU with pretrain.device=cpu"):
        pretrain(tokens[1], config, tmp_path, log=lambda m: None)
    assert process_group_backend(torch.device("cpu")) == "gloo"
    assert process_group_backend(torch.device("cuda")) == "nccl"
