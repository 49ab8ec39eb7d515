"""Telling a quantized Hugging Face checkpoint's format from its ``config.json`` alone: ``detect(config)`` ->
:class:`SourceQuant` (the method; ``groups``, each a tuple of target module patterns with the :class:`Scheme`
their weights are stored in; the ignored modules), or None for a float checkpoint. ``SourceQuant.scheme_for``
answers per HF module name; compiler/quantize/hf_formats.py reads the tensors of each scheme.

Formats, told apart only by ``config.json``'s ``quantization_config`` (never by file or tensor names):

- ``gptq`` (AutoGPTQ / GPTQModel): ``qweight``/``qzeros``/``scales``/``g_idx``; ``checkpoint_format`` "gptq"
  (v1, zero points stored minus one; the default when absent) or "gptq_v2", honoured as written.
- ``awq`` (AutoAWQ), ``version: gemm`` only: ``qweight``/``qzeros`` interleaved by packing.AWQ_ORDER.
- ``fp8`` (AutoFP8 / vLLM's fp8 config): ``weight`` float8_e4m3fn, per-tensor ``weight_scale``,
  ``activation_scheme`` static (``input_scale``) or dynamic. Block-wise (``weight_block_size``) is refused.
- ``compressed-tensors``: ``pack-quantized`` (int4/int8 weight-only in ``weight_packed``), ``float-quantized``
  (FP8 W8A8), ``int-quantized`` (INT8 W8A8) and ``naive-quantized`` (either of the last two, or int8
  weight-only), mixed per config group.

Anything else raises :class:`QuantFormatError` naming the config field, its value and the supported values.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from compiler.quantize.packing import GPTQ_FORMATS

SUPPORTED_METHODS = ("gptq", "awq", "fp8", "compressed-tensors")
SUPPORTED_CT_FORMATS = ("pack-quantized", "float-quantized", "int-quantized", "naive-quantized")
SUPPORTED_INT_BITS = (4, 8)
LAYER_LINEARS = "<decoder-layer linears>"  # target of the non-compressed-tensors methods


class QuantFormatError(ValueError):
    """A quantized checkpoint this Spanda cannot read; the message names the field, its value and what is
    supported."""


def _unsupported(field_name: str, value: Any, supported: Sequence[Any] | str) -> QuantFormatError:
    sup = supported if isinstance(supported, str) else ", ".join(repr(s) for s in supported)
    return QuantFormatError(f"quantization_config.{field_name} = {value!r} is not supported; supported: {sup}")


@dataclass(frozen=True)
class Scheme:
    """How one module's weight is stored.

    storage: "gptq" | "awq" | "fp8" (AutoFP8 names) | "ct_packed" | "ct_float" | "ct_int" (compressed-tensors)
    op: the internal op it becomes: "linear_wna16" | "linear_fp8" | "linear_int8"
    """

    storage: str
    op: str
    bits: int
    group_size: int = -1  # -1: one group per output channel (also for per-tensor FP8/INT8 weights)
    symmetric: bool = True
    act_order: bool = False  # g_idx tensors are present and may be any grouping
    checkpoint_format: str | None = None  # GPTQ only: "gptq" (v1) or "gptq_v2"
    activations: str = "none"  # "none" (weight-only), "dynamic" (per token) or "static" (per tensor)
    weight_strategy: str = "group"  # group | channel | tensor


@dataclass(frozen=True)
class SourceQuant:
    """A checkpoint's quantization: schemes with the module names they target, and the ignored modules.

    ``groups``: (targets, scheme); a target is "Linear" (every linear module), LAYER_LINEARS (the decoder
    layers' linear modules, lm_head excluded), an exact module name (or a suffix after "."), or
    "re:<regex>" (matched from the start, as compressed-tensors does). ``ignore``: the same kinds of patterns,
    plus (``ignore_substring``) the plain substrings of the HF ``modules_to_not_convert`` convention.
    """

    method: str
    groups: tuple[tuple[tuple[str, ...], Scheme], ...]
    ignore: tuple[str, ...] = ()
    ignore_substring: bool = False
    kv_cache_scheme: dict[str, Any] | None = None  # recorded, not applied (the KV-cache work reads it)
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def scheme_for(self, name: str) -> Scheme | None:
        """The scheme of module ``name`` (e.g. "model.layers.0.self_attn.q_proj"), None when it stays float."""
        if _matches_any(name, self.ignore, self.ignore_substring):
            return None
        for targets, scheme in self.groups:
            if _matches_any(name, targets, False):
                return scheme
        return None


def _matches(name: str, pattern: str, substring: bool) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    if pattern == "Linear":  # compressed-tensors' class target: callers only ask about linear modules
        return True
    if pattern == LAYER_LINEARS:  # GPTQ/AWQ/FP8: the decoder layers' linears, never lm_head
        return ".layers." in f".{name}"
    return name == pattern or name.endswith("." + pattern) or (substring and pattern in name)


def _matches_any(name: str, patterns: Sequence[str], substring: bool) -> bool:
    return any(_matches(name, p, substring) for p in patterns)


# ---------------------------------------------------------------- detect


def _int(qc: dict[str, Any], key: str, default: Any = None) -> Any:
    v = qc.get(key, default)
    return int(v) if v is not None else None


def _detect_gptq(qc: dict[str, Any]) -> SourceQuant:
    bits = _int(qc, "bits", 4)
    if bits not in SUPPORTED_INT_BITS:
        raise _unsupported("bits", bits, SUPPORTED_INT_BITS)
    fmt_ck, fmt = qc.get("checkpoint_format"), qc.get("format")
    if fmt_ck is not None and fmt is not None and fmt_ck != fmt:
        raise QuantFormatError(f"quantization_config.checkpoint_format = {fmt_ck!r} and format = {fmt!r} disagree")
    ckfmt = fmt_ck or fmt or "gptq"  # absent: v1, the format AutoGPTQ and transformers wrote for years
    if ckfmt not in GPTQ_FORMATS:
        raise _unsupported("checkpoint_format", ckfmt, GPTQ_FORMATS)
    if qc.get("dynamic"):
        raise _unsupported("dynamic", qc["dynamic"], "empty (per-module overrides are not read)")
    gs = _int(qc, "group_size", 128)
    if gs is None or gs == 0 or gs < -1:
        raise _unsupported("group_size", gs, "a positive group size or -1")
    scheme = Scheme("gptq", "linear_wna16", bits, gs, bool(qc.get("sym", True)), bool(qc.get("desc_act", False)),
                    ckfmt, weight_strategy="channel" if gs == -1 else "group")
    targets: tuple[str, ...] = (LAYER_LINEARS,)
    blocks = qc.get("modules_in_block_to_quantize")
    if blocks:  # list of lists of names inside a decoder layer, e.g. [["self_attn.q_proj"], ["mlp.up_proj"]]
        flat = [n for part in blocks for n in ([part] if isinstance(part, str) else part)]
        targets = tuple(f"re:.*\\.layers\\.\\d+\\.{re.escape(n)}$" for n in flat)
    if qc.get("lm_head"):
        targets = (*targets, "lm_head")
    return SourceQuant("gptq", ((targets, scheme),), tuple(qc.get("modules_to_not_convert") or ()), True, raw=qc)


AWQ_VERSIONS = ("gemm",)


def _detect_awq(qc: dict[str, Any]) -> SourceQuant:
    version = str(qc.get("version", "gemm")).lower()
    if version not in AWQ_VERSIONS:
        raise _unsupported("version", qc.get("version"), AWQ_VERSIONS)
    bits = _int(qc, "bits", _int(qc, "w_bit", 4))
    if bits != 4:
        raise _unsupported("bits", bits, (4,))
    gs = _int(qc, "group_size", _int(qc, "q_group_size", 128))
    if gs is None or gs <= 0 and gs != -1:
        raise _unsupported("group_size", gs, "a positive group size or -1")
    scheme = Scheme("awq", "linear_wna16", 4, gs, not bool(qc.get("zero_point", True)),
                    weight_strategy="channel" if gs == -1 else "group")
    return SourceQuant("awq", (((LAYER_LINEARS,), scheme),), tuple(qc.get("modules_to_not_convert") or ()), True,
                       raw=qc)


FP8_ACTIVATION_SCHEMES = ("static", "dynamic")


def _detect_fp8(qc: dict[str, Any]) -> SourceQuant:
    if qc.get("weight_block_size") is not None:
        raise _unsupported("weight_block_size", qc["weight_block_size"],
                           "null (per-tensor or per-channel weight_scale; block-wise FP8 is not supported)")
    act = qc.get("activation_scheme", "dynamic")
    if act not in FP8_ACTIVATION_SCHEMES:
        raise _unsupported("activation_scheme", act, FP8_ACTIVATION_SCHEMES)
    fmt = qc.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise _unsupported("fmt", fmt, ("e4m3",))
    ignore = tuple(qc.get("ignored_layers") or ()) + tuple(qc.get("modules_to_not_convert") or ())
    scheme = Scheme("fp8", "linear_fp8", 8, -1, True, activations=act, weight_strategy="tensor")
    return SourceQuant("fp8", (((LAYER_LINEARS,), scheme),), ignore, True, raw=qc)


def _ct_args(args: dict[str, Any] | None, where: str) -> dict[str, Any] | None:
    if args is None:
        return None
    a = dict(args)
    a["type"] = str(a.get("type", "int")).lower()
    a["num_bits"] = int(a.get("num_bits", 8))
    a["symmetric"] = bool(a.get("symmetric", True))
    strategy = a.get("strategy")
    if strategy is None:  # compressed-tensors' inference
        gs = a.get("group_size")
        strategy = "tensor" if gs is None else ("channel" if gs == -1 else "group")
    a["strategy"] = str(strategy).lower()
    if a.get("block_structure") is not None or a["strategy"] == "block":
        raise _unsupported(f"{where}.strategy", "block", ("group", "channel", "tensor", "token"))
    return a


def _ct_scheme(name: str, group: dict[str, Any], fmt: str) -> Scheme:
    where = f"config_groups.{name}"
    w = _ct_args(group.get("weights"), f"{where}.weights")
    ia = _ct_args(group.get("input_activations"), f"{where}.input_activations")
    if group.get("output_activations") is not None:
        raise _unsupported(f"{where}.output_activations", group["output_activations"], "null")
    fmt = group.get("format") or fmt
    if fmt not in SUPPORTED_CT_FORMATS:
        raise _unsupported(f"{where}.format" if group.get("format") else "format", fmt, SUPPORTED_CT_FORMATS)
    if w is None:
        raise _unsupported(f"{where}.weights", None, "weight quantization arguments")
    actorder = w.get("actorder")
    if isinstance(actorder, str):
        actorder = actorder.lower()
    g_idx = actorder in (True, "group", "dynamic")  # "weight"/"static" only reorder during calibration
    if ia is not None:
        if ia["type"] != w["type"] or ia["num_bits"] != 8 or not ia["symmetric"]:
            raise _unsupported(f"{where}.input_activations", group["input_activations"],
                               "symmetric 8-bit activations of the weights' type")
        dynamic = ia.get("dynamic", False)
        if dynamic is True and ia["strategy"] == "token":
            acts = "dynamic"
        elif dynamic is False and ia["strategy"] == "tensor":
            acts = "static"
        else:
            raise _unsupported(f"{where}.input_activations.strategy", f"{ia['strategy']} (dynamic={dynamic})",
                               ("token (dynamic)", "tensor (static)"))
    else:
        acts = "none"
    if w["type"] == "float":
        if fmt not in ("float-quantized", "naive-quantized") or w["num_bits"] != 8:
            raise _unsupported(f"{where}.weights", f"float{w['num_bits']} in {fmt}", "float8 in float-quantized")
        if w["strategy"] not in ("channel", "tensor"):
            raise _unsupported(f"{where}.weights.strategy", w["strategy"], ("channel", "tensor"))
        if not w["symmetric"]:
            raise _unsupported(f"{where}.weights.symmetric", False, (True,))
        if acts == "none":
            raise _unsupported(f"{where}.input_activations", None,
                               "FP8 activations, dynamic per token or static per tensor (FP8 weight-only has no op)")
        return Scheme("ct_float", "linear_fp8", 8, -1, True, activations=acts, weight_strategy=w["strategy"])
    if w["type"] != "int":
        raise _unsupported(f"{where}.weights.type", w["type"], ("int", "float"))
    bits = w["num_bits"]
    if acts != "none":  # INT8 W8A8
        if fmt not in ("int-quantized", "naive-quantized") or bits != 8:
            raise _unsupported(f"{where}.weights", f"int{bits} with activations in {fmt}",
                               "int8 weights in int-quantized")
        if not w["symmetric"] or w["strategy"] not in ("channel", "tensor"):
            raise _unsupported(f"{where}.weights", f"symmetric={w['symmetric']} strategy={w['strategy']}",
                               "symmetric channel or tensor int8 weights")
        return Scheme("ct_int", "linear_int8", 8, -1, True, activations=acts, weight_strategy=w["strategy"])
    if bits not in SUPPORTED_INT_BITS:
        raise _unsupported(f"{where}.weights.num_bits", bits, SUPPORTED_INT_BITS)
    if w["strategy"] not in ("group", "channel"):
        raise _unsupported(f"{where}.weights.strategy", w["strategy"], ("group", "channel"))
    if fmt == "pack-quantized":
        storage = "ct_packed"
    elif bits == 8 and w["symmetric"]:
        storage = "ct_int"  # naive int8 weight-only: int8 "weight" tensor, becomes W8A16
    else:
        raise _unsupported("format", fmt, "pack-quantized for int4 and asymmetric weight-only schemes")
    gs = int(w["group_size"]) if w["strategy"] == "group" else -1
    return Scheme(storage, "linear_wna16", bits, gs, w["symmetric"], g_idx, weight_strategy=w["strategy"])


def _detect_ct(qc: dict[str, Any]) -> SourceQuant:
    for key in ("sparsity_config", "transform_config"):
        if qc.get(key):
            raise _unsupported(key, qc[key], "empty (sparse and transformed checkpoints are not read)")
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        raise _unsupported("quantization_status", status, ("compressed",))
    fmt = qc.get("format", "dense")
    groups = qc.get("config_groups") or {}
    if not groups:
        raise _unsupported("config_groups", groups, "at least one quantization scheme")
    out = []
    for name, group in groups.items():
        if not isinstance(group, dict):
            raise _unsupported(f"config_groups.{name}", group, "a scheme dict (preset names are not expanded)")
        out.append((tuple(group.get("targets") or ()), _ct_scheme(name, group, fmt)))
    return SourceQuant("compressed-tensors", tuple(out), tuple(qc.get("ignore") or ()), False,
                       qc.get("kv_cache_scheme"), raw=qc)


def detect(config: dict[str, Any]) -> SourceQuant | None:
    """The quantization of a checkpoint from its config.json dict; None when it is not quantized."""
    qc = config.get("quantization_config")
    if not qc:
        return None
    method = str(qc.get("quant_method", "")).lower()
    if method == "gptq":
        return _detect_gptq(qc)
    if method == "awq":
        return _detect_awq(qc)
    if method == "fp8":
        return _detect_fp8(qc)
    if method == "compressed-tensors":
        return _detect_ct(qc)
    raise _unsupported("quant_method", qc.get("quant_method"), SUPPORTED_METHODS)


def is_quantized_module(name: str, sq: SourceQuant | None) -> bool:
    """Whether HF module ``name`` is stored quantized (ignored modules, embeddings and norms stay float)."""
    return sq is not None and sq.scheme_for(name) is not None
