"""Labeled instruction data for fine-tuning and exact-match evaluation.

Two sources feed the finetune and evaluate stages:

- built-in generators of tasks whose answers are computed, not guessed: unit
  conversions, integer arithmetic and simple string tasks. Conversions use metric
  units by default, so a small model learns one skill (shift the decimal point)
  rather than memorising imperial factors; `units="all"` takes a table with imperial
  units, minutes to weeks and binary sizes as well (`ALL_UNITS`). They are
  seeded and the held-out test problems are drawn first and excluded from
  training, so no test problem (under any phrasing) is ever trained on;
- the user's own data: JSONL/JSON/Parquet files, a `datasets.save_to_disk`
  directory or a hub dataset, in Alpaca (`instruction`/`input`/`output`) or chat
  `messages` form. Bad rows, and rows repeating an earlier row's conversation, are
  quarantined with their line number and reason instead of failing the run.

Both become `Example`s: a chat conversation ending with the assistant's answer,
which `tasks.chat.render` turns into token ids and a loss mask.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from functools import partial
from itertools import permutations
from pathlib import Path
from string import ascii_lowercase
from typing import Annotated, Any, BinaryIO, Literal, get_args

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, Field

from tasks.chat import ROLES
from tasks.files import UTF16_BOMS, Utf16AsUtf8, file_digests, json_failure, starts_json_array, walk
from tasks.settings import Settings
from tasks.stage import StageError

Family = Literal[
    "convert_length",
    "convert_mass",
    "convert_time",
    "convert_volume",
    "convert_data",
    "add",
    "subtract",
    "multiply",
    "reverse",
    "count_letter",
    "upper",
]
FAMILIES: tuple[str, ...] = get_args(Family)
UnitSet = Literal["metric", "all"]
USER_FAMILY = "user"

# Consecutive draws that bring nothing new before a family counts as exhausted.
MAX_MISSES = 10_000

WORDS = """
able about above accept across act add afraid after again age agree air allow alone
along always amount animal answer apple april area arm army around arrive art ask
autumn away baby back bad bag ball bank base basket bath beach bean bear beauty bed
before begin behind bell below best better between bird birth black blanket blood
blue board boat body bone book border bottle bottom box boy brain branch bread break
bridge bright bring brother brown build burn business butter button cabin cake call
camera camp candle capital car card care carry castle cat catch cause center chair
chance change cheese cherry chicken child choose church circle city class clean clear
clock close cloth cloud coast coat coffee cold color come common cook copper corner
cotton count country course cover cow cream cross crowd cup current cut dance danger
dark daughter day dead dear decide deep desert design dinner dirty doctor dog dollar
door double down dream dress drink drive drop dry duck during dust early earth east
easy eat edge egg eight energy engine enough enter equal evening event every example
eye face fact fair fall family famous farm fast father feather field fight figure
finger finish fire first fish five flag floor flower fly follow food foot forest
forget fork forward four free fresh friend front fruit full future game garden gate
gentle gift girl give glass gold good grass great green ground group grow guitar hair
half hammer hand happy hard hat head health heart heavy hello help high hill history
hold hole holiday home honey hope horse hot hour house human hundred hungry idea
island jacket jelly journey juice jump jungle kettle key kind king kitchen knife know
ladder lake lamp land large laugh lawyer lead leaf learn leather left lemon letter
level library light like line lion liquid list listen little live long look love low
lunch machine magic market matter meadow measure meat metal middle milk minute mirror
money month moon morning mother mountain mouse mouth move music name nation nature
near needle nest never new night noise north nose note number ocean office oil old
orange order oven owner page paint palace paper parent park party pencil people
pepper person picture piece pillow place planet plant plate play pocket poem point
potato powder power present pretty print prison problem public purple question quick
quiet rabbit radio rain reason record red rest rice rich river road rock roof room
root rope round ruler salt sand school science sea season second secret seed shadow
shape sheep shell ship shirt shoe short shoulder silver simple sister size sky sleep
small smile smoke snake snow soap soft soldier song sound soup south space spoon
spring square stamp star station steam stone storm story street strong sugar summer
sun supper sweet table tail teacher team thread thunder ticket tiger time tomato
tongue tooth tower town train travel tree truck umbrella uncle valley village violin
voice wall water weather wheel white window winter wood world yellow young zebra
""".split()


# ---------------------------------------------------------------------------
# Generated tasks


@dataclass(frozen=True)
class Problem:
    """One generated task: `key` identifies the problem whatever its phrasing."""

    key: tuple
    prompt: str
    answer: str


@dataclass(frozen=True)
class Unit:
    name: str
    plural: str
    symbol: str
    size: Fraction  # in the family's base unit


def _unit(name: str, symbol: str, size: str, plural: str = "") -> Unit:
    return Unit(name, plural or name + "s", symbol, Fraction(size))


# SI prefixes as (symbol, power of ten); the micro sign is the Greek mu, which
# Unicode normalisation (NFC or NFKC) leaves unchanged.
PREFIXES: dict[str, tuple[str, int]] = {
    "nano": ("n", -9),
    "micro": ("\u03bc", -6),
    "milli": ("m", -3),
    "centi": ("c", -2),
    "deci": ("d", -1),
    "": ("", 0),
    "kilo": ("k", 3),
    "mega": ("M", 6),
    "giga": ("G", 9),
    "tera": ("T", 12),
}


def _prefixed(name: str, symbol: str, prefixes: str) -> list[Unit]:
    """The units `name` takes with each of the space-separated prefixes ('-' for none)."""
    units = []
    for prefix in prefixes.replace("-", "").split(" "):
        prefix_symbol, power = PREFIXES[prefix]
        units.append(Unit(prefix + name, prefix + name + "s", prefix_symbol + symbol, Fraction(10) ** power))
    return units


METRIC_UNITS: dict[str, list[Unit]] = {
    "convert_length": _prefixed("meter", "m", "micro milli centi - kilo"),
    "convert_mass": [*_prefixed("gram", "g", "milli - kilo"), _unit("tonne", "t", "1000000")],
    "convert_time": _prefixed("second", "s", "nano micro milli -"),
    "convert_volume": _prefixed("liter", "L", "milli centi deci - kilo"),
    "convert_data": _prefixed("byte", "B", "- kilo mega giga tera"),
}

ALL_UNITS: dict[str, list[Unit]] = {
    "convert_length": [
        _unit("millimeter", "mm", "0.001"),
        _unit("centimeter", "cm", "0.01"),
        _unit("meter", "m", "1"),
        _unit("kilometer", "km", "1000"),
        _unit("inch", "in", "0.0254", "inches"),
        _unit("foot", "ft", "0.3048", "feet"),
        _unit("yard", "yd", "0.9144"),
        _unit("mile", "mi", "1609.344"),
    ],
    "convert_mass": [
        _unit("milligram", "mg", "0.001"),
        _unit("gram", "g", "1"),
        _unit("kilogram", "kg", "1000"),
        _unit("tonne", "t", "1000000"),
        _unit("ounce", "oz", "28.349523125"),
        _unit("pound", "lb", "453.59237"),
    ],
    "convert_time": [
        _unit("millisecond", "ms", "0.001"),
        _unit("second", "s", "1"),
        _unit("minute", "min", "60"),
        _unit("hour", "h", "3600"),
        _unit("day", "d", "86400"),
        _unit("week", "wk", "604800"),
    ],
    "convert_volume": [
        _unit("milliliter", "mL", "1"),
        _unit("centiliter", "cL", "10"),
        _unit("deciliter", "dL", "100"),
        _unit("liter", "L", "1000"),
        _unit("cubic meter", "m³", "1000000"),
        _unit("fluid ounce", "fl oz", "29.5735295625"),
        _unit("pint", "pt", "473.176473"),
        _unit("quart", "qt", "946.352946"),
        _unit("gallon", "gal", "3785.411784"),
    ],
    "convert_data": [
        _unit("bit", "bit", "1"),
        _unit("byte", "B", "8"),
        _unit("kilobyte", "kB", "8000"),
        _unit("megabyte", "MB", "8000000"),
        _unit("gigabyte", "GB", "8000000000"),
        _unit("terabyte", "TB", "8000000000000"),
        _unit("kibibyte", "KiB", "8192"),
        _unit("mebibyte", "MiB", "8388608"),
    ],
}

UNITS: dict[str, dict[str, list[Unit]]] = {"metric": METRIC_UNITS, "all": ALL_UNITS}

# Answers keep at most this many decimals, and a conversion is offered only when a
# source value that is a multiple of at most MAX_STEP makes its answer that short
# and its ratio is at most MAX_RATIO (so metric answers stay around 12 characters).
DECIMALS = 3
MAX_STEP = 1000
MAX_RATIO: dict[str, int] = {"metric": 10**6, "all": 10**9}

TEMPLATES: dict[str, tuple[str, ...]] = {
    "convert": (
        "Convert {value} {src} to {dst}.",
        "How many {dst} are in {value} {src}?",
        "Express {value} {src} in {dst}.",
        "What is {value} {src} in {dst}?",
    ),
    "add": ("What is {a} + {b}?", "Calculate {a} + {b}.", "Add {a} and {b}.", "What is the sum of {a} and {b}?"),
    "subtract": ("What is {a} - {b}?", "Calculate {a} - {b}.", "Subtract {b} from {a}.", "What is {a} minus {b}?"),
    "multiply": (
        "What is {a} * {b}?",
        "Calculate {a} times {b}.",
        "Multiply {a} by {b}.",
        "What is the product of {a} and {b}?",
    ),
    "reverse": (
        "Reverse the word '{word}'.",
        "Spell '{word}' backwards.",
        "Write the letters of '{word}' in reverse order.",
        "What is '{word}' reversed?",
    ),
    "count_letter": (
        "How many times does the letter '{letter}' appear in '{word}'?",
        "Count the letter '{letter}' in '{word}'.",
        "In the word '{word}', how many times does '{letter}' occur?",
        "How often does '{letter}' occur in the word '{word}'?",
    ),
    "upper": (
        "Write '{word}' in upper case.",
        "Convert '{word}' to uppercase.",
        "Capitalize every letter of '{word}'.",
        "What is '{word}' in capital letters?",
    ),
}


def format_number(value: Fraction) -> str:
    """An exact decimal with thousands separators: 45000 -> '45,000', 9/8 -> '1.125'."""
    if value.denominator == 1:
        return f"{value.numerator:,}"
    return f"{Decimal(value.numerator) / Decimal(value.denominator):,f}"


def _is_short(value: Fraction) -> bool:
    return (value * 10**DECIMALS).denominator == 1


def _conversions(units: list[Unit], max_ratio: int) -> list[tuple[Unit, Unit, Fraction, int]]:
    """(source, target, ratio, step) for every pair whose answers can stay short."""
    pairs = []
    for src, dst in permutations(units, 2):
        ratio = src.size / dst.size
        step = (ratio * 10**DECIMALS).denominator
        if step <= MAX_STEP and ratio <= max_ratio:
            pairs.append((src, dst, ratio, step))
    return pairs


def _convert(pairs: list[tuple[Unit, Unit, Fraction, int]], rng: random.Random) -> Problem:
    src, dst, ratio, step = rng.choice(pairs)
    value = Fraction(rng.randint(1, 999) * step)
    if rng.random() < 0.25 and _is_short(value / 10 * ratio):
        value /= 10
    src_name = src.name if value == 1 else src.plural
    prompt = rng.choice(TEMPLATES["convert"]).format(value=format_number(value), src=src_name, dst=dst.plural)
    return Problem((src.symbol, dst.symbol, value), prompt, f"{format_number(value * ratio)} {dst.symbol}")


def _arithmetic(op: str, digits: int, rng: random.Random) -> Problem:
    low = 10 ** (digits - 1) if digits > 1 else 0
    a, b = rng.randint(low, 10**digits - 1), rng.randint(low, 10**digits - 1)
    if op == "subtract":
        a, b = max(a, b), min(a, b)
    answer = {"add": a + b, "subtract": a - b, "multiply": a * b}[op]
    key = (a, b) if op == "subtract" else (min(a, b), max(a, b))  # a + b and b + a are one problem
    return Problem(key, rng.choice(TEMPLATES[op]).format(a=a, b=b), str(answer))


def _reverse(rng: random.Random) -> Problem:
    word = rng.choice(WORDS)
    return Problem((word,), rng.choice(TEMPLATES["reverse"]).format(word=word), word[::-1])


def _upper(rng: random.Random) -> Problem:
    word = rng.choice(WORDS)
    return Problem((word,), rng.choice(TEMPLATES["upper"]).format(word=word), word.upper())


def _count_letter(rng: random.Random) -> Problem:
    word = rng.choice(WORDS)
    letter = rng.choice(word) if rng.random() < 0.75 else rng.choice(ascii_lowercase)
    prompt = rng.choice(TEMPLATES["count_letter"]).format(letter=letter, word=word)
    return Problem((word, letter), prompt, str(word.count(letter)))


def _makers(config: InstructionConfig) -> dict[str, Callable[[random.Random], Problem]]:
    makers: dict[str, Callable[[random.Random], Problem]] = {
        family: partial(_convert, _conversions(units, MAX_RATIO[config.units]))
        for family, units in UNITS[config.units].items()
    }
    for op in ("add", "subtract", "multiply"):
        makers[op] = partial(_arithmetic, op, config.digits)
    makers.update(reverse=_reverse, count_letter=_count_letter, upper=_upper)
    return makers


def _distinct(
    make: Callable[[random.Random], Problem],
    rng: random.Random,
    n: int,
    identity: Callable[[Problem], Any],
    exclude: frozenset = frozenset(),
) -> list[Problem]:
    """Up to `n` problems with distinct `identity`, none whose key is in `exclude`.

    Stops early once MAX_MISSES draws in a row bring nothing new: the family's space
    of problems is (nearly) used up.
    """
    chosen: dict[Any, Problem] = {}
    misses = 0
    while len(chosen) < n and misses < MAX_MISSES:
        problem = make(rng)
        ident = identity(problem)
        if ident in chosen or problem.key in exclude:
            misses += 1
            continue
        chosen[ident] = problem
        misses = 0
    return list(chosen.values())


def _generate(family: str, config: InstructionConfig) -> dict[str, list[Problem]]:
    """The test and train problems of one family.

    Test problems are drawn first, distinct by problem; training then excludes
    their keys, so a held-out problem never appears in training under any phrasing.
    Training prompts are distinct while the family has enough of them, then repeat.
    """
    make = _makers(config)[family]
    test = _distinct(make, random.Random(f"{config.seed}/{family}/test"), config.test_per_family, lambda p: p.key)
    if len(test) < config.test_per_family:
        raise StageError(
            f"family {family!r} has only {len(test)} distinct problems, "
            f"fewer than test_per_family={config.test_per_family}; lower it or raise digits"
        )
    held_out = frozenset(problem.key for problem in test)
    train_rng = random.Random(f"{config.seed}/{family}/train")
    wanted = config.train_counts.get(family, config.train_per_family)
    train = _distinct(make, train_rng, wanted, lambda p: p.prompt, held_out)
    if wanted and not train:
        raise StageError(f"family {family!r} has no problems left for training after the test split")
    while train and len(train) < wanted:
        train += train_rng.sample(train, min(len(train), wanted - len(train)))
    return {"test": test, "train": train}


# ---------------------------------------------------------------------------
# Configuration and the common example representation


class UserDataSource(Settings):
    """A set of the user's own instruction examples."""

    path: str = Field(
        description="A .jsonl, .json or .parquet file, a directory saved by datasets' save_to_disk, "
        "or a Hugging Face hub dataset name (needs the hub to be reachable)."
    )
    split: str = Field(default="train", description="The split to read from a dataset directory or a hub dataset.")
    format: Literal["auto", "alpaca", "messages"] = Field(
        default="auto",
        description="Row format: 'alpaca' (instruction/input/output), 'messages' (chat turns), "
        "or 'auto' to detect it per row.",
    )
    test_fraction: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="Share of the rows held out for evaluation, chosen by a stable hash of each prompt; "
        "a prompt an earlier source asked stays on the side it took there.",
    )
    keep_duplicates: bool = Field(
        default=False,
        description="Keep a row whose conversation repeats an earlier row's (of this or an earlier source) "
        "instead of quarantining it: for rows repeated on purpose, to weight them.",
    )


