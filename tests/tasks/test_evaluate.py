"""The evaluate stage: metrics with known answers, tables, promotion, and the stage end to end."""

import json
import math
import typing

import numpy as np
import pandas as pd
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from model.checkpoint import save_model
from model.data import eval_batches
from model.generate import CACHE_DTYPES
from model.transformer import Transformer
from tasks.chat import BOS, END, SPECIAL_TOKENS, render_prompt
from tasks.evaluate import (
    bits_per_byte,
    chat_completer,
    compare_with_champion,
    decide_promotion,
    evaluate,
    exact_match,
    exact_match_by_family,
    expert_load_table,
    generations_table,
    Validation,
    limit_notes,
    max_vio_table,
    measured_on,
    metrics_of,
    next_token_table,
    routed_load,
    validation_loss,
)
from tasks.evaluate_config import EvaluateConfig
from tasks.instructions import Example, InstructionConfig, build_examples
from tasks.stage import run_stage
from tasks.tokenize import show_token
from tests.model.helpers import config as model_config

TEXTS = ["def main():\n    return the value\n", "Convert 3 kilometers to meters.", "What is 12 + 7? 19"]
INSTRUCTIONS = InstructionConfig(families=["add", "reverse"], train_per_family=4, test_per_family=5)


@pytest.fixture(scope="module")
def tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TEXTS * 5, trainer)
    return tok


