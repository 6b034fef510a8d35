"""A config is checked whole before any stage runs: a mistake is one line naming the field
and the fix, not defaults silently taken or a failure after hours of training."""

import pytest
import torch
from pydantic import ValidationError

from model.schedule import lr_at
from tasks.config import PipelineConfig, load_config
from tasks.stage import StageError


def test_a_misspelt_preset_is_refused_wherever_it_is_written(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("preset: demoo\n")
    with pytest.raises(StageError, match="unknown preset 'demoo'; did you mean demo"):
        load_config(None, config_file)
    with pytest.raises(StageError, match="unknown preset 'tny'; did you mean tiny"):
        load_config("tny")
    with pytest.raises(ValidationError, match="unknown preset 'demoo'"):  # a deployment's form
        PipelineConfig.model_validate({"preset": "demoo", "pretrain": {"steps": 5}})
    assert PipelineConfig.model_validate({"preset": "demo"}).model["hidden_size"] == 256
    assert PipelineConfig().preset == "custom"


def test_model_values_take_the_model_fields_types():
    config = load_config("tiny", overrides=["model.hidden_size=48", "model.rms_norm_eps=1e-5", "model.rope_theta=500"])
    assert config.model["hidden_size"] == 48 and type(config.model["hidden_size"]) is int
    assert config.model["rms_norm_eps"] == 1e-5  # YAML reads 1e-5 as text, as the other sections' values
    assert type(config.model["rope_theta"]) is int  # a float field keeps an integer as written
    assert type(PipelineConfig.model_validate({"model": {"hidden_size": "64"}}).model["hidden_size"]) is int
    for value, says in [("abc", "model.hidden_size='abc'"), ("32.5", "fractional part"), ("null", "valid integer")]:
        with pytest.raises(StageError, match=says):
            load_config("tiny", overrides=[f"model.hidden_size={value}"])
    with pytest.raises(StageError, match="model.rope_scaling='abc'"):
        load_config("tiny", overrides=["model.rope_scaling=abc"])


@pytest.mark.parametrize(
    "assignment, says",
    [("pretrain.steps=true", "config pretrain: steps must be a number, not true"),
     ("finetune.lr=false", "config finetune: lr must be a number, not false"),
     ("collect.sources=[{kind: stdlib, max_files: yes}]", r"config collect.sources.0.stdlib: max_files must be a "
                                                          "number, not true"),
     ("model.hidden_size=true", "config: model.hidden_size must be a number, not true"),
     ("model.rms_norm_eps=false", "config: model.rms_norm_eps must be a number, not false")],
)
def test_true_or_false_is_not_taken_for_a_number(assignment, says):
    """pydantic would read them as 1 and 0: `pretrain.steps=true` trained one step."""
    with pytest.raises(StageError, match=f"^{says}$"):
        load_config("tiny", overrides=[assignment])
    assert load_config("tiny", overrides=["pretrain.compile=1"]).pretrain.compile is True  # a number for a switch


@pytest.mark.parametrize("field, says", [("vocab_size", "set tokenize.vocab_size"), ("pad_token_id", "<pad>")])
def test_fields_the_tokenizer_decides_are_refused(field, says):
    with pytest.raises(StageError, match=f"model.{field} comes from the tokenizer: .*{says}"):
        load_config("tiny", overrides=[f"model.{field}=100"])


def test_sequences_longer_than_the_context_fail_before_training():
    with pytest.raises(StageError, match="finetune.seq_len=4096 exceeds model.max_position_embeddings="):
        load_config("tiny", overrides=["finetune.seq_len=4096"])
    load_config("tiny", overrides=["finetune.seq_len=4096", "model.max_position_embeddings=4096"])
    with pytest.raises(StageError, match="evaluate.max_new_tokens=256 leaves no room for a prompt within "
                                         "model.max_position_embeddings=256"):
        load_config("tiny", overrides=["evaluate.max_new_tokens=256"])
    load_config("tiny", overrides=["evaluate.max_new_tokens=255"])


@pytest.mark.parametrize("seed", ["-1", str(2**63)])
def test_a_training_seed_torch_and_numpy_cannot_take_is_refused(seed):
    with pytest.raises(StageError, match="pretrain.seed"):
        load_config("tiny", overrides=[f"pretrain.seed={seed}"])


def test_the_promotion_metric_is_one_evaluate_writes():
    assert load_config("tiny", overrides=["evaluate.primary_metric=exact_match_add_base"])
    assert load_config("tiny", overrides=["evaluate.primary_metric=val_loss"])
    with pytest.raises(StageError, match="did you mean exact_match_mean"):
        load_config("tiny", overrides=["evaluate.primary_metric=exact_match_meen"])
    with pytest.raises(StageError, match="'bogus' is not a metric evaluate writes; use one of val_loss"):
        load_config("tiny", overrides=["evaluate.primary_metric=bogus"])
    with pytest.raises(StageError, match="exact_match_add"):  # a family left out writes no metric
        load_config("tiny", overrides=["instructions.families=[upper]", "instructions.train_counts={}",
                                       "evaluate.primary_metric=exact_match_add"])


def test_set_mistakes_say_what_to_write():
    with pytest.raises(StageError, match=r"collect.sources is a list; set it whole, e.g. --set 'collect.sources=\[...\]'"):
        load_config("tiny", overrides=["collect.sources.0.max_files=5"])
    with pytest.raises(StageError, match=r"--set pretrain.steps: '\[1' is not a valid YAML value"):
        load_config("tiny", overrides=["pretrain.steps=[1"])
    with pytest.raises(StageError, match=r"^--set preset=demo: choose the preset with --preset demo$"):
        load_config("tiny", overrides=["preset=demo"])


def test_a_config_path_that_is_not_a_yaml_file(tmp_path):
    with pytest.raises(StageError, match="is a directory: give the path of a .yaml file"):
        load_config("tiny", tmp_path)
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)))
    with pytest.raises(StageError, match="not a text file"):
        load_config("tiny", binary)