class InstructionConfig(Settings):
    """Which instruction examples to build for fine-tuning and evaluation."""

    seed: int = Field(default=1234, description="Seed of the generated tasks; the same seed gives the same examples.")
    families: list[Family] = Field(
        default_factory=lambda: list(FAMILIES), description="Generated task families to include."
    )
    train_per_family: int = Field(default=2000, ge=0, description="Training examples per generated family.")
    train_counts: dict[Family, Annotated[int, Field(ge=0)]] = Field(
        default_factory=dict,
        description="Training examples of particular families instead of train_per_family, to weight the mix "
        "toward what takes longer to learn, e.g. {add: 6000}.",
    )
    test_per_family: int = Field(default=100, ge=0, description="Held-out test examples per generated family.")
    digits: int = Field(default=2, ge=1, le=12, description="Digits of each operand in the arithmetic families.")
    units: UnitSet = Field(
        default="metric",
        description="Units of the conversion families: 'metric' (powers of ten only: km/m/cm/mm/μm, t/kg/g/mg, "
        "s/ms/μs/ns, kL/L/dL/cL/mL, TB/GB/MB/kB/B) or 'all' (km/m/cm/mm and inches to miles; t/kg/g/mg, ounces, "
        "pounds; ms/s to weeks; m³/L/dL/cL/mL and US fluid ounces to gallons; bits, B to TB, KiB, MiB).",
    )
    system_prompt: str | None = Field(
        default=None, description="System message put first in every conversation that has none."
    )
    user_data: list[UserDataSource] = Field(
        default_factory=list, description="The user's own instruction data, added to training (and optionally test)."
    )