def tiny_model(vocab_size: int, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(model_config(vocab_size=vocab_size, max_position_embeddings=128)).eval()


@pytest.fixture(scope="module")
def net(tokenizer):
    return tiny_model(tokenizer.get_vocab_size())


def uniform_model(vocab_size: int) -> Transformer:
    """A model whose logits are all zero: every next token has probability 1/vocab."""
    net = tiny_model(vocab_size)
    torch.nn.init.zeros_(net.lm_head.weight)
    return net


def write_tokens(path, tokens, bos_id=1, docs=6, length=40):
    rng = np.random.default_rng(0)
    ids = np.concatenate([np.r_[bos_id, rng.integers(8, tokens, length)] for _ in range(docs)]).astype(np.uint16)
    ids.tofile(path)
    return path


# ---- pure metrics --------------------------------------------------------------------


def test_exact_match_compares_normalized_answers():
    assert exact_match(["45,000 m.", "12", " Stone ", "stone"], ["45000 m", "13", "Stone", "STONE"]) == 0.5
    assert exact_match([], []) == 0.0
    with pytest.raises(ValueError):
        exact_match(["a"], [])


def test_bits_per_byte_of_uniform_bytes_is_eight():
    assert bits_per_byte(math.log(256), 1.0) == pytest.approx(8.0)
    assert bits_per_byte(math.log(256), 2.0) == pytest.approx(4.0)
    with pytest.raises(ValueError):
        bits_per_byte(1.0, 0.0)


def test_validation_loss_of_constant_logits_is_ln_vocab(tmp_path):
    net = uniform_model(256)
    files = [write_tokens(tmp_path / "validation.bin", 256)]
    loss = validation_loss(net, eval_batches(files, "uint16", 16, 4, 3))
    assert loss == pytest.approx(math.log(256), rel=1e-5)
    assert bits_per_byte(loss, 1.0) == pytest.approx(8.0, rel=1e-5)
    assert validation_loss(net, []) is None


def test_validation_loss_ignores_masked_targets():
    net = uniform_model(64)
    inputs = torch.randint(0, 64, (2, 8))
    targets = torch.full((2, 8), -100)
    assert validation_loss(net, [(inputs, targets)]) is None
    targets[0, 0] = 3
    assert validation_loss(net, [(inputs, targets)]) == pytest.approx(math.log(64), rel=1e-5)


def test_routed_load_counts_every_routed_token():
    net = tiny_model(64)
    k = net.config.num_experts_per_tok
    with routed_load(net) as loads:
        net(torch.randint(0, 64, (3, 10)))
    main_layers = net.config.num_moe_layers
    assert loads[:main_layers].sum(dim=1).tolist() == [3 * 10 * k] * main_layers
    assert loads[main_layers:].sum() == 0  # the MTP block does not run without targets
    table = expert_load_table(loads)
    assert sorted(table["layer"].unique()) == list(range(main_layers))
    assert table.groupby("layer")["share"].sum().tolist() == pytest.approx([1.0] * main_layers)
    net(torch.randint(0, 64, (1, 4)))
    assert loads[:main_layers].sum(dim=1).tolist() == [3 * 10 * k] * main_layers  # hooks removed on exit


def test_max_vio_table_reads_per_layer_keys():
    table = max_vio_table({"max_vio/moe_1": 0.5, "max_vio/moe_0": 0.25, "max_vio": 0.5, "loss": 2.0})
    assert table.to_dict("list") == {"layer": [0, 1], "max_vio": [0.25, 0.5]}
    assert list(max_vio_table({}).columns) == ["layer", "max_vio"]


# ---- exact match by family --------------------------------------------------------------


def test_exact_match_by_family_scores_a_perfect_and_a_wrong_answerer():
    examples = build_examples(INSTRUCTIONS)["test"]
    answers = {json.dumps(e.messages[:-1]): e.answer for e in examples}

    def oracle(conversations):
        return [answers[json.dumps(messages)] + "." for messages in conversations]

    scores, rows = exact_match_by_family(examples, oracle)
    assert scores.to_dict("list") == {"family": ["add", "reverse"], "n": [5, 5], "exact_match": [1.0, 1.0]}
    assert rows["correct"].all()
    assert list(rows.columns) == ["family", "prompt", "expected", "got", "correct"]

    scores, rows = exact_match_by_family(examples, lambda conversations: ["no idea"] * len(conversations), 3)
    assert scores.to_dict("list") == {"family": ["add", "reverse"], "n": [3, 3], "exact_match": [0.0, 0.0]}
    assert not rows["correct"].any()
    assert rows["prompt"].tolist()[0] == examples[0].messages[0]["content"]


def test_exact_match_by_family_with_a_real_model(net, tokenizer):
    examples = build_examples(INSTRUCTIONS)["test"]
    scores, rows = exact_match_by_family(examples, chat_completer(net, tokenizer, 4, 4), 2)
    assert scores["n"].tolist() == [2, 2]
    assert scores["exact_match"].between(0, 1).all()
    assert len(rows) == 4 and rows["got"].map(type).eq(str).all()


# ---- generations and the next-token view ------------------------------------------------


def test_generations_table_has_both_kinds(net, tokenizer):
    table = generations_table(net, tokenizer, ["def ", "x"], ["What is 1 + 1?"], max_new_tokens=5, batch_size=2)
    assert table["kind"].tolist() == ["continuation", "continuation", "chat"]
    assert table["prompt"].tolist() == ["def ", "x", "What is 1 + 1?"]
    assert table["completion"].map(type).eq(str).all()


def test_next_token_table_is_sorted_and_a_distribution(net, tokenizer):
    table = next_token_table(net, tokenizer, "def main(", k=5)
    assert table["rank"].tolist() == [1, 2, 3, 4, 5]
    probs = table["probability"].to_numpy()
    assert (np.diff(probs) <= 0).all() and (probs > 0).all() and probs.sum() <= 1.0
    assert table["token"].tolist() == [show_token(tokenizer, i) for i in table["token_id"]]


def test_next_token_table_of_a_uniform_model(tokenizer):
    vocab = tokenizer.get_vocab_size()
    table = next_token_table(uniform_model(vocab), tokenizer, "def", k=3)
    assert table["probability"].tolist() == pytest.approx([1 / vocab] * 3)


# ---- champion comparison --------------------------------------------------------------


def test_decide_promotion():
    ours = {"exact_match_mean_base": 0.1, "exact_match_mean_tuned": 0.6, "val_bpb_tuned": 2.0}
    assert decide_promotion(ours, None, "exact_match_mean")[0]
    assert decide_promotion(ours, {}, "exact_match_mean")[0]
    assert decide_promotion(ours, {"exact_match_mean_tuned": 0.5}, "exact_match_mean")[0]
    assert not decide_promotion(ours, {"exact_match_mean_tuned": 0.6}, "exact_match_mean")[0]
    promote, reason = decide_promotion(ours, {"exact_match_mean_tuned": 0.7}, "exact_match_mean")
    assert not promote and "0.7" in reason
    # loss-like metrics are better when lower
    assert decide_promotion(ours, {"val_bpb_tuned": 2.5}, "val_bpb")[0]
    assert not decide_promotion(ours, {"val_bpb_tuned": 1.5}, "val_bpb")[0]
    # a suffixed name picks that exact value
    champion = {"exact_match_mean_base": 0.2, "exact_match_mean_tuned": 0.0}
    assert not decide_promotion(ours, champion, "exact_match_mean_base")[0]
    assert decide_promotion(ours, {"val_loss_tuned": 1.0}, "val_bpb")[0]  # champion lacks the metric
    # a diverged run is not promoted, and is told so
    promote, reason = decide_promotion({**ours, "val_bpb_tuned": float("nan")}, None, "val_bpb")
    assert not promote and reason == "not promoted: val_bpb is nan, not a finite number"
    # a metric this run did not measure (no validation split, say) is no ground to promote on
    promote, reason = decide_promotion(ours, None, "val_loss")
    assert not promote and reason == ("not promoted: this run measured no val_loss (evaluate.primary_metric) to "
                                      "decide on; it measured exact_match_mean, val_bpb")


def test_scores_measured_on_other_things_are_not_compared(tmp_path):
    examples = [Example(messages=[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}],
                        family=family, answer=f"a{i}") for i in range(3) for family in ("add", "convert_mass")]
    (tmp_path / "validation.bin").write_bytes(bytes(range(100)))
    val = Validation([tmp_path / "validation.bin"], "uint16", 3.0)
    config = EvaluateConfig()
    on = measured_on(examples, val, config)
    assert on == measured_on(list(examples), val, config.model_copy(update={"device": "cpu", "primary_metric": "val_bpb"}))
    fewer = measured_on(examples[:4], val, config)
    longer = measured_on(examples, val, config.model_copy(update={"max_new_tokens": 8}))
    windows = measured_on(examples, val, config.model_copy(update={"val_batches": 2}))
    assert fewer["exact_match"] != on["exact_match"] and fewer["validation"] == on["validation"]
    assert longer["exact_match"] != on["exact_match"] and windows["validation"] != on["validation"]
    assert windows["exact_match"] == on["exact_match"]
    fp8 = measured_on(examples, val, config.model_copy(update={"kv_cache_dtype": "fp8"}))
    assert fp8["exact_match"] != on["exact_match"] and fp8["validation"] == on["validation"]
    (tmp_path / "validation.bin").write_bytes(bytes(range(1, 101)))  # retokenized
    assert measured_on(examples, val, config)["validation"] != on["validation"]

    ours, theirs = {"exact_match_mean_tuned": 0.9, "val_bpb_tuned": 2.0}, {"exact_match_mean_tuned": 0.6}
    promote, reason = decide_promotion(ours, theirs, "exact_match_mean", fewer, on)
    assert not promote and reason.startswith("not compared: the champion's exact_match_mean was measured on other "
                                             "instruction problems")
    assert decide_promotion(ours, theirs, "exact_match_mean", windows, on)[0]  # only validation differs
    assert decide_promotion(ours, theirs, "exact_match_mean", on, {})[0]  # a champion from before the record
    assert decide_promotion(ours, {"val_bpb_tuned": 3.0}, "val_bpb", fewer, on)[0]
    assert not decide_promotion(ours, {"val_bpb_tuned": 3.0}, "val_bpb", windows, on)[0]