def test_a_preset_changed_in_a_prefilled_form_takes_that_presets_values():
    """A deployment's run form shows its whole config; changing only `preset` there must give
    that preset, not the old values under the new name."""
    from tasks.config import switched_preset

    prefilled = load_config("tiny", overrides=["pretrain.steps=50"]).model_dump(mode="json")
    form = {**prefilled, "preset": "demo", "finetune": {**prefilled["finetune"], "steps": 3}}
    config = switched_preset(PipelineConfig.model_validate(form), prefilled, form)
    demo = load_config("demo", overrides=["finetune.steps=3"])
    assert config == demo  # tiny's 50 pretraining steps were the form's, not a change made in it
    unchanged = PipelineConfig.model_validate(prefilled)
    assert switched_preset(unchanged, prefilled, prefilled) is unchanged
    assert switched_preset(unchanged, None, None) is unchanged  # a run outside a deployment


def test_a_config_sent_in_part_to_a_deployment_keeps_every_value_it_names():
    """`--params '{"config": {"preset": "tiny", "pretrain": {"steps": 50}}}'` on a deployment of
    another preset: tiny with 50 steps, also where 50 is what the deployment's form holds."""
    from tasks.config import switched_preset

    prefilled = load_config("demo", overrides=["pretrain.steps=50"]).model_dump(mode="json")
    sent = {"preset": "tiny", "pretrain": {"steps": 50}, "finetune": {"optimizer": "muon"}}
    config = switched_preset(PipelineConfig.model_validate(sent), prefilled, sent)
    assert config == load_config("tiny", overrides=["pretrain.steps=50", "finetune.optimizer=muon"])


@pytest.mark.parametrize(
    "text, says",
    [("clean: {min_char: 5}\n", "config clean.min_char: unknown name; did you mean min_chars"),
     ("collect:\n  sources:\n    - {kind: files, path: corpus}\n",
      "config collect.sources.0.files.path: unknown name; did you mean paths?"),  # before 'paths' missing
     ("instructions:\n  user_data:\n    - {path: x.jsonl, test_fractio: 0.1}\n",
      "config instructions.user_data.0.test_fractio: unknown name; did you mean test_fraction?")],
)
def test_a_misspelt_name_in_a_config_file_gets_the_closest_names(tmp_path, text, says):
    (tmp_path / "run.yaml").write_text(text)
    with pytest.raises(StageError) as error:
        load_config("tiny", tmp_path / "run.yaml")
    assert str(error.value).startswith(says)
    assert "Field required" not in str(error.value)  # the misspelt name's missing twin is not listed again