class Example(BaseModel):
    """A conversation ending with the assistant turn to learn, and the expected answer."""

    messages: list[dict[str, str]] = Field(description="Chat turns, the last one the assistant's answer.")
    family: str = Field(description="The generated task family, or 'user' for the user's data.")
    answer: str = Field(description="The expected final assistant content, for exact-match evaluation.")


def _example(prompt: str, answer: str, family: str) -> Example:
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return Example(messages=messages, family=family, answer=answer)


# ---------------------------------------------------------------------------
# User data


class BadRow(ValueError):
    """Why one row of user data cannot be used."""


def _string(row: dict, field: str, *, required: bool) -> str:
    if field not in row or row[field] is None:
        if required:
            raise BadRow(f"missing '{field}'")
        return ""
    if not isinstance(row[field], str):
        raise BadRow(f"'{field}' is not a string")
    text = _unicode(row[field].strip(), f"'{field}'")
    if required and not text:
        raise BadRow(f"empty '{field}'")
    return text


def _unicode(text: str, what: str) -> str:
    """`text`, refused when it holds a lone surrogate: JSON's escapes can spell one
    (`"\\ud800"`), but it is no character, and neither UTF-8 nor the tokenizer can hold it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadRow(f"{what} holds a lone surrogate (U+{ord(text[exc.start]):04X}), not a character") from None
    return text


def _from_alpaca(row: dict) -> Example:
    instruction = _string(row, "instruction", required=True)
    extra = _string(row, "input", required=False)
    output = _string(row, "output", required=True)
    return _example(f"{instruction}\n\n{extra}" if extra else instruction, output, USER_FAMILY)


def _from_messages(row: dict) -> Example:
    turns = row.get("messages")
    if not isinstance(turns, list) or not turns:
        raise BadRow("'messages' is not a non-empty list")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str):
            raise BadRow("a message has no 'role'")
        if turn["role"] not in ROLES:
            raise BadRow(f"unknown role {turn['role']!r}")
        if not isinstance(turn.get("content"), str):
            raise BadRow("a message's 'content' is not a string")
        if not turn["content"].strip():
            raise BadRow(f"empty {turn['role']} content")
        messages.append({"role": turn["role"], "content": _unicode(turn["content"].strip(), f"{turn['role']} content")})
    roles = [message["role"] for message in messages]
    if roles[-1] != "assistant":
        raise BadRow("last message is not from the assistant")
    if "user" not in roles:
        raise BadRow("no user message")
    if "system" in roles[1:]:
        raise BadRow("system message not first")
    return Example(messages=messages, family=USER_FAMILY, answer=messages[-1]["content"])


def _to_example(row: Any, fmt: str) -> Example:
    if isinstance(row, BadRow):
        raise row
    if not isinstance(row, dict):
        raise BadRow("row is not an object")
    if fmt == "auto":  # by the fields a row fills: a table's rows have every column, null where unused
        if row.get("messages") is not None:
            fmt = "messages"
        elif row.get("instruction") is not None or row.get("output") is not None:
            fmt = "alpaca"
        else:
            raise BadRow("neither 'messages' nor 'instruction'/'output'")
    return _from_messages(row) if fmt == "messages" else _from_alpaca(row)


def _json_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """Rows of a JSON Lines file (or a .json file holding one array), numbered from 1. A line
    that is not UTF-8 is a bad row, like one that is not JSON; the rows around it are kept.
    A byte-order mark (as some Windows editors write) is skipped, and a UTF-16 file read
    (see `_as_utf8`)."""
    try:
        opened = open(path, "rb")
    except OSError as exc:
        raise StageError(f"{path}: cannot be read ({exc.strerror})") from None
    with opened as file, _as_utf8(file, path) as handle:
        is_array = path.suffix.lower() == ".json" and starts_json_array(handle.read(4096))
        handle.seek(0)
        if is_array:
            try:
                rows = json.loads(handle.read().decode("utf-8-sig"))
            except UnicodeDecodeError as exc:
                raise StageError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
            except json.JSONDecodeError as exc:
                raise StageError(f"{path}: invalid JSON at line {exc.lineno} ({exc.msg})") from None
            except (ValueError, RecursionError) as exc:
                raise StageError(f"{path}: invalid JSON ({json_failure(exc)})") from None
            yield from enumerate(rows, start=1)
            return
        _refuse_one_object(path, handle)
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                yield number, json.loads(raw.decode("utf-8-sig" if number == 1 else "utf-8"))
            except UnicodeDecodeError:
                yield number, BadRow("invalid UTF-8")
            except json.JSONDecodeError:
                yield number, BadRow("invalid JSON")
            except (ValueError, RecursionError) as exc:
                yield number, BadRow(f"invalid JSON ({json_failure(exc)})")


def _as_utf8(file: io.BufferedReader, path: Path) -> BinaryIO:
    """`file`, or for a UTF-16 file (Windows' "Unicode" text, which starts with a byte-order
    mark) its text as UTF-8 bytes, decoded whole into memory. Bytes that are not UTF-16 are
    an error for the whole file: one stray byte shifts every character after it."""
    if not file.peek(2).startswith(UTF16_BOMS):
        return file
    utf8 = Utf16AsUtf8(file)
    try:
        return io.BytesIO(io.BufferedReader(utf8).read())
    except UnicodeDecodeError as exc:
        raise StageError(f"{path}: not UTF-16 text after its byte-order mark (byte {utf8.error_at}: {exc.reason}); "
                         "save it as UTF-8") from None


def _refuse_one_object(path: Path, handle: BinaryIO) -> None:
    """A file opening with a lone `{` line is one pretty-printed JSON object (rows wrapped in
    `{"data": [...]}`, say), not JSON Lines: say so, instead of calling each line invalid."""
    if handle.readline().strip(b"\xef\xbb\xbf \t\r\n") == b"{":
        handle.seek(0)
        try:
            whole = json.loads(handle.read().decode("utf-8-sig"))
        except (ValueError, RecursionError):  # not UTF-8, not JSON, or JSON Python cannot hold
            whole = None
        if isinstance(whole, dict):
            raise StageError(f"{path}: one JSON object (keys: {', '.join(map(str, whole)) or 'none'}), not rows: give "
                             "a JSON array of rows, or JSON Lines (one row per line)")
    handle.seek(0)


def _parquet_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """Rows of a Parquet file, numbered from 1. A file pyarrow cannot read (not Parquet, cut
    short, unreadable) is an error naming it, as a whole-file problem of the other formats is."""
    number = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches():
            for row in batch.to_pylist():
                number += 1
                yield number, row
    except (OSError, pa.ArrowException) as exc:
        raise StageError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None


def _dataset_rows(source: UserDataSource, path: Path) -> Iterator[tuple[int, Any]]:
    """Rows of a saved dataset directory or a hub dataset, numbered from 1."""
    import datasets  # imported here: it is slow to import and most runs need no user data

    try:
        if path.is_dir():
            data = datasets.load_from_disk(path)
            if isinstance(data, datasets.DatasetDict):
                if source.split not in data:
                    raise StageError(f"{source.path}: no split {source.split!r} (has {', '.join(data)})")
                data = data[source.split]
        else:
            data = datasets.load_dataset(source.path, split=source.split)
    except StageError:
        raise
    except Exception as exc:  # any loader failure is a user-fixable source problem
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        local = "" if path.is_dir() else f" (read as a hub dataset name: there is no file or folder {path.resolve()})"
        raise StageError(f"cannot load user data {source.path!r}: {reason}{local}") from None
    yield from enumerate(data, start=1)


FILE_READERS = {".jsonl": _json_rows, ".json": _json_rows, ".parquet": _parquet_rows}


def _rows(source: UserDataSource) -> Iterator[tuple[int, Any]]:
    path = Path(source.path).expanduser()
    suffix = path.suffix.lower()
    if path.is_file():
        if suffix not in FILE_READERS:
            raise StageError(f"{path}: unsupported file type; use {', '.join(FILE_READERS)} or a dataset directory")
        return FILE_READERS[suffix](path)
    if path.is_dir() or not (suffix in FILE_READERS or source.path.startswith(("/", ".", "~"))):
        return _dataset_rows(source, path)
    raise StageError(f"{path}: no such file or directory")


def user_data_state(config: InstructionConfig) -> list[list[Any]]:
    """Path and content digest of every local file of the user's data (a hub dataset is named
    by its config alone): with the config, what decides the examples, so that the stages built
    from them (fine-tuning, evaluation) are built again when a file's content changes, and
    only then."""
    paths = [Path(source.path).expanduser() for source in config.user_data]
    return file_digests([file for path in paths if path.exists() for file in walk(path)])


def load_user_data(
    source: UserDataSource,
    seen: dict[str, tuple[str, int]] | None = None,
    generated: dict[str, tuple[str, str]] | None = None,
) -> tuple[list[Example], list[dict[str, Any]]]:
    """The usable examples of a source, and the quarantined rows as {line, reason}.

    Quarantined besides rows that cannot be used:
    - a row whose prompt is that of a generated example (`generated` maps `_prompt_key` to
      its split and family) held out for testing, or that of a generated training example
      when the row itself is held out: either would score a model on what it trained on;
    - a row whose conversation, turn for turn, is one already read (from this source, or
      from an earlier one that `seen` maps as conversation -> (path, line)), unless the
      source keeps duplicates: a repeated example weighs double in training and counts
      twice in evaluation. Conversations read are added to `seen`.

    Raises StageError when no row is usable, naming the most common reasons (a source whose
    rows all repeat earlier ones is not an error: its rows are all quarantined).
    """
    seen = {} if seen is None else seen
    read_here: set[str] = set()
    examples: list[Example] = []
    repeated = 0
    quarantine: list[dict[str, Any]] = []
    for line, row in _rows(source):
        try:
            example = _to_example(row, source.format)
        except BadRow as bad:
            quarantine.append({"line": line, "reason": str(bad)})
            continue
        if leak := _leak(example, source.test_fraction, generated or {}):
            quarantine.append({"line": line, "reason": leak})
            continue
        conversation = json.dumps(example.messages, ensure_ascii=False)
        if conversation in seen and not source.keep_duplicates:
            path, first = seen[conversation]
            where = f"line {first}" if conversation in read_here else f"{path} line {first} (an earlier source)"
            quarantine.append({"line": line, "reason": f"duplicate of {where}"})
            repeated += 1
            continue
        seen.setdefault(conversation, (source.path, line))
        read_here.add(conversation)
        examples.append(example)
    if not (examples or repeated):
        reasons = Counter(entry["reason"] for entry in quarantine).most_common(3)
        detail = ", ".join(f"{reason} ({count} {'row' if count == 1 else 'rows'})" for reason, count in reasons)
        detail = detail or "it has no rows"
        raise StageError(f"{source.path}: no usable rows: {detail}")
    return examples, quarantine


def _prompt_key(example: Example) -> str:
    """What an example asks: the user turn its answer answers. Earlier turns and system
    prompts are context: a row that learns to answer a question after other turns has
    still learned that question's answer."""
    return next(m["content"] for m in reversed(example.messages[:-1]) if m["role"] == "user")


