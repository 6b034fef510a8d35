"""Instruction data: generated tasks, user data with quarantine, and chat rendering."""

import json
import random
import re
from fractions import Fraction

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from tasks.chat import (
    ASSISTANT,
    BOS,
    CHAT_TEMPLATE,
    END,
    EOS,
    PAD,
    SPECIAL_TOKENS,
    SYSTEM,
    USER,
    render,
    render_prompt,
)
from tasks.config import load_config
from tasks.instructions import (
    FAMILIES,
    UNITS,
    Example,
    InstructionConfig,
    UserDataSource,
    _conversions,
    _convert,
    build_examples,
    eval_texts,
    format_number,
    load_user_data,
    normalize_answer,
)
from tasks.stage import StageError

SMALL = {"train_per_family": 300, "test_per_family": 40}
CONVERT = [family for family in FAMILIES if family.startswith("convert_")]

# Unit sizes written out again here, so answers are checked against an independent table.
SIZES = {
    "millimeter": "0.001", "centimeter": "0.01", "meter": "1", "kilometer": "1000", "inch": "0.0254",
    "foot": "0.3048", "yard": "0.9144", "mile": "1609.344",
    "milligram": "0.001", "gram": "1", "kilogram": "1000", "tonne": "1000000", "ounce": "28.349523125",
    "pound": "453.59237",
    "millisecond": "0.001", "second": "1", "minute": "60", "hour": "3600", "day": "86400", "week": "604800",
    "milliliter": "1", "centiliter": "10", "deciliter": "100", "liter": "1000", "cubic meter": "1000000",
    "micrometer": "0.000001", "nanosecond": "0.000000001", "microsecond": "0.000001", "kiloliter": "1000000",
    "fluid ounce": "29.5735295625", "pint": "473.176473", "quart": "946.352946", "gallon": "3785.411784",
    "bit": "1", "byte": "8", "kilobyte": "8000", "megabyte": "8000000", "gigabyte": "8000000000",
    "terabyte": "8000000000000", "kibibyte": "8192", "mebibyte": "8388608",
}  # fmt: skip
PLURALS = {"inch": "inches", "foot": "feet"}
METRIC = {
    "convert_length": {"micrometer", "millimeter", "centimeter", "meter", "kilometer"},
    "convert_mass": {"milligram", "gram", "kilogram", "tonne"},
    "convert_time": {"nanosecond", "microsecond", "millisecond", "second"},
    "convert_volume": {"milliliter", "centiliter", "deciliter", "liter", "kiloliter"},
    "convert_data": {"byte", "kilobyte", "megabyte", "gigabyte", "terabyte"},
}
POWERS_OF_TEN = {Fraction(10) ** k for k in range(-6, 7)}
UNIT_NAMES = {PLURALS.get(name, name + "s"): name for name in SIZES} | {name: name for name in SIZES}
UNIT_PATTERN = "|".join(sorted(map(re.escape, UNIT_NAMES), key=len, reverse=True))
NUMBER = r"\d{1,3}(?:,\d{3})*(?:\.\d+)?"


def _number(text: str) -> Fraction:
    return Fraction(text.replace(",", ""))


def _conversion(prompt: str) -> tuple[Fraction, str, str]:
    """(value, source unit, target unit) read back from any conversion template."""
    value = re.search(NUMBER, prompt).group()
    after = prompt[prompt.index(value) + len(value) :]
    src = re.match(rf" ({UNIT_PATTERN})\b", after).group(1)
    units = re.findall(rf"\b({UNIT_PATTERN})\b", prompt)
    dst = units[1] if units[0] == src else units[0]
    return _number(value), UNIT_NAMES[src], UNIT_NAMES[dst]


def _expected(family: str, prompt: str) -> str | Fraction:
    """The answer to a generated prompt, recomputed from the prompt alone."""
    if family.startswith("convert_"):
        value, src, dst = _conversion(prompt)
        return value * Fraction(SIZES[src]) / Fraction(SIZES[dst])
    quoted = re.findall(r"'([a-z]+)'", prompt)
    if family == "reverse":
        return quoted[0][::-1]
    if family == "upper":
        return quoted[0].upper()
    if family == "count_letter":
        letter, word = sorted(quoted, key=len)
        return str(word.count(letter))
    a, b = map(int, re.findall(r"\d+", prompt))
    if family == "subtract":
        return str(a - b) if prompt.startswith(("What is", "Calculate")) else str(b - a)
    return str(a + b if family == "add" else a * b)


def _answer_value(family: str, answer: str) -> str | Fraction:
    return _number(answer.split(" ", 1)[0]) if family.startswith("convert_") else answer


