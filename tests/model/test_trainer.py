"""The training engine: learning, exact resume after SIGKILL, checkpoint fallback,
non-finite loss, and DDP equivalence."""

import functools
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from model.checkpoint import load_latest
from model.config import ModelConfig
from model.data import TokenWindows, eval_batches
from model.trainer import NonFiniteLoss, TrainConfig, Trainer
from model.transformer import Transformer, flops_per_token, step_flops

REPO = Path(__file__).resolve().parents[2]
SMALL = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, kv_lora_rank=16,
             qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, intermediate_size=64,
             moe_intermediate_size=16, max_position_embeddings=64)


def write_corpus(path: Path, docs: int = 300, seed: int = 0) -> Path:
    """Documents that count upwards from a random start: easy to learn, BOS (1) first."""
    rng = np.random.default_rng(seed)
    tokens = []
    for _ in range(docs):
        start = rng.integers(0, 50)
        tokens += [1] + [int((start + j) % 50 + 3) for j in range(rng.integers(20, 50))]
    np.array(tokens, dtype=np.uint16).tofile(path)
    return path


def make_trainer(tmp: Path, steps: int, **overrides) -> Trainer:
    torch.manual_seed(0)
    corpus = tmp / "train.bin"
    if not corpus.exists():
        write_corpus(corpus)
    model = Transformer(ModelConfig(**SMALL))
    config = TrainConfig(**{"steps": steps, "micro_batch": 4, "warmup_steps": 3, "eval_every": 10,
                            "checkpoint_every": 5, "precision": "fp32", **overrides})
    train = TokenWindows([corpus], "uint16", 32, 1, config.micro_batch, seed=0)
    return Trainer(model, config, train, tmp / "ckpt",
                   validation=lambda: eval_batches([corpus], "uint16", 32, 4, 2), bytes_per_token=1.5)


def test_loss_falls(tmp_path):
    trainer = make_trainer(tmp_path, steps=40, lr=1e-2, checkpoint_every=100)
    seen = []
    trainer.callback = lambda step, metrics: seen.append(metrics)
    trainer.fit()
    assert seen[-1]["loss"] < 0.5 * seen[0]["loss"]
    assert "val_bpb" in seen[-1] and "max_vio" in seen[-1] and seen[-1]["mfu"] > 0


def test_throughput_counts_every_position_and_mfu_the_head_only_where_a_loss_is(tmp_path):
    """Fine-tuning scores the answers alone: tokens/s counts every input position, and the
    MFU the output head's FLOPs only at the positions with a target (`step_flops`)."""
    trainer = make_trainer(tmp_path, steps=1, checkpoint_every=100)
    windows = trainer.train.next_batch

    def answers_only():
        inputs, targets = windows()
        targets[:, :-3] = -100
        return inputs, targets

    trainer.train.next_batch = answers_only
    metrics = trainer.train_step()
    positions = trainer.config.grad_accum * 4 * 32
    scored = trainer.config.grad_accum * 4 * 3
    # both are per second of the same step: their ratio is the step's positions per FLOP, times the peak
    flops = step_flops(trainer.model, 32, positions, scored)
    assert flops < positions * flops_per_token(trainer.model, 32)
    assert metrics["tokens_per_s"] / metrics["mfu"] == pytest.approx(positions * trainer.peak_flops / flops)