def _leak(example: Example, test_fraction: float, generated: dict[str, tuple[str, str]]) -> str | None:
    """Why a user row would mix a generated example's test and training sides, if it would."""
    if (match := generated.get(_prompt_key(example))) is None:
        return None
    split, family = match
    if split == "test":
        return f"same prompt as a held-out test example of {family}"
    if _held_out(example, test_fraction):
        return f"held out, but its prompt is that of a training example of {family}"
    return None


def _held_out(example: Example, fraction: float) -> bool:
    """Stable choice of test rows: a hash of the question (`_prompt_key`), so that rows asking
    the same one, in whatever context, stay on one side."""
    bucket = int(hashlib.sha256(_prompt_key(example).encode()).hexdigest()[:8], 16) / 16**8
    return bucket < fraction


def _with_system(example: Example, system_prompt: str | None) -> Example:
    if not system_prompt or example.messages[0]["role"] == "system":
        return example
    messages = [{"role": "system", "content": system_prompt}, *example.messages]
    return example.model_copy(update={"messages": messages})


# ---------------------------------------------------------------------------
# Public entry points


def build_examples(
    config: InstructionConfig, *, quarantine: list[dict[str, Any]] | None = None, notes: list[str] | None = None
) -> dict[str, list[Example]]:
    """Training and held-out test examples: generated families first, then user data.

    User rows go to training except a `test_fraction` of each source; a row asking a question
    an earlier source asked goes to that row's side, whatever its own source's fraction, so
    that no question is both trained on and tested. A row repeating an earlier one of any
    source, or asking a generated example's prompt across the split, is dropped (see
    `load_user_data`). When a list is passed as `quarantine`, the user rows
    dropped are appended to it as {source, line, reason}. When a list is passed as `notes`,
    a source whose `test_fraction` held out none of its rows is said there.
    """
    splits: dict[str, list[Example]] = {"train": [], "test": []}
    for family in FAMILIES:
        if family in config.families:
            for split, problems in _generate(family, config).items():
                splits[split] += [_example(p.prompt, p.answer, family) for p in problems]
    generated = {_prompt_key(e): (split, e.family) for split in ("train", "test") for e in splits[split]}
    seen: dict[str, tuple[str, int]] = {}
    placed: dict[str, bool] = {}  # each user question's side, as the first source to ask it chose
    for source in config.user_data:
        examples, bad = load_user_data(source, seen, generated)
        if quarantine is not None:
            quarantine += [{"source": source.path, **entry} for entry in bad]
        held = [placed.setdefault(_prompt_key(example), _held_out(example, source.test_fraction))
                for example in examples]
        for example, test in zip(examples, held):
            splits["test" if test else "train"].append(example)
        if notes is not None and source.test_fraction > 0 and examples and not any(held):
            rows = f"{len(examples)} rows" if len(examples) > 1 else "one row"
            notes.append(f"instructions: test_fraction={source.test_fraction} held out none of the {rows} kept from "
                         f"{source.path} (rows are held out by a hash of their question), so none is evaluated; raise "
                         "test_fraction or add rows")
    return {split: [_with_system(e, config.system_prompt) for e in examples] for split, examples in splits.items()}


def eval_texts(config: InstructionConfig) -> list[str]:
    """Every held-out prompt and answer as plain text, for decontaminating the corpus.

    System prompts are left out: they are shared by all examples, not test content.
    """
    texts = (
        message["content"]
        for example in build_examples(config)["test"]
        for message in example.messages
        if message["role"] != "system"
    )
    return list(dict.fromkeys(texts))


THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def normalize_answer(text: str) -> str:
    """The form answers are compared in: spacing, a final period and thousands separators do
    not matter ("45,000 m." == "45000 m"); case does, as it tells units apart (B and b, Mm and
    mm) and is the answer of the `upper` family."""
    text = " ".join(text.split())
    text = text.removesuffix(".").rstrip()
    return THOUSANDS.sub("", text)