def test_compare_with_champion_lists_shared_metrics_primary_first():
    ours = {"val_loss_base": 3.0, "val_loss_tuned": 2.0, "exact_match_mean_tuned": 0.5, "max_vio_final": 0.1}
    theirs = {"val_loss_tuned": 2.5, "exact_match_mean_tuned": 0.5, "max_vio_final": 0.05}
    table = compare_with_champion(ours, theirs, "exact_match_mean")
    assert table.to_dict("list") == {
        "metric": ["exact_match_mean", "val_loss", "max_vio_final"],
        "challenger": [0.5, 2.0, 0.1],
        "champion": [0.5, 2.5, 0.05],
        "better": ["same", "challenger", "champion"],
    }
    assert compare_with_champion(ours, None, "val_loss").empty
    # scores measured on other problems are listed, not judged
    apart = compare_with_champion(ours, theirs, "exact_match_mean", {"exact_match": "A", "validation": "V"},
                                  {"exact_match": "B", "validation": "V"})
    assert apart["better"].tolist() == ["not comparable", "challenger", "champion"]


# ---- the stage end to end --------------------------------------------------------------


def saved_model(stage, root, tokenizer, seed, final_metrics):
    def build(out):
        save_model(tiny_model(tokenizer.get_vocab_size(), seed), out)
        tokenizer.save(str(out / "tokenizer.json"))
        return {"counts": {"steps": 1}, "final_metrics": final_metrics}

    return run_stage(stage, f"fp{seed}", build, root=root)