def _problem_id(family: str, prompt: str) -> tuple:
    """What makes two prompts the same problem, whatever the template."""
    if family.startswith("convert_"):
        return _conversion(prompt)
    if family in ("reverse", "upper", "count_letter"):
        return tuple(sorted(re.findall(r"'([a-z]+)'", prompt)))
    return tuple(sorted(map(int, re.findall(r"\d+", prompt))))


def _prompt(example: Example) -> str:
    return example.messages[-2]["content"]


@pytest.fixture(scope="module", params=["metric", "all"])
def units(request):
    return request.param


@pytest.fixture(scope="module")
def small(units):
    return build_examples(InstructionConfig(units=units, **SMALL))


# ---------------------------------------------------------------------------
# Generated tasks


def test_same_seed_same_examples_and_other_seed_differs(small, units):
    again = build_examples(InstructionConfig(units=units, **SMALL))
    other = build_examples(InstructionConfig(seed=99, units=units, **SMALL))
    assert [e.model_dump() for e in again["train"]] == [e.model_dump() for e in small["train"]]
    assert [e.model_dump() for e in again["test"]] == [e.model_dump() for e in small["test"]]
    assert [_prompt(e) for e in other["test"]] != [_prompt(e) for e in small["test"]]
    assert [_prompt(e) for e in other["train"]] != [_prompt(e) for e in small["train"]]


def test_every_family_has_the_requested_counts(small):
    for split, n in (("train", SMALL["train_per_family"]), ("test", SMALL["test_per_family"])):
        counts = {family: 0 for family in FAMILIES}
        for example in small[split]:
            counts[example.family] += 1
        assert counts == {family: n for family in FAMILIES}


def test_train_counts_weight_chosen_families():
    config = InstructionConfig(families=["add", "upper"], train_per_family=30, test_per_family=5,
                               train_counts={"add": 90})
    examples = build_examples(config)
    families = [e.family for e in examples["train"]]
    assert (families.count("add"), families.count("upper")) == (90, 30)
    assert len({_prompt(e) for e in examples["train"] if e.family == "add"}) == 90
    with pytest.raises(ValidationError):
        InstructionConfig(train_counts={"divide": 10})
    with pytest.raises(ValidationError):
        InstructionConfig(train_counts={"add": -1})


def test_set_reaches_into_train_counts():
    config = load_config("tiny", overrides=["instructions.train_counts.add=50"])
    assert config.instructions.train_counts == {"add": 50}
    with pytest.raises(StageError, match="instructions.train_counts.divide"):
        load_config("tiny", overrides=["instructions.train_counts.divide=5"])


def test_no_test_problem_is_trained_on_under_any_phrasing(small):
    train_prompts = {_prompt(e) for e in small["train"]}
    assert not train_prompts & {_prompt(e) for e in small["test"]}
    train_problems = {(e.family, _problem_id(e.family, _prompt(e))) for e in small["train"]}
    test_problems = [(e.family, _problem_id(e.family, _prompt(e))) for e in small["test"]]
    assert len(set(test_problems)) == len(test_problems)
    assert not train_problems & set(test_problems)


def test_answers_are_correct_for_every_family(small):
    examples = small["test"] + random.Random(0).sample(small["train"], 600)
    seen = set()
    for example in examples:
        prompt = _prompt(example)
        assert example.messages[-1] == {"role": "assistant", "content": example.answer}
        assert _answer_value(example.family, example.answer) == _expected(example.family, prompt), prompt
        seen.add(example.family)
    assert seen == set(FAMILIES)


def test_conversion_answers_are_exact_and_formatted(small, units):
    convert = [e for e in small["train"] + small["test"] if e.family in CONVERT]
    symbols = {unit.symbol for family_units in UNITS[units].values() for unit in family_units}
    for example in convert:
        number, symbol = example.answer.split(" ", 1)
        assert re.fullmatch(r"\d{1,3}(,\d{3})*(\.\d{1,3})?", number), example.answer
        assert not number.endswith("0") or "." not in number
        assert symbol in symbols


def test_convert_45_kilometers_to_meters():
    class Fixed(random.Random):
        def randint(self, a, b):
            return 45

        def random(self):
            return 0.99

        def choice(self, seq):
            return seq[0]

        def __init__(self):
            super().__init__(0)

    length = {unit.name: unit for unit in UNITS["metric"]["convert_length"]}
    problem = _convert(_conversions([length["kilometer"], length["meter"]], 10**6), Fixed())
    assert (problem.prompt, problem.answer) == ("Convert 45 kilometers to meters.", "45,000 m")


