"""The chat format shared by tokenizer training, fine-tuning, evaluation and export.

Special tokens are reserved when the tokenizer is trained, so every model built by the
pipeline speaks the same format:

    <|bos|><|system|>...<|end|><|user|>...<|end|><|assistant|>...<|end|>

Only the assistant's content and its closing <|end|> carry loss in fine-tuning.
"""

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
