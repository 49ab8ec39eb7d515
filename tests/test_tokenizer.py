"""Tokenizer vs transformers' AutoTokenizer (the reference), chat templates, incremental detokenization
and stop strings. Tokenizers are trained in-process (no network)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from runtime.detokenizer import IncrementalDetokenizer, StopChecker
from runtime.tokenizer import Tokenizer
from tests.tokenizer_fixture import corpus, tokenizer_config, train_tokenizer

TEXTS = [
    "Hello world",
    "",
    " ",
    "  leading and trailing  ",
    "tabs\tand\nnewlines\n\n",
    "Café naïve résumé Straße",
    "中文分词测试：你好，世界！",
    "日本語のテキスト and 한국어",
    "emoji 😀🚀 👨‍👩‍👧 👍🏽 ❤️",
    "def f(x):\n    return x ** 2  # sq",
    "special <s> inside </s> text<unk>",
    "<s><s></s>",
    "unseen chars: ꙮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \u0000 \u200b",
    "a" * 300,
]
MESSAGES = [
    {"role": "system", "content": "  You are terse.  "},
    {"role": "user", "content": "Hi! 你好 😀"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "What is 2+2?", "name": None},
]


def hf_load(path: Path, **kwargs):
    from transformers import AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    return AutoTokenizer.from_pretrained(str(path), **kwargs)


def write_config(path: Path, **overrides) -> None:
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(**overrides), ensure_ascii=False))


def edit_tokenizer_json(path: Path, edit) -> None:
    data = json.loads((path / "tokenizer.json").read_text())
    edit(data)
    (path / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bpe_tok")
    train_tokenizer(d, vocab_size=512)
    return d


@pytest.fixture
def bpe_copy(bpe_dir, tmp_path) -> Path:
    d = tmp_path / "tok"
    shutil.copytree(bpe_dir, d)
    return d


@pytest.fixture(scope="module")
def tok(bpe_dir) -> Tokenizer:
    return Tokenizer.from_dir(bpe_dir)


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory) -> Path:
    """Sentencepiece-style (Llama 2 like): Metaspace "▁", BPE with byte fallback <0xNN>, Strip decoder."""
    d = tmp_path_factory.mktemp("sp_tok")
    raw = RawTokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=70, show_progress=False
    )
    raw.train_from_iterator(corpus(), trainer=trainer)
    raw.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    raw.save(str(d / "tokenizer.json"))

    def add_bytes(data):
        vocab = data["model"]["vocab"]
        for b in range(256):
            vocab.setdefault(f"<0x{b:02X}>", len(vocab))
        data["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": "<s>", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
            ],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
        }

    edit_tokenizer_json(d, add_bytes)
    write_config(d)
    return d


# -- encode / decode vs transformers ------------------------------------------------------------------
@pytest.mark.parametrize("which", ["bpe_dir", "sp_dir"])
def test_encode_decode_match_hf(which, request):
    path = request.getfixturevalue(which)
    ours, hf = Tokenizer.from_dir(path), hf_load(path)
    for text in TEXTS:
        for special in (True, False):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == hf(text, add_special_tokens=special)["input_ids"], (text, special)
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert ours.encode("x")[0] == ours.bos_token_id == hf.bos_token_id
    assert ours.eos_token_id == hf.eos_token_id and len(ours) == len(hf)
    assert set(hf.all_special_ids) <= ours.all_special_ids
    assert ours.convert_ids_to_tokens([1, 2]) == hf.convert_ids_to_tokens([1, 2])


def test_sp_tokenizer_uses_byte_fallback(sp_dir):
    ours = Tokenizer.from_dir(sp_dir)
    # Characters the training corpus never contains, so they cannot be in the learned alphabet (which
    # characters of the corpus make the limited alphabet can vary between training runs).
    rare = "ꙮ𓀀"
    assert any(t.startswith("<0x") for t in ours.convert_ids_to_tokens(ours.encode(rare)))
    assert ours.decode(ours.encode(f"two  spaces {rare}")) == f"two  spaces {rare}"


@pytest.mark.parametrize(
    "flags",
    [
        {},
        {"add_bos_token": False},
        {"add_eos_token": True},
        {"add_bos_token": True, "add_eos_token": True},
        {"add_bos_token": False, "add_eos_token": True},
    ],
)
def test_add_bos_eos_flags(bpe_copy, flags):
    base = {"add_bos_token": True, "add_eos_token": False}
    cfg = {**base, **flags}
    write_config(bpe_copy, **cfg)
    text = "Hello world"
    # Default: like transformers v5, tokenizer.json's post-processor decides, the flags are ignored.
    assert Tokenizer.from_dir(bpe_copy).encode(text) == hf_load(bpe_copy)(text)["input_ids"]
    # bos_eos_from_config: rebuild from the flags, like HF's update_post_processor (v4 Llama fast).
    ours = Tokenizer.from_dir(bpe_copy, bos_eos_from_config=True).encode(text)
    assert ours == hf_load(bpe_copy, **cfg)(text)["input_ids"]
    body = Tokenizer.from_dir(bpe_copy).encode(text, add_special_tokens=False)
    assert ours == [1] * cfg["add_bos_token"] + body + [2] * cfg["add_eos_token"]


def test_missing_post_processor_adds_nothing(bpe_copy):
    edit_tokenizer_json(bpe_copy, lambda d: d.update(post_processor=None))
    ours, hf = Tokenizer.from_dir(bpe_copy), hf_load(bpe_copy)
    assert ours.encode("Hello") == hf("Hello")["input_ids"] == ours.encode("Hello", add_special_tokens=False)


def test_special_tokens_resolution_like_hf(bpe_copy):
    """special_tokens_map.json overrides the legacy config; config-named tokens become special
    (skipped in decode) and missing ones are added."""

    def edit(data):
        data["added_tokens"][2]["special"] = False  # "</s>" not flagged special in tokenizer.json
        data["added_tokens"].append(
            {
                "id": 512,
                "content": "<|im_end|>",
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": False,
            }
        )

    edit_tokenizer_json(bpe_copy, edit)
    write_config(bpe_copy, eos_token="<|im_end|>", pad_token="<pad>", additional_special_tokens=["<|tool|>"])
    ours, hf = Tokenizer.from_dir(bpe_copy), hf_load(bpe_copy)
    text = "a</s>b<|im_end|>c<pad>d<|tool|>"
    ids = ours.encode(text)
    assert ids == hf(text)["input_ids"]
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert (ours.eos_token_id, ours.pad_token_id, len(ours)) == (hf.eos_token_id, hf.pad_token_id, len(hf))
    assert set(hf.all_special_ids) <= ours.all_special_ids


# -- chat template --------------------------------------------------------------------------------------
@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_matches_hf(bpe_dir, tok, gen):
    hf = hf_load(bpe_dir)
    for msgs in (MESSAGES, MESSAGES[1:2], MESSAGES[:3]):
        ours = tok.apply_chat_template(msgs, add_generation_prompt=gen)
        assert ours == hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    assert ours.startswith("<s><|system|>\nYou are terse.\n") or not gen


FANCY = (
    "{%- set ns = namespace(n=0) -%}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
    "{% if m.role == 'bad' %}{{ raise_exception('bad role') }}{% endif %}"
    "[{{ ns.n }}:{{ m.role | upper }}] {{ m.content | tojson }}\n"
    "    {% if loop.last %}{% break %}{% endif %}{% endfor %}"
    "{% if tools %}TOOLS={{ tools | tojson }}{% endif %}{{ custom_var | default('none') }}"
    "{% if add_generation_prompt %}<gen>{% endif %}{{ strftime_now('%Y') | length }}"
)


def test_chat_template_features_match_hf(bpe_copy):
    write_config(bpe_copy, chat_template=FANCY)
    ours, hf = Tokenizer.from_dir(bpe_copy), hf_load(bpe_copy)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"x": "é"}}}]
    for kwargs in ({}, {"custom_var": "hello"}, {"tools": tools}):
        assert ours.apply_chat_template(MESSAGES, **kwargs) == hf.apply_chat_template(
            MESSAGES, tokenize=False, add_generation_prompt=True, **kwargs
        )
    with pytest.raises(Exception, match="bad role"):
        ours.apply_chat_template([{"role": "bad", "content": "x"}])


def test_chat_template_named_list_and_jinja_file(bpe_copy):
    named = [
        {"name": "default", "template": "D{{ messages[0].content }}"},
        {"name": "tool_use", "template": "T{{ messages[0].content }}"},
    ]
    write_config(bpe_copy, chat_template=named)
    ours, hf = Tokenizer.from_dir(bpe_copy), hf_load(bpe_copy)
    msgs = [{"role": "user", "content": "x"}]
    for kw in ({}, {"chat_template": "tool_use"}, {"tools": [{"name": "f"}]}):
        assert ours.apply_chat_template(msgs, **kw) == hf.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=True, **kw
        )
    assert ours.apply_chat_template(msgs, tools=[{"name": "f"}]) == "Tx"
    # the newer layout: chat_template.jinja (+ additional_chat_templates/) wins over the config entry
    (bpe_copy / "chat_template.jinja").write_text("J{{ messages[0].content }}{{ eos_token }}")
    extra = bpe_copy / "additional_chat_templates"
    extra.mkdir()
    (extra / "rag.jinja").write_text("R{{ messages[0].content }}")
    ours, hf = Tokenizer.from_dir(bpe_copy), hf_load(bpe_copy)
    for kw in ({}, {"chat_template": "rag"}):
        assert ours.apply_chat_template(msgs, **kw) == hf.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=True, **kw
        )
    assert ours.apply_chat_template(msgs) == "Jx</s>"


def test_missing_chat_template_raises(bpe_copy):
    cfg = tokenizer_config()
    del cfg["chat_template"]
    (bpe_copy / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer.from_dir(bpe_copy).apply_chat_template(MESSAGES)


# -- incremental detokenizer ------------------------------------------------------------------------
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable char table used by byte-level BPE."""
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