def test_numbers_the_libraries_below_cannot_take_are_refused_by_the_config():
    with pytest.raises(StageError, match=r"clean.num_perm: Input should be less than or equal to 8192; "
                                         r"clean.minhash_seed: Input should be less than 18446744073709551616; "
                                         r"tokenize.min_frequency: Input should be less than 18446744073709551616$"):
        load_config("tiny", overrides=[f"clean.minhash_seed={2**64}", "clean.num_perm=1000000000",
                                       f"tokenize.min_frequency={2**64}"])
    load_config("tiny", overrides=[f"clean.minhash_seed={2**64 - 1}", f"tokenize.min_frequency={2**64 - 1}"])


def test_training_settings_that_would_exhaust_the_machine_are_refused():
    with pytest.raises(StageError, match=r"config pretrain.threads: Input should be less than or equal to 1024$"):
        load_config("tiny", overrides=["pretrain.threads=100000"])
    with pytest.raises(StageError, match=r"batch_tokens=1000000000000 takes [0-9,]+ passes of micro_batch x seq_len x "
                                         r"devices a step, more than 4,096: lower batch_tokens or raise micro_batch"):
        load_config("tiny", overrides=["finetune.batch_tokens=1000000000000"])


def test_every_problem_is_listed_up_to_four():
    with pytest.raises(StageError) as error:
        load_config("tiny", overrides=["pretrain.steps=abc", "pretrain.lr=-1"])
    assert str(error.value) == ("config pretrain.steps: Input should be a valid integer, unable to parse string as an "
                                "integer; pretrain.lr: Input should be greater than 0")
    five = ["pretrain.steps=a", "pretrain.lr=-1", "pretrain.warmup_steps=b", "clean.min_chars=c", "finetune.lr=0"]
    with pytest.raises(StageError, match=r"; pretrain.lr: Input should be greater than 0; .*; and 1 more$"):
        load_config("tiny", overrides=five)
    with pytest.raises(StageError, match=r"text_fild: unknown name; did you mean text_field\?; "
                                         r"collect.sources.0.files.paths: Field required$"):  # not a twin: listed
        load_config("tiny", overrides=["collect.sources=[{kind: files, text_fild: body}]"])
    with pytest.raises(StageError, match=r"--set reads values as YAML: quote text"):  # the second problem's hint
        load_config("tiny", overrides=["pretrain.steps=x", "instructions.system_prompt=You are: helpful"])


def test_the_preset_comes_from_the_option_or_the_file_and_they_must_agree(tmp_path):
    (tmp_path / "run.yaml").write_text("preset: demo\npretrain: {steps: 7}\n")
    assert load_config(None, tmp_path / "run.yaml", fallback="tiny").preset == "demo"
    assert load_config("demo", tmp_path / "run.yaml").pretrain.steps == 7
    assert load_config(None, None, fallback="tiny").preset == "tiny"
    with pytest.raises(StageError, match=r"--preset tiny but .*run.yaml says preset: demo; keep one of them"):
        load_config("tiny", tmp_path / "run.yaml")


def test_text_that_yaml_reads_as_something_else_gets_the_quoting_hint():
    with pytest.raises(StageError, match=r"--set reads values as YAML: quote text, e.g. "
                                         r"--set 'instructions.system_prompt=\"You are: helpful\"'"):
        load_config("tiny", overrides=["instructions.system_prompt=You are: helpful"])
    with pytest.raises(StageError, match=r"where 'kind:files' is one key: write a space after the colon$"):
        load_config("tiny", overrides=["collect.sources=[{kind:files, paths: [x]}]"])
    quoted = load_config("tiny", overrides=['instructions.system_prompt="You are: helpful"'])
    assert quoted.instructions.system_prompt == "You are: helpful"


