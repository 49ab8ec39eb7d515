"""Tokenizer: a `tokenizers.Tokenizer` plus what a Hugging Face folder says around it, and the chat template.

Loading follows transformers' (v5) generic fast tokenizer (`TokenizersBackend`/`PreTrainedTokenizerFast`):
  * tokenizer.json defines normalizer, pre-tokenizer, model, post-processor and decoder; its truncation and
    padding settings are dropped (HF turns them off per call unless asked).
  * Named special tokens (bos/eos/unk/sep/pad/cls/mask and any other `*_token` key) and
    `additional_special_tokens`/`extra_special_tokens` come from tokenizer_config.json; when the config has
    no `added_tokens_decoder` (legacy layout), special_tokens_map.json overrides them. All of them are
    (re)registered as special in the backend, so `decode(skip_special_tokens=True)` drops them.
  * `add_bos_token`/`add_eos_token` in tokenizer_config.json are ignored when tokenizer.json exists, as
    transformers v5 does: the post-processor in tokenizer.json decides. `from_dir(path,
    bos_eos_from_config=True)` instead rebuilds the post-processor from those flags, as transformers v4's
    Llama/Gemma fast tokenizers did (`[bos] $A [eos]`, each part present when its flag is true).
Model-specific transformers classes that rebuild the pipeline in Python (v5 `LlamaTokenizer` on
sentencepiece-style checkpoints) are not emulated.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, processors
from tokenizers import Tokenizer as _Backend

NAMED_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class Tokenizer:
    """Encode/decode text and render chat templates; see the module docstring for loading rules.

    vocab_size: number of ids, added tokens included (HF's `len(tokenizer)`, not HF's `vocab_size`).
    all_special_ids: every id that `decode(skip_special_tokens=True)` drops.
    """

    def __init__(
        self,
        backend: _Backend,
        config: dict[str, Any],
        special: dict[str, str],
        extra_special: Sequence[str],
        chat_template: str | dict[str, str] | None,
        name_or_path: str = "",
    ):
        self._tok = backend
        self.config = config
        self.special_tokens_map = dict(special)  # name -> token text, e.g. {"eos_token": "</s>"}
        self.extra_special_tokens = list(extra_special)
        self.chat_template = chat_template
        self.name_or_path = name_or_path
        self.model_max_length = config.get("model_max_length")
        self._cleanup = bool(config.get("clean_up_tokenization_spaces", False)) and (
            type(backend.model).__name__ != "BPE"
        )
        self.bos_token_id = self._special_id("bos_token")
        self.eos_token_id = self._special_id("eos_token")
        self.pad_token_id = self._special_id("pad_token")
        self.unk_token_id = self._special_id("unk_token")
        self.all_special_ids = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}

    @classmethod
    def from_dir(cls, path: str | Path, bos_eos_from_config: bool = False) -> Tokenizer:
        """Load a Hugging Face tokenizer folder (tokenizer.json required)."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(
                f"{path / 'tokenizer.json'} not found (only fast tokenizers are supported)"
            )
        backend = _Backend.from_file(str(path / "tokenizer.json"))
        backend.no_truncation()
        backend.no_padding()
        config = _read_json(path / "tokenizer_config.json")
        special, extra = _special_tokens(config, _read_json(path / "special_tokens_map.json"))
        _register_special(backend, config, [*special.values(), *extra])
        if backend.post_processor is None:
            backend.post_processor = _bos_eos_processor(backend, special, False, False)
        if bos_eos_from_config and ("add_bos_token" in config or "add_eos_token" in config):
            backend.post_processor = _bos_eos_processor(
                backend, special, bool(config.get("add_bos_token")), bool(config.get("add_eos_token"))
            )
        return cls(backend, config, special, extra, _load_chat_templates(path, config), str(path))

    # -- ids <-> text ------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        text = self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up(text) if self._cleanup else text

    def decode_raw(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """`decode` without `clean_up_tokenization_spaces` (what incremental detokenization uses)."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str | None]:
        return [self._tok.id_to_token(int(i)) for i in ids]

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def backend(self) -> _Backend:
        return self._tok

    def _special_id(self, name: str) -> int | None:
        text = self.special_tokens_map.get(name)
        return None if text is None else self._tok.token_to_id(text)

    # -- chat --------------------------------------------------------------------------------------
    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render `messages` ([{"role": ..., "content": ...}]) to the prompt text, as HF's
        `apply_chat_template(..., tokenize=False)`. `chat_template` may name one of several templates."""
        template = self._select_template(chat_template, tools)
        msgs = [_alias_reasoning({k: v for k, v in m.items() if v is not None}) for m in messages]
        variables = {**self.special_tokens_map, **kwargs}
        return _compile(template).render(
            messages=msgs,
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )

    def _select_template(self, name: str | None, tools: list[dict] | None) -> str:
        ct = self.chat_template
        if isinstance(ct, dict):
            if name is not None:
                return ct.get(name, name)
            if tools is not None and "tool_use" in ct:
                return ct["tool_use"]
            if "default" in ct:
                return ct["default"]
            raise ValueError(
                f"{self.name_or_path}: several chat templates {sorted(ct)} and none is 'default'; "
                "pass chat_template=<name>"
            )
        if name is not None:
            return name
        if ct is None:
            raise ValueError(
                f"{self.name_or_path}: this tokenizer has no chat template (no chat_template in "
                "tokenizer_config.json and no chat_template.jinja); pass chat_template=<jinja>"
            )
        return ct


# -- loading helpers -------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _special_tokens(config: dict[str, Any], smap: dict[str, Any]) -> tuple[dict[str, str], list[str]]:
    """Named special tokens {name: text} and the extra special tokens, as transformers resolves them."""
    merged = dict(config)
    if "added_tokens_decoder" not in config:
        merged.update(smap)
    named = {}
    for key, value in merged.items():
        text = _token_text(value)
        if key.endswith("_token") and text is not None:
            named[key] = text
    extra_src = merged.get("extra_special_tokens") or merged.get("additional_special_tokens") or []
    if isinstance(extra_src, dict):
        named.update({k: t for k, v in extra_src.items() if (t := _token_text(v)) is not None})
        extra_src = []
    extra = [t for v in extra_src if (t := _token_text(v)) is not None]
    return named, extra


def _register_special(backend: _Backend, config: dict[str, Any], texts: Sequence[str]) -> None:
    """Add config-declared tokens missing from the backend, and flag every special token as special."""
    existing = {t.content: t for t in backend.get_added_tokens_decoder().values()}
    for _, tok in sorted((config.get("added_tokens_decoder") or {}).items(), key=lambda kv: int(kv[0])):
        if tok.get("content") not in existing:
            fields = {k: v for k, v in tok.items() if k != "__type"}
            backend.add_tokens([AddedToken(**fields)])
    existing = {t.content: t for t in backend.get_added_tokens_decoder().values()}
    to_add = []
    for text in dict.fromkeys(texts):
        tok = existing.get(text) or AddedToken(text, normalized=False)
        tok.special = True
        to_add.append(tok)
    if to_add:
        backend.add_special_tokens(to_add)


def _bos_eos_processor(backend: _Backend, special: dict[str, str], add_bos: bool, add_eos: bool):
    """`[bos] $A [eos]` template (transformers' `update_post_processor`)."""
    bos, eos = special.get("bos_token"), special.get("eos_token")
    add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
    b0, b1 = (f"{bos}:0 ", f" {bos}:1") if add_bos else ("", "")
    e0, e1 = (f" {eos}:0", f" {eos}:1") if add_eos else ("", "")
    single = f"{b0}$A:0{e0}"
    pair = f"{single}{b1} $B:1{e1}"
    tokens = [(t, backend.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=tokens)


def _load_chat_templates(path: Path, config: dict[str, Any]) -> str | dict[str, str] | None:
    """chat_template.jinja (+ additional_chat_templates/*.jinja) win over tokenizer_config's entry, which
    may be one template or a list of {"name", "template"}."""
    templates = {}
    if (path / "chat_template.jinja").is_file():
        templates["default"] = (path / "chat_template.jinja").read_text(encoding="utf-8")
    extra_dir = path / "additional_chat_templates"
    if extra_dir.is_dir():
        for f in sorted(extra_dir.glob("*.jinja")):
            templates[f.stem] = f.read_text(encoding="utf-8")
    if templates:
        return templates["default"] if list(templates) == ["default"] else templates
    ct = config.get("chat_template")
    if isinstance(ct, list):
        return {t["name"]: t["template"] for t in ct}
    return ct


def _alias_reasoning(message: dict[str, Any]) -> dict[str, Any]:
    """As HF: a message's reasoning (reasoning_content/thinking/reasoning) is visible under the first two."""
    r = next((message[k] for k in ("reasoning_content", "thinking", "reasoning") if k in message), None)
    return message if r is None else {"thinking": r, **message, "reasoning_content": r}


def _clean_up(text: str) -> str:
    for a, b in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(a, b)
    return text


# -- jinja -----------------------------------------------------------------------------------------
class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (assistant-mask markers in HF templates): render the body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    """Compile in a sandbox configured as transformers does (trim_blocks, lstrip_blocks, loopcontrols)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)