def test_every_scored_token_weighs_alike_however_the_batch_is_split(tmp_path):
    """Fine-tuning's micro-batches hold different numbers of answer tokens: accumulated, the
    step's loss and gradient are still the mean over all of the step's scored tokens."""
    torch.manual_seed(1)
    inputs = torch.randint(3, 60, (4, 32))
    targets = inputs.roll(-1, 1)
    targets[:2, :-2] = -100  # two scored tokens in each of the first two rows, 32 in the others
    results = []
    for micro in (4, 2, 1):
        trainer = make_trainer(tmp_path, steps=1, micro_batch=micro, grad_accum=4 // micro, checkpoint_every=100)
        batches = iter([(inputs[i:i + micro], targets[i:i + micro]) for i in range(0, 4, micro)])
        trainer.train.next_batch = lambda: next(batches)
        metrics = trainer.train_step()
        results.append((metrics["loss"], metrics["grad_norm"]))
    whole = results[0]
    for split in results[1:]:
        assert split == pytest.approx(whole, rel=1e-4)


def test_after_step_runs_after_every_step_and_its_checkpoint(tmp_path):
    """Where the caller stops a run whose KeyboardInterrupt was dropped: after each step,
    once that step's checkpoint is written."""
    trainer = make_trainer(tmp_path, steps=7, checkpoint_every=5)
    seen = []
    trainer.after_step = lambda: seen.append((trainer.step, trainer.saved_step))
    trainer.fit()
    assert seen == [(1, 0), (2, 0), (3, 0), (4, 0), (5, 5), (6, 5), (7, 7)]


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_muon_orthogonalises_in_the_training_precision(tmp_path, precision, dtype):
    trainer = make_trainer(tmp_path, steps=1, optimizer="muon", precision=precision)
    muon = trainer.optimizer.optimizers[0]
    assert muon.ns_dtype == dtype and muon.param_groups[0]["name"] == "muon"


def test_mtp_without_loss_weight_is_not_run_nor_changed(tmp_path):
    trainer = make_trainer(tmp_path, steps=4, mtp_lambda=0.0, checkpoint_every=100)
    assert len(trainer.model.mtp) == 1
    before = {name: value.clone() for name, value in trainer.model.mtp.state_dict().items()}
    embeddings = trainer.model.embed_tokens.weight.detach().clone()
    seen = []
    trainer.callback = lambda step, metrics: seen.append(metrics)
    trainer.fit()
    assert [m["mtp_loss"] for m in seen if "mtp_loss" in m] == [0.0] * 4
    assert all(torch.equal(before[name], value) for name, value in trainer.model.mtp.state_dict().items())
    assert not torch.equal(embeddings, trainer.model.embed_tokens.weight)
    main_layers = len(trainer.model.moe_layers(mtp=False))
    assert 0 < main_layers < len(trainer.model.moe_layers())
    assert sorted(k for k in seen[-1] if k.startswith("max_vio/")) == [f"max_vio/moe_{i}" for i in range(main_layers)]


def test_non_finite_loss_stops_with_the_step_and_saves_nothing_bad(tmp_path):
    trainer = make_trainer(tmp_path, steps=12)
    trainer.config.steps = 5
    trainer.fit()  # a good checkpoint at step 5
    trainer.config.steps = 12
    with torch.no_grad():
        trainer.model.lm_head.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLoss, match="step 6: the loss and MTP loss are not finite .*checkpoint of step 5 is kept"):
        trainer.fit()
    latest = load_latest(tmp_path / "ckpt")
    assert latest.step == 5
    assert all(torch.isfinite(t).all() for t in latest.model_state.values())


def test_divergence_names_the_loss_that_is_not_finite_and_that_no_checkpoint_exists(tmp_path):
    trainer = make_trainer(tmp_path, steps=4)
    trainer.model.config.seq_aux_loss_alpha = float("inf")  # the balance loss alone overflows
    with pytest.raises(NonFiniteLoss) as raised:
        trainer.fit()
    message = str(raised.value)
    assert message.startswith("training stopped at step 1: the balance loss is not finite (")
    assert "balance loss inf" in message and "no checkpoint was written before it" in message
    assert not list((tmp_path / "ckpt").glob("step-*"))


def test_a_gradient_that_is_not_finite_stops_training_before_it_is_applied(tmp_path):
    trainer = make_trainer(tmp_path, steps=5, checkpoint_every=1, mtp_lambda=1e300)  # finite losses, inf gradients
    before = {name: value.clone() for name, value in trainer.model.state_dict().items()}
    with pytest.raises(NonFiniteLoss, match=r"step 1: the gradient norm is not finite \(loss [0-9.]+, .*gradient "
                                            r"norm (nan|inf)\); no checkpoint was written before it"):
        trainer.fit()
    assert all(torch.equal(before[name], value) for name, value in trainer.model.state_dict().items())
    assert not list((tmp_path / "ckpt").glob("step-*"))


def test_corrupted_checkpoint_falls_back_to_the_previous(tmp_path):
    make_trainer(tmp_path, steps=10).fit()
    newest = tmp_path / "ckpt" / "step-000010" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:-100])
    warnings = []
    trainer = make_trainer(tmp_path, steps=10)
    trainer.warn = warnings.append
    assert trainer.resume() and trainer.step == 5
    assert "step-000010" in warnings[0] and "checksum" in warnings[0]