@pytest.mark.parametrize(
    "overrides, says",
    [(["pretrain.lr=1e-4"], r"config pretrain: min_lr=0.0003 is above lr=0.0001: .* lower min_lr"),
     (["finetune.init_from=/somewhere"], r"finetune.init_from: fine-tuning starts from this run's pretrained model"),
     (["model.hidden_size=36"], r"model.hidden_size=36: the experts' grouped matmuls need a multiple of 8")],
)
def test_settings_that_would_fail_or_be_ignored_in_training_are_refused_first(overrides, says):
    with pytest.raises(StageError, match=says):
        load_config("tiny", overrides=overrides)


def test_a_batch_that_whole_passes_cannot_make_is_said():
    for preset in ("tiny", "demo", "gpu-small"):
        assert load_config(preset).pretrain.batch_notes() == load_config(preset).finetune.batch_notes() == []
    assert load_config("demo", None, ["pretrain.batch_tokens=6100"]).pretrain.batch_notes() == [
        "batch_tokens=6100 is trained as 4096 tokens a step: whole passes of micro_batch x seq_len x devices = 4096 "
        "tokens; set a multiple of 4096 to train the batch you mean"]
    assert load_config("demo", None, ["pretrain.batch_tokens=100", "pretrain.devices=2"]).pretrain.batch_notes()[0] \
        .startswith("batch_tokens=100 is trained as 8192 tokens a step")


def test_schedule_settings_the_run_cannot_follow_are_said():
    def notes(*overrides):
        return load_config("tiny", None, ["pretrain.schedule=wsd", *overrides]).pretrain.schedule_notes()

    assert load_config("demo").pretrain.schedule_notes() == []
    assert load_config("gpu-small").pretrain.schedule_notes() == []
    assert load_config("tiny", None, ["pretrain.steps=3", "pretrain.warmup_steps=3"]).pretrain.schedule_notes() == [
        "warmup_steps=3 is not less than steps=3: the learning rate warms up over the whole run"]
    assert notes("pretrain.steps=40", "pretrain.decay_fraction=0.01", "pretrain.warmup_steps=0") == [
        "decay_fraction=0.01 of 40 steps after warmup_steps=0 leaves no step to decay: the learning rate stays at lr; "
        "raise decay_fraction to 0.05 or more"]
    assert notes("pretrain.steps=40", "pretrain.decay_fraction=0.2", "pretrain.warmup_steps=39") == [
        "decay_fraction=0.2 of 40 steps after warmup_steps=39 leaves no step to decay: the learning rate stays at lr; "
        "lower warmup_steps to 32 or less"]
    assert notes("pretrain.steps=1", "pretrain.warmup_steps=0")[0].endswith("a run of one step has none to decay")
    for overrides, decays in ((["pretrain.decay_fraction=0.05", "pretrain.warmup_steps=0"], True),
                              (["pretrain.decay_fraction=0.01", "pretrain.warmup_steps=0"], False),
                              (["pretrain.decay_fraction=0.2", "pretrain.warmup_steps=38"], True),
                              (["pretrain.decay_fraction=0.2", "pretrain.warmup_steps=39"], False)):
        settings = load_config("tiny", None, ["pretrain.schedule=wsd", "pretrain.steps=40", *overrides]).pretrain
        last = lr_at(39, max_lr=settings.lr, min_lr=settings.min_lr, warmup_steps=settings.warmup_steps,
                     total_steps=40, kind="wsd", decay_fraction=settings.decay_fraction)
        assert (last < settings.lr) == decays and (settings.schedule_notes() == []) == decays, overrides


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("section", ["pretrain", "finetune"])
def test_a_training_device_that_is_not_here_is_named_by_its_section(section):
    config = load_config("tiny", overrides=[f"{section}.device=cuda"])
    settings = getattr(config, section)
    # also as `tasks.training` copies the section, with the precision `auto` resolved to
    for copy in settings, settings.model_copy(update={"precision": "fp32"}):
        with pytest.raises(StageError, match=f"^{section}.device cuda: no CUDA device is available here; use 'auto'"):
            copy.torch_device()