def test_metric_is_the_default_and_converts_by_powers_of_ten_only():
    assert InstructionConfig().units == "metric"
    data = build_examples(InstructionConfig(families=CONVERT))  # the default sizes: 2000 train, 100 test
    used = {family: set() for family in CONVERT}
    for example in data["train"] + data["test"]:
        value, src, dst = _conversion(_prompt(example))
        assert {src, dst} <= METRIC[example.family], _prompt(example)
        assert _answer_value(example.family, example.answer) / value in POWERS_OF_TEN, _prompt(example)
        assert len(example.answer.split(" ")[0]) <= 12, example.answer
        used[example.family] |= {src, dst}
    assert used == METRIC
    for split, n in (("train", 2000), ("test", 100)):
        for family in CONVERT:
            assert len({_prompt(e) for e in data[split] if e.family == family}) == n
    everything = build_examples(InstructionConfig(families=["convert_length"], units="all", **SMALL))
    ratios = {_answer_value("convert_length", e.answer) / _conversion(_prompt(e))[0] for e in everything["train"]}
    assert ratios - POWERS_OF_TEN


@pytest.mark.parametrize(
    "value, text",
    [(Fraction(45000), "45,000"), (Fraction(9, 8), "1.125"), (Fraction(45, 1000), "0.045"),
     (Fraction(12345678, 10), "1,234,567.8"), (Fraction(7), "7")],
)  # fmt: skip
def test_format_number(value, text):
    assert format_number(value) == text


def test_arithmetic_digits_and_system_prompt():
    config = InstructionConfig(families=["add", "multiply"], digits=3, train_per_family=50, test_per_family=10,
                               system_prompt="Answer briefly.")  # fmt: skip
    data = build_examples(config)
    for example in data["train"] + data["test"]:
        assert example.messages[0] == {"role": "system", "content": "Answer briefly."}
        assert all(100 <= n <= 999 for n in map(int, re.findall(r"\d+", _prompt(example))))
    assert {e.family for e in data["train"]} == {"add", "multiply"}


def test_too_small_a_family_is_a_clear_error():
    with pytest.raises(StageError, match="'add' has only .* test_per_family=500"):
        build_examples(InstructionConfig(families=["add"], digits=1, test_per_family=500, train_per_family=1))


def test_small_families_repeat_training_prompts_but_never_test_words():
    data = build_examples(InstructionConfig(families=["reverse"], train_per_family=2500, test_per_family=100))
    assert len(data["train"]) == 2500
    test_words = {_problem_id("reverse", _prompt(e)) for e in data["test"]}
    assert not test_words & {_problem_id("reverse", _prompt(e)) for e in data["train"]}


def test_eval_texts_hold_test_prompts_and_answers_only():
    config = InstructionConfig(families=["upper", "add"], train_per_family=20, test_per_family=5, system_prompt="Hi.")
    texts = eval_texts(config)
    test = build_examples(config)["test"]
    assert set(texts) == {_prompt(e) for e in test} | {e.answer for e in test}
    assert "Hi." not in texts


def test_config_rejects_unknown_fields_and_families():
    with pytest.raises(ValidationError):
        InstructionConfig(families=["divide"])
    with pytest.raises(ValidationError):
        InstructionConfig(epochs=3)
    with pytest.raises(ValidationError):
        InstructionConfig(units="imperial")
    assert InstructionConfig().families == list(FAMILIES)


# ---------------------------------------------------------------------------
# User data

ALPACA_LINES = [
    {"instruction": "Name a color.", "output": "Blue"},  # 1 good
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},  # 2 good, with input
    {"instruction": "Say hi.", "output": 42},  # 3 wrong type
    {"instruction": "Say hi."},  # 4 missing output
    {"instruction": "Say hi.", "output": "   "},  # 5 empty answer
    "{not json",  # 6 invalid JSON
    None,  # 7 blank line: skipped, still counted
    ["a", "list"],  # 8 not an object
    {"prompt": "x", "completion": "y"},  # 9 unknown shape
    {"output": "Yes"},  # 10 missing instruction
]
MESSAGES_LINES = [
    {"messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"}]},
    {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"},
                  {"role": "assistant", "content": "6"}]},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello"}]},
    {"messages": [{"role": "user", "content": "Hi"}]},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]},
    {"messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": "x"}]},
    {"messages": "Hi"},
    {"messages": [{"role": "system", "content": "S"}, {"role": "assistant", "content": "x"}]},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "system", "content": "S"},
                  {"role": "assistant", "content": "x"}]},
    {"messages": [{"content": "Hi"}, {"role": "assistant", "content": "x"}]},
]  # fmt: skip