def test_evaluate_stage_writes_metrics_and_tables(ws, tokenizer, monkeypatch):
    base = saved_model("pretrain", ws, tokenizer, 1, {"max_vio": 0.4, "max_vio/moe_0": 0.4, "max_vio/moe_1": 0.2})
    tuned = saved_model("finetune", ws, tokenizer, 2, {"max_vio": 0.3, "max_vio/moe_0": 0.3, "max_vio/moe_1": 0.1})
    bos = tokenizer.token_to_id(BOS)
    val = [write_tokens(ws / "validation.bin", tokenizer.get_vocab_size(), bos_id=bos)]
    config = EvaluateConfig(
        max_new_tokens=4, batch_size=8, max_examples_per_family=2, val_batches=2, seq_len=32,
        prompts=["def "], chat_prompts=["What is 1 + 1?"], next_token_prompts=["def", "x"], top_k_tokens=3,
        device="cpu",
    )
    said = []
    ref = evaluate(base, tuned, config, INSTRUCTIONS, val, "uint16", 1.5, root=ws, log=said.append)
    examples = build_examples(INSTRUCTIONS)["test"]
    scored = [e for family in INSTRUCTIONS.families for e in [e for e in examples if e.family == family][:2]]
    assert said == limit_notes(scored, tokenizer, 4, 128) and said  # the tuned model's context; answers of 5+ tokens

    metrics = metrics_of(ref)
    for name in ("base", "tuned"):
        assert metrics[f"val_bpb_{name}"] == pytest.approx(metrics[f"val_loss_{name}"] / math.log(2) / 1.5)
        assert metrics[f"exact_match_mean_{name}"] == pytest.approx(
            (metrics[f"exact_match_add_{name}"] + metrics[f"exact_match_reverse_{name}"]) / 2
        )
        assert metrics[f"val_max_vio_{name}"] >= 0
    assert metrics["max_vio_final"] == 0.3
    assert metrics["val_loss_base"] != metrics["val_loss_tuned"]  # two different models were measured

    tables = {name: pd.read_parquet(ref.dir / f"{name}.parquet") for name in
              ("exact_match", "examples", "generations", "next_token", "expert_load", "max_vio")}
    assert list(tables["exact_match"].columns) == ["family", "n", "base", "tuned"]
    assert len(tables["examples"]) == 8 and set(tables["examples"]["model"]) == {"base", "tuned"}
    assert tables["generations"]["kind"].tolist() == ["continuation", "chat"]
    assert tables["generations"]["prompt"].tolist() == ["def ", "What is 1 + 1?"]
    assert {"base", "tuned"} <= set(tables["generations"].columns)
    assert len(tables["next_token"]) == 6
    assert {"token_base", "probability_base", "token_tuned", "probability_tuned"} <= set(tables["next_token"].columns)
    assert tables["max_vio"].to_dict("list") == {"layer": [0, 1], "pretrain": [0.4, 0.2], "finetune": [0.3, 0.1]}
    assert tables["expert_load"].groupby(["model", "layer"])["share"].sum().tolist() == pytest.approx([1.0] * 4)
    assert ref.counts == {"examples": 4, "families": 2}

    on_any_device = config.model_copy(update={"device": "auto"})
    again = evaluate(base, tuned, on_any_device, INSTRUCTIONS, val, "uint16", 1.5, root=ws)
    assert again.cached and again.path == ref.path
    moved = ws / "moved"
    moved.mkdir()
    moved_val = [moved / val[0].name]
    moved_val[0].write_bytes(val[0].read_bytes())
    assert evaluate(base, tuned, config, INSTRUCTIONS, moved_val, "uint16", 1.5, root=ws).cached  # same data elsewhere
    changed = evaluate(base, tuned, config.model_copy(update={"top_k_tokens": 2}), INSTRUCTIONS, val, "uint16", 1.5,
                       root=ws)
    assert not changed.cached and changed.path != ref.path

    # a validation split shorter than evaluate.seq_len is measured in windows that fit it, and said so
    short = [write_tokens(ws / "short.bin", tokenizer.get_vocab_size(), bos_id=bos, docs=1, length=19)]
    said.clear()
    fitted = evaluate(base, tuned, config, INSTRUCTIONS, short, "uint16", 1.5, root=ws, log=said.append)
    assert said[-1] == ("evaluate: no validation file holds more than 20 tokens: validation windows of 19 tokens "
                        "instead of evaluate.seq_len=32")
    assert {"val_loss_base", "val_loss_tuned"} <= set(metrics_of(fitted))
    (ws / "empty.bin").write_bytes(b"")  # clean.val_fraction=0: the split is an empty file
    said.clear()
    unmeasured = evaluate(base, tuned, config, INSTRUCTIONS, [ws / "empty.bin"], "uint16", 1.5, root=ws, log=said.append)
    assert said[-1] == ("evaluate: the validation split holds no tokens (clean.val_fraction=0, or a corpus too small "
                        "to give one): val_loss and val_bpb are not measured")
    assert not any(name.startswith("val_") for name in metrics_of(unmeasured))

    # a narrower decode cache is another measurement, and every generation decodes with it
    cache_dtypes = []
    new_caches = Transformer.new_caches
    monkeypatch.setattr(Transformer, "new_caches",
                        lambda self, *args: cache_dtypes.append(args[2]) or new_caches(self, *args))
    fp8 = evaluate(base, tuned, config.model_copy(update={"kv_cache_dtype": "fp8"}), INSTRUCTIONS, val, "uint16",
                   1.5, root=ws)
    assert not fp8.cached and fp8.path != ref.path
    assert cache_dtypes and set(cache_dtypes) == {torch.float8_e4m3fn}


