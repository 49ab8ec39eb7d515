"""Build a tiny Hugging Face style tokenizer folder in-process (no network).

`train_tokenizer(out_dir)` trains a byte-level BPE with the `tokenizers` library on a built-in
corpus (English, Python-ish code, CJK, emoji, accented Latin) and writes:

    out_dir/tokenizer.json            special tokens <unk>=0, <s>=1, </s>=2; post-processor prepends <s>
    out_dir/tokenizer_config.json     bos/eos/unk tokens, add_bos_token, model_max_length, chat_template,
                                      tokenizer_class = PreTrainedTokenizerFast
    out_dir/special_tokens_map.json

Other tests import this helper; keep the signature `train_tokenizer(out_dir: Path, vocab_size=512)`.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 (the Llama order)

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>\n{{ message['content'] | trim }}\n"
    "{% elif message['role'] == 'user' %}<|user|>\n{{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}<|assistant|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% else %}{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_ENGLISH = """The quick brown fox jumps over the lazy dog. A language model predicts the next token.
Hello, world! How are you doing today? I'm fine, thanks; and you? It's 3:45 pm on 2024-05-17.
Serving large language models requires batching, paged attention and careful scheduling.
Tokenizers split text into pieces: words, sub-words and sometimes single bytes.
"""

_PYTHON = '''def fibonacci(n: int) -> list[int]:
    """Return the first n Fibonacci numbers."""
    a, b = 0, 1
    out = []
    for _ in range(n):
        out.append(a)
        a, b = b, a + b
    return out


class Sampler:
    def __call__(self, logits, rows):
        if self.temperature == 0.0:
            return logits.argmax(dim=-1)
        return {"tokens": [1, 2, 3], 'ok': True}  # comment
'''

_UNICODE = """Café, naïve, résumé, façade, jalapeño, Ærøskøbing, Straße, Ελληνικά, Русский текст.
中文分词测试：你好，世界！今天天气很好。日本語のテキストです。한국어 문장입니다.
Emoji: 😀 🚀 🎉 👍🏽 👨‍👩‍👧 ❤️ ✨ — “quotes” ‘single’ … ½ € £ ¥ → ∑ ∞ ≤ ≥.
"""


def corpus() -> list[str]:
    """The built-in training text, repeated so BPE sees enough pair counts."""
    lines = (_ENGLISH + _PYTHON + _UNICODE).splitlines(keepends=True)
    return lines * 20


def build_tokenizer(vocab_size: int = 512) -> Tokenizer:
    """Train the byte-level BPE `tokenizers.Tokenizer` (post-processor prepends `<s>`)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    return tok


def tokenizer_config(**overrides: object) -> dict:
    """The `tokenizer_config.json` contents written by `train_tokenizer` (overridable for tests)."""
    config: dict = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": 2048,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    config.update(overrides)
    return config


def train_tokenizer(out_dir: Path, vocab_size: int = 512) -> None:
    """Train a byte-level BPE tokenizer and write a HF-style folder into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    build_tokenizer(vocab_size).save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config(), indent=2, ensure_ascii=False)
    )
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