def _write_jsonl(path, rows):
    lines = ["" if row is None else row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_alpaca_jsonl_quarantines_each_bad_row_with_its_line(tmp_path):
    examples, quarantine = load_user_data(UserDataSource(path=str(_write_jsonl(tmp_path / "a.jsonl", ALPACA_LINES))))
    assert [e.messages for e in examples] == [
        [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue"}],
        [{"role": "user", "content": "Add the numbers.\n\n2 and 3"}, {"role": "assistant", "content": "5"}],
    ]
    assert [(e.family, e.answer) for e in examples] == [("user", "Blue"), ("user", "5")]
    assert quarantine == [
        {"line": 3, "reason": "'output' is not a string"},
        {"line": 4, "reason": "missing 'output'"},
        {"line": 5, "reason": "empty 'output'"},
        {"line": 6, "reason": "invalid JSON"},
        {"line": 8, "reason": "row is not an object"},
        {"line": 9, "reason": "neither 'messages' nor 'instruction'/'output'"},
        {"line": 10, "reason": "missing 'instruction'"},
    ]


def test_a_line_that_is_not_utf8_is_quarantined_and_the_rows_around_it_kept(tmp_path):
    path = tmp_path / "mixed.jsonl"
    before, after = (json.dumps({"instruction": "Name a color.", "output": answer}).encode()
                     for answer in ("Blue", "Red"))
    latin1 = '{"instruction": "Caf\u00e9?", "output": "yes"}'.encode("latin-1")
    path.write_bytes(before + b"\n" + latin1 + b"\n" + after + b"\n")
    examples, quarantine = load_user_data(UserDataSource(path=str(path)))
    assert len(examples) == 2 and quarantine == [{"line": 2, "reason": "invalid UTF-8"}]
    array = tmp_path / "rows.json"
    array.write_bytes(b'[{"instruction": "Caf\xe9?", "output": "yes"}]')
    with pytest.raises(StageError, match=r"rows.json: not UTF-8 text \(byte 21: invalid continuation byte"):
        load_user_data(UserDataSource(path=str(array)))


def test_json_python_cannot_hold_is_quarantined_or_a_one_line_error(tmp_path):
    good = json.dumps({"instruction": "Name a color.", "output": "Blue"})
    huge, deep = '{"instruction": "x", "output": %s}' % ("9" * 5000), "[" * 100_000 + "]" * 100_000
    surrogate = '{"instruction": "hi \\ud800 there", "output": "ok"}'
    user = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\\udfff"}]}'
    other = json.dumps({"instruction": "Name a fruit.", "output": "Pear"})
    path = _write_jsonl(tmp_path / "odd.jsonl", [good, huge, deep, surrogate, user, other])
    examples, quarantine = load_user_data(UserDataSource(path=str(path)))
    assert len(examples) == 2
    assert quarantine == [
        {"line": 2, "reason": "invalid JSON (Exceeds the limit (4300 digits) for integer string conversion: "
                                  "value has 5000 digits)"},
        {"line": 3, "reason": "invalid JSON (nested too deep to parse)"},
        {"line": 4, "reason": "'instruction' holds a lone surrogate (U+D800), not a character"},
        {"line": 5, "reason": "assistant content holds a lone surrogate (U+DFFF), not a character"},
    ]
    (tmp_path / "rows.json").write_text("[" + huge + "]")
    with pytest.raises(StageError, match=r"rows.json: invalid JSON \(Exceeds the limit \(4300 digits\)"):
        load_user_data(UserDataSource(path=str(tmp_path / "rows.json")))
    (tmp_path / "one.json").write_text("{\n" + huge[1:])
    with pytest.raises(StageError, match="one.json: no usable rows"):  # not the one-object message: it is no object
        load_user_data(UserDataSource(path=str(tmp_path / "one.json")))


def test_a_byte_order_mark_utf16_and_an_upper_case_ending_are_read(tmp_path):
    rows = [{"instruction": "Name a color.", "output": "Blue"}, {"instruction": "2 + 3?", "output": "5"}]
    bom = b"\xef\xbb\xbf"
    (tmp_path / "LINES.JSONL").write_bytes(bom + _write_jsonl(tmp_path / "x", rows).read_bytes())
    (tmp_path / "ARRAY.Json").write_bytes(bom + json.dumps(rows, indent=2).encode())
    lines = _write_jsonl(tmp_path / "x", rows).read_text()
    (tmp_path / "utf16.jsonl").write_bytes(lines.encode("utf-16"))  # Windows' "Unicode": a byte-order mark first
    (tmp_path / "utf16-be.json").write_bytes(b"\xfe\xff" + json.dumps(rows).encode("utf-16-be"))
    for name in ("LINES.JSONL", "ARRAY.Json", "utf16.jsonl", "utf16-be.json"):
        examples, quarantine = load_user_data(UserDataSource(path=str(tmp_path / name)))
        assert [e.answer for e in examples] == ["Blue", "5"] and quarantine == [], name
    (tmp_path / "broken.jsonl").write_bytes(lines.encode("utf-16") + b"\x00\xd8A\x00")
    with pytest.raises(StageError, match=r"broken.jsonl: not UTF-16 text after its byte-order mark \(byte \d+: "
                                         r"illegal UTF-16 surrogate\); save it as UTF-8"):
        load_user_data(UserDataSource(path=str(tmp_path / "broken.jsonl")))


def test_an_edited_user_data_file_makes_new_fine_tuning_and_evaluation(tmp_path):
    """The stages built from the user's examples are keyed by the files' content: not only by
    their path, and not by their times (an edit keeping size and time still counts; a `touch`
    or the same bytes written again do not)."""
    import os

    from tasks.config import load_config
    from tasks.evaluate import Validation, evaluate_fingerprint
    from tasks.finetune import finetune_fingerprint
    from tasks.stage import Ref

    path = _write_jsonl(tmp_path / "mine.jsonl", ALPACA_LINES)
    config = load_config("tiny", overrides=[f"instructions.user_data=[{{path: {path}}}]"])
    pretrained = Ref(stage="pretrain", path=str(tmp_path), fingerprint="p")
    tuned = Ref(stage="finetune", path=str(tmp_path), fingerprint="t")
    val = Validation([], "uint16", 1.0)

    def fingerprints() -> tuple[str, str]:
        return (finetune_fingerprint(pretrained, config),
                evaluate_fingerprint(pretrained, tuned, config.evaluate, config.instructions, val))

    before = fingerprints()
    assert fingerprints() == before
    os.utime(path, ns=(1, 1))
    _write_jsonl(path, ALPACA_LINES)
    assert fingerprints() == before
    stat = path.stat()
    path.write_bytes(path.read_bytes().replace(b"Blue", b"Pink"))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the same size and time
    after = fingerprints()
    assert after[0] != before[0] and after[1] != before[1]


def test_messages_jsonl_quarantines_each_bad_row_with_its_line(tmp_path):
    examples, quarantine = load_user_data(UserDataSource(path=str(_write_jsonl(tmp_path / "m.jsonl", MESSAGES_LINES))))
    assert [e.messages for e in examples] == [MESSAGES_LINES[0]["messages"], MESSAGES_LINES[1]["messages"]]
    assert [e.answer for e in examples] == ["Paris", "6"]
    assert quarantine == [
        {"line": 3, "reason": "unknown role 'bot'"},
        {"line": 4, "reason": "last message is not from the assistant"},
        {"line": 5, "reason": "empty assistant content"},
        {"line": 6, "reason": "a message's 'content' is not a string"},
        {"line": 7, "reason": "'messages' is not a non-empty list"},
        {"line": 8, "reason": "no user message"},
        {"line": 9, "reason": "system message not first"},
        {"line": 10, "reason": "a message has no 'role'"},
    ]


def test_a_repeated_conversation_is_quarantined_unless_duplicates_are_kept(tmp_path):
    rows = [{"instruction": "Name a color.", "output": "Blue"}, {"instruction": "2 + 3?", "output": "5"},
            {"instruction": "Name a color.", "output": "Blue"}, {"instruction": "Name a color.", "output": "Red"},
            MESSAGES_LINES[0], {"instruction": "Capital of France?", "output": "Paris"}]  # fmt: skip
    path = str(_write_jsonl(tmp_path / "d.jsonl", rows))
    examples, quarantine = load_user_data(UserDataSource(path=path))
    assert [e.answer for e in examples] == ["Blue", "5", "Red", "Paris"]  # another answer is another example
    assert quarantine == [{"line": 3, "reason": "duplicate of line 1"}, {"line": 6, "reason": "duplicate of line 5"}]
    examples, quarantine = load_user_data(UserDataSource(path=path, keep_duplicates=True))
    assert [e.answer for e in examples] == ["Blue", "5", "Blue", "Red", "Paris", "Paris"] and quarantine == []


def test_rows_repeating_an_earlier_source_are_quarantined(tmp_path):
    first = str(_write_jsonl(tmp_path / "a.jsonl", ALPACA_LINES[:2]))
    shape = {"instruction": "Name a shape.", "output": "Circle"}
    second = str(_write_jsonl(tmp_path / "b.jsonl", [ALPACA_LINES[1], shape]))

    def user_rows(*sources):
        quarantine = []
        data = build_examples(InstructionConfig(families=[], user_data=list(sources)), quarantine=quarantine)
        return [e.answer for e in data["train"]], quarantine

    answers, quarantine = user_rows(UserDataSource(path=first), UserDataSource(path=second))
    assert answers == ["Blue", "5", "Circle"]
    assert quarantine == [{"source": second, "line": 1, "reason": f"duplicate of {first} line 2 (an earlier source)"}]
    answers, quarantine = user_rows(UserDataSource(path=first), UserDataSource(path=second, keep_duplicates=True))
    assert answers == ["Blue", "5", "5", "Circle"] and quarantine == []
    answers, quarantine = user_rows(UserDataSource(path=first), UserDataSource(path=first))  # one file listed twice
    assert answers == ["Blue", "5"]
    assert quarantine == [{"source": first, "line": line, "reason": f"duplicate of {first} line {line} (an earlier "
                                                                     "source)"} for line in (1, 2)]  # fmt: skip


def test_user_rows_asking_a_generated_prompt_across_the_split_are_quarantined(tmp_path):
    """A generated test prompt in the user's data would be trained on (or tested twice); a
    generated training prompt held out from it would be tested on what was trained."""
    generated = build_examples(InstructionConfig(families=["upper"], train_per_family=10, test_per_family=5))
    test, train = generated["test"][0], generated["train"][0]
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, *test.messages[:-1],
                          {"role": "assistant", "content": "another answer"}]},
            {"messages": train.messages}, {"instruction": "Name a color.", "output": "Blue"},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                          *test.messages]}]  # the test question after other turns  # fmt: skip
    path = str(_write_jsonl(tmp_path / "u.jsonl", rows))

    def user_rows(test_fraction):
        config = InstructionConfig(families=["upper"], train_per_family=10, test_per_family=5,
                                   user_data=[UserDataSource(path=path, test_fraction=test_fraction)])
        quarantine = []
        data = build_examples(config, quarantine=quarantine)
        return ([e.answer for e in data[split] if e.family == "user"] for split in data), quarantine

    (train_answers, test_answers), quarantine = user_rows(0.0)
    assert train_answers == [train.answer, "Blue"] and test_answers == []  # more training on a trained prompt
    assert quarantine == [{"source": path, "line": line, "reason": "same prompt as a held-out test example of upper"}
                          for line in (1, 4)]  # fmt: skip
    (train_answers, test_answers), quarantine = user_rows(1.0)
    assert train_answers == [] and test_answers == ["Blue"]
    assert [entry["reason"] for entry in quarantine] == [
        "same prompt as a held-out test example of upper",
        "held out, but its prompt is that of a training example of upper",
        "same prompt as a held-out test example of upper"]