def test_evaluate_config_rejects_unknown_fields():
    with pytest.raises(ValueError):
        EvaluateConfig(max_tokens=3)
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        EvaluateConfig(kv_cache_dtype="fp4")
    assert typing.get_args(EvaluateConfig.model_fields["kv_cache_dtype"].annotation) == tuple(CACHE_DTYPES)


def test_answers_and_prompts_the_scoring_cannot_get_right_are_said(tokenizer):
    examples = build_examples(INSTRUCTIONS)["test"]
    answer_tokens = [len(tokenizer.encode(e.answer, add_special_tokens=False).ids) for e in examples]
    prompt_tokens = [len(render_prompt(e.messages[:-1], tokenizer)) for e in examples]
    longest = max(answer_tokens)
    assert limit_notes(examples, tokenizer, longest, max(prompt_tokens) + longest) == []
    cut = sum(n == longest for n in answer_tokens)
    assert limit_notes(examples, tokenizer, longest - 1, 4096) == [
        f"evaluate: {cut} of {len(examples)} expected answers are longer than evaluate.max_new_tokens={longest - 1} "
        "tokens and cannot match exactly: raise it"]
    context = max(prompt_tokens) + longest - 1
    clipped = sum(n == max(prompt_tokens) for n in prompt_tokens)
    assert limit_notes(examples, tokenizer, longest, context) == [
        f"evaluate: {clipped} of {len(examples)} prompts are longer than the {context - longest} tokens the model's "
        f"context of {context} leaves beside evaluate.max_new_tokens={longest}: their first tokens are dropped"]