B2U = _bytes_to_unicode()


def byte_ids(tok: Tokenizer, text: str) -> list[int]:
    """Token ids of `text` one byte per token (every multi-byte character split across tokens)."""
    return [tok.token_to_id(B2U[b]) for b in text.encode("utf-8")]


def stream(
    tok: Tokenizer, prompt: list[int], out: list[int], chunks: list[int], skip: bool = True
) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    deltas, i, c = [], 0, 0
    while i < len(out):
        n = max(1, chunks[c % len(chunks)]) if chunks else 1
        deltas.append(detok.add_tokens(out[i : i + n]))
        i, c = i + n, c + 1
    deltas.append(detok.flush())
    assert detok.output_text == "".join(deltas)
    return deltas


def test_detokenizer_split_characters(tok):
    out = byte_ids(tok, "a中😀é b")
    deltas = stream(tok, [], out, [1])
    assert "".join(deltas) == tok.decode(out) == "a中😀é b"
    assert all("\ufffd" not in d for d in deltas)
    assert deltas[:5] == ["a", "", "", "中", ""]


def test_detokenizer_sentencepiece_spacing(sp_dir):
    sp = Tokenizer.from_dir(sp_dir)
    prompt = sp.encode("Tell me")
    out = sp.encode(" a story, 中文 😀 please", add_special_tokens=False)
    text = "".join(stream(sp, prompt, out, [1]))
    assert text == sp.decode(prompt + out)[len(sp.decode(prompt)) :]
    assert text.startswith(" a story")  # the leading space survives with the prompt as context
    assert "".join(stream(sp, [], out, [2])) == sp.decode(out)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_detokenizer_deltas_concatenate_to_decode(tok, data):
    mode = data.draw(st.sampled_from(["random_ids", "text", "bytes"]))
    if mode == "random_ids":
        out = data.draw(st.lists(st.integers(0, len(tok) - 1), max_size=40))
    else:
        text = data.draw(st.text(st.characters(codec="utf-8"), max_size=25))
        out = tok.encode(text, add_special_tokens=False) if mode == "text" else byte_ids(tok, text)
    chunks = data.draw(st.lists(st.integers(1, 4), max_size=5))
    skip = data.draw(st.booleans())
    prompt = data.draw(st.sampled_from([[], tok.encode("Hello there"), [1]]))
    deltas = stream(tok, prompt, out, chunks, skip)
    full = tok.decode(out, skip_special_tokens=skip)
    assert "".join(deltas) == full
    if "\ufffd" not in full:
        assert not any("\ufffd" in d for d in deltas)
    assert not any(d.endswith("\ufffd") for d in deltas[:-1]) or "\ufffd" in full