def test_a_question_is_held_out_or_not_whatever_its_context(tmp_path):
    rows = [{"messages": [*context, {"role": "user", "content": f"Repeat {i}."},
                          {"role": "assistant", "content": f"{i}"}]}
            for i in range(50) for context in ([], [{"role": "system", "content": "Be exact."}])]  # fmt: skip
    source = UserDataSource(path=str(_write_jsonl(tmp_path / "u.jsonl", rows)), test_fraction=0.5)
    data = build_examples(InstructionConfig(families=[], user_data=[source]))
    held_out = [_prompt(e) for e in data["test"]]
    assert 0 < len(held_out) < 100 and all(held_out.count(prompt) == 2 for prompt in held_out)


def test_a_test_fraction_that_holds_out_no_row_is_said(tmp_path):
    rows = [{"instruction": f"Repeat {i}.", "output": str(i)} for i in range(3)]
    path = str(_write_jsonl(tmp_path / "few.jsonl", rows))

    def notes(fraction):
        said = []
        config = InstructionConfig(families=[], user_data=[UserDataSource(path=path, test_fraction=fraction)])
        return said if build_examples(config, notes=said) else None

    assert notes(1e-9) == [
        f"instructions: test_fraction=1e-09 held out none of the 3 rows kept from {path} (rows are held out by a "
        "hash of their question), so none is evaluated; raise test_fraction or add rows"]
    assert notes(1.0) == notes(0.0) == []  # all held out; none asked for
    said = []  # a source all of whose rows repeat an earlier one's has no row to hold out
    twice = [UserDataSource(path=path), UserDataSource(path=path, test_fraction=1e-9)]
    build_examples(InstructionConfig(families=[], user_data=twice), notes=said)
    assert said == []