def test_compiled_training_gives_eager_losses_and_resumes_exactly(tmp_path, monkeypatch):
    """`compile=True` trains through torch.compile: the losses are eager's, and a compiled run
    resumed from its checkpoint ends with the weights of one that ran straight through. The
    suite compiles with dynamo and AOT autograd over eager kernels ('aot_eager'): inductor's
    C++ kernels would take ~50 s here (the benchmarks measure them)."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    losses = {}
    for name, compile in ("eager", False), ("compiled", True):
        (tmp_path / name).mkdir()
        trainer = make_trainer(tmp_path / name, steps=6, checkpoint_every=3, eval_every=100, compile=compile)
        assert (trainer.net is not trainer.model) == compile
        trainer.callback = lambda step, metrics: losses.setdefault(name, []).append(metrics["loss"])
        trainer.fit()
    np.testing.assert_allclose(losses["compiled"], losses["eager"], rtol=1e-5)
    (tmp_path / "resumed").mkdir()
    first = make_trainer(tmp_path / "resumed", steps=6, checkpoint_every=3, eval_every=100, compile=True)

    def stop_at_4(step, metrics):
        if step == 4:
            raise KeyboardInterrupt  # a run stopped after its step-3 checkpoint

    first.callback = stop_at_4
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    second = make_trainer(tmp_path / "resumed", steps=6, checkpoint_every=3, eval_every=100, compile=True)
    assert second.resume() and second.step == 3
    second.fit()
    straight = load_file(str(tmp_path / "compiled" / "ckpt" / "step-000006" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / "ckpt" / "step-000006" / "model.safetensors"))
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


WORKER = textwrap.dedent(
    """
    import sys, torch
    from pathlib import Path
    sys.path.insert(0, {repo!r})
    torch.set_num_threads(1)
    from tests.model.test_trainer import make_trainer
    trainer = make_trainer(Path({tmp!r}), steps=30, checkpoint_every=3, keep_last=2)
    trainer.resume()
    trainer.fit()
    """
)


def run_worker(tmp: Path) -> subprocess.Popen:
    code = WORKER.format(repo=str(REPO), tmp=str(tmp))
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def final_weights(tmp: Path) -> dict[str, torch.Tensor]:
    return load_file(str(tmp / "ckpt" / "step-000030" / "model.safetensors"))


def test_sigkill_and_resume_gives_bit_identical_weights(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir(), killed.mkdir()
    assert run_worker(straight).wait(timeout=240) == 0
    rng = np.random.default_rng()
    for _ in range(2):  # kill twice, at a random moment after a checkpoint exists
        proc = run_worker(killed)
        deadline = time.time() + 120
        while not list((killed / "ckpt").glob("step-*")) and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.5))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert run_worker(killed).wait(timeout=240) == 0
    a, b = final_weights(straight), final_weights(killed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# Like tasks/train_worker.py, the rank's work runs in a function: the trainer, whose DDP wrapper
# holds the gloo process group, is freed when it returns. Left as a global, it was freed during
# interpreter shutdown, where gloo's threads can abort the process (SIGABRT, "terminate called
# without an active exception") after all the work is done.
DDP_WORKER = textwrap.dedent(
    """
    import json, os, sys, torch, torch.distributed as dist
    from pathlib import Path
    sys.path.insert(0, {repo!r})


    def train(rank, world):
        from tests.model.test_trainer import make_trainer
        from model.data import TokenWindows
        tmp = Path({tmp!r})
        trainer = make_trainer(tmp, steps=8, micro_batch=8 // world, checkpoint_every=100)
        trainer.validation = None
        trainer.train = TokenWindows([tmp / "train.bin"], "uint16", 32, 1, 8 // world, seed=0, rank=rank,
                                     world_size=world)
        losses = []
        trainer.callback = lambda step, metrics: losses.append(metrics["loss"])
        trainer.fit()
        if rank == 0:
            (tmp / f"losses-{{world}}.json").write_text(json.dumps(losses))


    torch.set_num_threads(1)
    rank, world = int(sys.argv[1]), int(sys.argv[2])
    if world > 1:
        dist.init_process_group("gloo", init_method="file://" + {rendezvous!r}, rank=rank, world_size=world)
    train(rank, world)
    if world > 1:
        dist.barrier()  # neither rank tears the file store down while the other still uses it
        dist.destroy_process_group()
    """
)


def test_ddp_two_gloo_processes_match_one_process(tmp_path):
    write_corpus(tmp_path / "train.bin")
    code = DDP_WORKER.format(repo=str(REPO), tmp=str(tmp_path), rendezvous=str(tmp_path / "rendezvous"))
    single = subprocess.run([sys.executable, "-c", code, "0", "1"], capture_output=True, text=True, timeout=240)
    assert single.returncode == 0, single.stdout + single.stderr
    procs = [subprocess.Popen([sys.executable, "-c", code, str(r), "2"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    for proc in procs:
        assert proc.wait(timeout=240) == 0, proc.stdout.read()
    import json

    one = json.loads((tmp_path / "losses-1.json").read_text())
    two = json.loads((tmp_path / "losses-2.json").read_text())
    assert len(one) == len(two) == 8
    np.testing.assert_allclose(two, one, rtol=1e-4, atol=1e-5)