# -- stop strings --------------------------------------------------------------------------------------
def run_stop(tok: Tokenizer, out: list[int], stop: list[str], include: bool):
    """Engine-like loop: detokenize, check stop strings, stream the safe part. -> (final text, streamed)."""
    detok, checker = IncrementalDetokenizer(tok, []), StopChecker(stop, include)
    streamed = ""
    for t in out:
        delta = detok.add_tokens([t])
        hit = checker.check(detok.output_text, len(delta))
        if hit is not None:
            assert hit.text.startswith(streamed) and hit.truncate_at == len(hit.text)
            return hit.text, streamed, hit.stop_string
        now = checker.streamable_text(detok.output_text)
        assert now.startswith(streamed)
        streamed = now
    return detok.output_text, streamed, None


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_split_across_tokens(tok, include):
    out = byte_ids(tok, "The answer: 42 STOP more text")
    text, streamed, hit = run_stop(tok, out, ["STOP", "nope"], include)
    assert hit == "STOP"
    assert text == ("The answer: 42 STOP" if include else "The answer: 42 ")
    if not include:
        assert streamed == "The answer: 42 "  # "S", "ST", "STO" were held back, never streamed


def test_stop_string_earliest_wins_and_multibyte(tok):
    out = byte_ids(tok, "xx中文yy😀zz")
    assert run_stop(tok, out, ["😀", "文y"], False)[:1] == ("xx中",)
    checker = StopChecker(["abc", "b"])
    assert checker.check("xab", 2).stop_string == "b" and checker.check("xab", 2).text == "xa"
    assert checker.holdback("hello ab") == 2 and StopChecker(["abc"], True).holdback("ab") == 0
    assert checker.streamable_text("hello ab", finished=True) == "hello ab"
    assert StopChecker([]).check("anything", 3) is None