def test_forced_format_checks_that_format(tmp_path):
    path = _write_jsonl(tmp_path / "m.jsonl", MESSAGES_LINES[:1] + ALPACA_LINES[:1])
    examples, quarantine = load_user_data(UserDataSource(path=str(path), format="alpaca"))
    assert [e.answer for e in examples] == ["Blue"]
    assert quarantine == [{"line": 1, "reason": "missing 'instruction'"}]


def test_parquet_json_array_and_saved_dataset_sources(tmp_path):
    good = MESSAGES_LINES[:2]
    pq.write_table(pa.Table.from_pylist(good), tmp_path / "m.parquet")
    (tmp_path / "a.json").write_text(json.dumps([ALPACA_LINES[0], ALPACA_LINES[3]], indent=2))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ALPACA_LINES[:2])}).save_to_disk(tmp_path / "saved")

    examples, quarantine = load_user_data(UserDataSource(path=str(tmp_path / "m.parquet")))
    assert [e.answer for e in examples] == ["Paris", "6"] and quarantine == []
    examples, quarantine = load_user_data(UserDataSource(path=str(tmp_path / "a.json")))
    assert [e.answer for e in examples] == ["Blue"] and quarantine == [{"line": 2, "reason": "missing 'output'"}]
    examples, quarantine = load_user_data(UserDataSource(path=str(tmp_path / "saved")))
    assert [e.answer for e in examples] == ["Blue", "5"] and quarantine == []
    with pytest.raises(StageError, match="no split 'test'"):
        load_user_data(UserDataSource(path=str(tmp_path / "saved"), split="test"))


