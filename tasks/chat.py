"""The chat format shared by tokenizer training, fine-tuning, evaluation and export.

Special tokens are reserved when the tokenizer is trained, so every model built by the
pipeline speaks the same format:

    <|bos|><|system|>...<|end|><|user|>...<|end|><|assistant|>...<|end|>

Only the assistant's content and its closing <|end|> carry loss in fine-tuning.

Only the pipeline places special tokens, by id. Text that spells one, in the corpus, in
instruction data or in a prompt, is encoded as the characters it is (`read_tokenizer`), so
no message can close its turn early or open another; transformers' template, which reads
such text as the token, differs from `render` only there.
"""

import re
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

BOS = "<|bos|>"
EOS = "<|eos|>"
PAD = "<|pad|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END = "<|end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, SYSTEM, USER, ASSISTANT, END]
ROLES = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}

# Jinja template for transformers' `apply_chat_template`; renders exactly what
# `tasks.chat.render` tokenizes.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def hf_tokenizer_files(model_max_length: int | None = None) -> dict[str, dict[str, Any]]:
    """`tokenizer_config.json` and `special_tokens_map.json`: what `transformers.AutoTokenizer`
    needs beside `tokenizer.json` to know the special tokens and the chat template."""
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    extra = [token for token in SPECIAL_TOKENS if token not in special.values()]
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "additional_special_tokens": extra,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
    }
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    return {"tokenizer_config.json": config, "special_tokens_map.json": {**special, "additional_special_tokens": extra}}


def _special_id(tokenizer: Tokenizer, token: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise ValueError(f"the tokenizer has no special token {token}; train it with tasks.chat.SPECIAL_TOKENS")
    return token_id


def read_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer file, set to encode text that spells a special token as text."""
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.encode_special_tokens = True
    return tokenizer


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def encode_text(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of text, with no special tokens added. A byte that is not UTF-8 in a command
    line or a typed line reaches Python as a lone surrogate, which the tokenizer refuses:
    each becomes U+FFFD, as a UTF-8 decoder would make of the byte."""
    return tokenizer.encode(_LONE_SURROGATE.sub("\ufffd", text), add_special_tokens=False).ids


def render(messages: list[dict[str, str]], tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """Token ids of a conversation in the chat format, and a parallel loss mask.

    The mask is 1 on each assistant message's content tokens and its closing <|end|>,
    0 elsewhere, so fine-tuning learns to answer and to stop, never to echo prompts.
    Each content piece is encoded on its own, as the tokenizer does between special
    tokens, so the ids match `CHAT_TEMPLATE` tokenized as one string (for content that
    spells no special token: see the module docstring).
    """
    ids = [_special_id(tokenizer, BOS)]
    mask = [0]
    end = _special_id(tokenizer, END)
    for message in messages:
        role = message["role"]
        if role not in ROLES:
            raise ValueError(f"unknown chat role {role!r}; expected one of {sorted(ROLES)}")
        content = encode_text(tokenizer, message["content"])
        learn = int(role == "assistant")
        ids += [_special_id(tokenizer, ROLES[role]), *content, end]
        mask += [0] + [learn] * (len(content) + 1)
    return ids, mask


def render_prompt(messages: list[dict[str, str]], tokenizer: Tokenizer) -> list[int]:
    """Token ids of a conversation followed by <|assistant|>: the model's cue to answer."""
    return render(messages, tokenizer)[0] + [_special_id(tokenizer, ASSISTANT)]