@settings(max_examples=150, deadline=None)
@given(
    text=st.text("abc中", max_size=30),
    stop=st.lists(st.text("abc中", min_size=1, max_size=4), min_size=1, max_size=3),
    chunks=st.lists(st.integers(1, 4), min_size=1, max_size=4),
    include=st.booleans(),
)
def test_stop_checker_against_brute_force(text, stop, chunks, include):
    checker = StopChecker(stop, include)
    pos, c, streamed, result = 0, 0, "", None
    while pos < len(text) and result is None:
        n = chunks[c % len(chunks)]
        now = text[: pos + n]
        hit = checker.check(now, len(now) - pos)
        pos, c = len(now), c + 1
        found = [(now.find(s), -len(s), s) for s in stop if s in now]
        if found:  # reference: the first prefix containing a stop string; earliest start, then longest
            start, neg, s = min(found)
            expected = now[: start - neg] if include else now[:start]
            assert hit is not None and hit.stop_string == s and hit.text == expected
            assert expected.startswith(streamed)
            result = expected
        else:
            assert hit is None
            safe = checker.streamable_text(now)
            assert safe.startswith(streamed) and now.startswith(safe)
            streamed = safe
    if result is None:
        assert checker.streamable_text(text, finished=True) == text


def test_chat_template_reasoning_alias_and_none_dropped(bpe_copy):
    template = (
        "{% for m in messages %}{{ m.role }}:{{ m.reasoning_content }}/{{ m.thinking }}|{{ m.content }};"
        "{% endfor %}"
    )
    write_config(bpe_copy, chat_template=template)
    ours, hf = Tokenizer.from_dir(bpe_copy), hf_load(bpe_copy)
    msgs = [
        {"role": "user", "content": "q", "tool_calls": None},
        {"role": "assistant", "content": "a", "reasoning": "think"},
    ]
    assert ours.apply_chat_template(msgs) == hf.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True
    )