def test_a_table_mixing_both_formats_reads_each_row_by_the_fields_it_fills(tmp_path):
    """A table has every column in every row: an alpaca row's `messages` is null there."""
    rows = [{**ALPACA_LINES[0], "messages": None}, {**MESSAGES_LINES[0], "instruction": None, "output": None}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "mixed.parquet")
    examples, quarantine = load_user_data(UserDataSource(path=str(tmp_path / "mixed.parquet")))
    assert [e.answer for e in examples] == ["Blue", "Paris"] and quarantine == []


def test_a_parquet_file_that_cannot_be_read_is_a_one_line_error(tmp_path):
    pq.write_table(pa.Table.from_pylist(MESSAGES_LINES[:2]), tmp_path / "whole.parquet")
    whole = (tmp_path / "whole.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "text.parquet").write_text("not parquet at all")
    for name in ("cut.parquet", "text.parquet"):
        with pytest.raises(StageError, match=f"{name}: not a readable Parquet file \\(.+\\)$"):
            load_user_data(UserDataSource(path=str(tmp_path / name)))


def test_a_file_with_no_usable_row_is_a_one_line_error(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", ["{oops", {"instruction": "x"}, {"instruction": "y"}])
    with pytest.raises(StageError) as error:
        load_user_data(UserDataSource(path=str(path)))
    message = str(error.value)
    assert "\n" not in message and str(path) in message
    assert "missing 'output' (2 rows), invalid JSON (1 row)" in message
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(StageError, match="empty.jsonl: no usable rows: it has no rows"):
        load_user_data(UserDataSource(path=str(tmp_path / "empty.jsonl")))


def test_unreadable_sources_are_clear_errors(tmp_path):
    with pytest.raises(StageError, match="no such file"):
        load_user_data(UserDataSource(path=str(tmp_path / "missing.jsonl")))
    with pytest.raises(StageError, match=r"cannot load user data 'nobody/no-such-dataset': .* \(read as a hub "
                                         r"dataset name: there is no file or folder .*nobody/no-such-dataset\)"):
        load_user_data(UserDataSource(path="nobody/no-such-dataset"))  # the hub is offline in tests
    (tmp_path / "rows.csv").write_text("a,b\n")
    with pytest.raises(StageError, match="unsupported file type"):
        load_user_data(UserDataSource(path=str(tmp_path / "rows.csv")))


def test_user_data_joins_training_with_a_stable_test_fraction(tmp_path):
    rows = [{"instruction": f"Repeat {i}.", "output": str(i)} for i in range(200)] + ["{bad"]
    source = UserDataSource(path=str(_write_jsonl(tmp_path / "u.jsonl", rows)), test_fraction=0.25)
    config = InstructionConfig(families=["upper"], train_per_family=10, test_per_family=5, user_data=[source],
                               system_prompt="Be exact.")  # fmt: skip
    quarantine = []
    data = build_examples(config, quarantine=quarantine)
    user = {split: [e for e in data[split] if e.family == "user"] for split in data}
    assert len(user["train"]) + len(user["test"]) == 200
    assert 25 <= len(user["test"]) <= 75
    assert {_prompt(e) for e in user["train"]}.isdisjoint(_prompt(e) for e in user["test"])
    assert all(e.messages[0] == {"role": "system", "content": "Be exact."} for e in user["train"])
    assert quarantine == [{"source": source.path, "line": 201, "reason": "invalid JSON"}]
    again = build_examples(config)
    assert [e.answer for e in again["test"]] == [e.answer for e in data["test"]]


# ---------------------------------------------------------------------------
# Normalisation


@pytest.mark.parametrize(
    "a, b",
    [("45,000 m", "45000 m"), ("  Paris. ", "Paris"), ("1,234,567", "1234567"), ("a  b\n c", "a b c"), ("7.", "7")],
)  # fmt: skip
def test_normalize_answer_equal(a, b):
    assert normalize_answer(a) == normalize_answer(b)


@pytest.mark.parametrize("a, b", [("45,00 m", "4500 m"), ("1.5", "15"), ("85", "58"), ("tenalp", "planet"),
                                  ("fire", "FIRE"), ("400,000 b", "400,000 B"), ("0.39 Mm", "0.39 mm")])
def test_normalize_answer_different(a, b):
    assert normalize_answer(a) != normalize_answer(b)


# ---------------------------------------------------------------------------
# Chat rendering


@pytest.fixture(scope="module")
def tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    text = ["Convert 45 kilometers to meters.", "What is 47 + 38? It is 85.", "Reverse the word 'planet'."]
    tok.train_from_iterator(text * 20, trainer=trainer)
    return tok


CONVERSATIONS = [
    [{"role": "user", "content": "Convert 45 kilometers to meters."}, {"role": "assistant", "content": "45,000 m"}],
    [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "What is 47 + 38?"},
     {"role": "assistant", "content": "85"}, {"role": "user", "content": " Reverse 'planet'.\n"},
     {"role": "assistant", "content": "tenalp <b>"}],
]  # fmt: skip


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_render_matches_the_transformers_chat_template(tokenizer, messages):
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD, chat_template=CHAT_TEMPLATE
    )
    ids, mask = render(messages, tokenizer)
    assert ids == hf.apply_chat_template(messages, tokenize=True, return_dict=False)
    prompt = messages[:-1]
    assert render_prompt(prompt, tokenizer) == hf.apply_chat_template(
        prompt, tokenize=True, add_generation_prompt=True, return_dict=False
    )
    assert len(mask) == len(ids)


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_render_mask_covers_exactly_assistant_content_and_its_end(tokenizer, messages):
    ids, mask = render(messages, tokenizer)
    learned = [i for i, m in zip(ids, mask, strict=True) if m]
    expected = []
    for message in messages:
        if message["role"] == "assistant":
            expected += tokenizer.encode(message["content"], add_special_tokens=False).ids
            expected.append(tokenizer.token_to_id(END))
    assert learned == expected
    assert tokenizer.decode(learned, skip_special_tokens=False) == "".join(
        m["content"] + END for m in messages if m["role"] == "assistant"
    )
    roles = {tokenizer.token_to_id(token): token for token in (SYSTEM, USER, ASSISTANT)}
    speaker = None
    for token, learn in zip(ids, mask, strict=True):
        if token in roles:
            speaker = roles[token]
            assert learn == 0
            continue
        assert learn == int(speaker == ASSISTANT)
        if token == tokenizer.token_to_id(END):
            speaker = None


def test_render_rejects_unknown_roles_and_missing_special_tokens(tokenizer):
    with pytest.raises(ValueError, match="unknown chat role 'bot'"):
        render([{"role": "bot", "content": "x"}], tokenizer)
    bare = Tokenizer(models.BPE())
    with pytest.raises(ValueError, match="no special token"):
        render(CONVERSATIONS[0], bare)


def test_one_pretty_printed_json_object_is_named_as_such(tmp_path):
    rows = [{"instruction": "Name a color.", "output": "Blue"}]
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": rows}, indent=2))
    with pytest.raises(StageError, match=r"wrapped.json: one JSON object \(keys: data\), not rows: give a JSON array"):
        load_user_data(UserDataSource(path=str(tmp_path / "wrapped.json")))
    (tmp_path / "one.jsonl").write_text(json.dumps(rows[0]) + "\n")  # one row on one line is JSON Lines
    assert len(load_user_data(UserDataSource(path=str(tmp_path / "one.jsonl")))[0]) == 1


def test_a_question_two_sources_ask_stays_on_the_side_the_first_chose(tmp_path):
    """Each source holds out its own fraction: without this, a question trained on from one
    source could be tested from another (with another answer, or repeated on purpose)."""
    rows = [{"instruction": f"Repeat {i}.", "output": str(i)} for i in range(40)]
    first = UserDataSource(path=str(_write_jsonl(tmp_path / "a.jsonl", rows)), test_fraction=0.0)
    other_answers = [{**row, "output": row["output"] + "!"} for row in rows]
    second = UserDataSource(path=str(_write_jsonl(tmp_path / "b.jsonl", other_answers)), test_fraction=0.5)
    again = UserDataSource(path=str(tmp_path / "a.jsonl"), test_fraction=0.5, keep_duplicates=True)
    for later in (second, again):
        data = build_examples(InstructionConfig(families=[], user_data=[first, later]))
        assert data["test"] == [] and len(data["train"]) == 80
