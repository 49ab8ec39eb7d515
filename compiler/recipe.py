"""The build recipe: what `spanda build` makes of a checkpoint, validated before any work starts.

A recipe is YAML (see `recipes/tiny-llama.yaml`). Every section is a frozen pydantic model with
`extra="forbid"`, so a typo'd key is refused instead of silently ignored. `load_recipe` turns every
problem (YAML syntax, missing file, unknown key, bad value, cross-field rule) into one `RecipeError`
whose message names the file and, one line per problem, the dotted field path, the bad value and
what is allowed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

KV_PAGE_SIZES = (1, 8, 16, 32, 64, 128, 256)


class RecipeError(ValueError):
    """A recipe could not be loaded. `problems` holds one line per problem; `path` the file."""

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        if len(problems) == 1:
            msg = f"invalid recipe {path}: {problems[0]}"
        else:
            msg = f"invalid recipe {path} ({len(problems)} problems):\n" + "\n".join(
                f"  {p}" for p in problems
            )
        super().__init__(msg)


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelOptions(_Section):
    """Family options. Only the keys below exist; families read them from the validated recipe."""

    sliding_window: bool = True
    """Enforce the config's sliding window (Mistral/Qwen2). False attends to the full context."""
    max_position_embeddings: int | None = Field(default=None, ge=1)
    """Override the config's max_position_embeddings (None: keep the config's)."""


class ModelSection(_Section):
    source: str | None = Field(default=None, min_length=1)
    """Hugging Face checkpoint directory. The CLI's --model overrides it (`Recipe.with_model_source`)."""
    family: Literal["auto", "llama", "mistral", "qwen2"] = "auto"
    """Model family; `auto` picks it from the checkpoint's config.json `architectures`."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights and activations dtype. Recipes for real models set bfloat16."""
    options: ModelOptions = ModelOptions()


class PassesSection(_Section):
    """Graph and weight passes; each true flag runs its pass."""

    fuse_qkv: bool = True
    fuse_gate_up: bool = True
    fuse_add_rmsnorm: bool = True
    fuse_act_mul: bool = True
    fuse_rope_kv_write: bool = True
    """RoPE and the KV-cache write in one kernel (spanda::rope_and_cache), attention reads the cache."""
    fuse_act_quant: bool = True
    """W8A8 builds: the RMSNorm or SiLU-and-multiply before a linear_fp8 / linear_int8 also quantizes its output
    (one launch fewer per linear); runs after quantization."""
    wna16_mma: bool | Literal["auto"] = "auto"
    """4-bit builds: linears with group size 128 or per channel and N % 64 == 0, K % 128 == 0 store their codes
    in the Hopper tensor-core kernel's layout and run spanda::linear_wna16_mma (wgmma with the weight in
    registers); runs after quantization. ``auto``: when the build runs on a Hopper GPU (compute capability
    9.0), the target the kernel is written for (other devices run its arithmetic without the packed
    dequantization instructions)."""
    fuse_norm_epilogue: bool = False
    """4-bit builds with ``wna16_mma``: a residual add + RMSNorm between two tensor-core-layout linears (o_proj ->
    gate_up, down -> the next qkv) is carried by the two GEMMs (spanda::linear_wna16_mma_add_norm and
    linear_wna16_mma_rms): on a Hopper GPU, up to 8 rows, the first GEMM's epilogue writes the residual sum, its
    product with the norm weight and partial sums of squares, and the second scales its product by 1 / RMS (one
    launch fewer per norm); elsewhere they run the GEMM and the norm kernel as before. Runs after quantization.
    Off by default: on the H100 it decodes like the unfused build and is no faster at batch 1, 3% faster at 8 rows
    (bench/NOTES-wna16.md)."""
    fuse_silu_epilogue: bool = False
    """4-bit builds with ``wna16_mma``: the SiLU-and-multiply after the gate_up linear is carried by its GEMM
    (spanda::linear_wna16_mma_silu): on a Hopper GPU, up to 8 rows, the epilogue writes silu(gate) * up (one
    launch fewer per layer); elsewhere the GEMM, then the silu_and_mul kernel. Runs after quantization. Off by
    default: on the H100 it is no faster at batch 1 and slower at 2-4 rows (bench/NOTES-wna16.md)."""

    def enabled(self) -> list[str]:
        """Names of enabled passes, in declaration (= application) order."""
        return [name for name in type(self).model_fields if getattr(self, name)]


def _cross(field: str, value: Any, message: str) -> PydanticCustomError:
    """A cross-field error that the formatter attributes to `field` inside its section."""
    return PydanticCustomError("cross_field", message, {"field": field, "value": _show(value)})


class TargetSection(_Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_seq_len: int = Field(default=2048, ge=1)
    """Longest sequence (prompt + generated tokens) the engine accepts."""
    max_batch: int = Field(default=32, ge=1)
    """Most sequences in one step."""
    max_num_batched_tokens: int = Field(default=2048, ge=1)
    """Per-step token budget; >= kv_page_size and >= max_batch (one decode token per sequence)."""
    batch_buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    """Decode CUDA-graph batch sizes: ascending, unique, each <= max_batch, the last == max_batch.
    If omitted in YAML: powers of two below max_batch, then max_batch."""
    kv_page_size: Literal[1, 8, 16, 32, 64, 128, 256] = 16
    kv_dtype: Literal["auto", "float32", "bfloat16", "float16", "fp8_e4m3", "int8"] = "auto"
    """KV cache dtype; `auto` = the model dtype. fp8_e4m3 / int8 quantize the cache with per-layer key and
    value scales the build calibrates on ``quantization.calibration`` (whatever quantization.method is)."""
    kv_cache_blocks: int | None = Field(default=None, ge=1)
    """Fixed number of KV blocks; None lets the runtime size the cache from free memory."""
    enable_prefix_caching: bool = True

    @model_validator(mode="before")
    @classmethod
    def _default_buckets(cls, data: Any) -> Any:
        if isinstance(data, dict) and "batch_buckets" not in data:
            mb = data.get("max_batch", 32)
            if isinstance(mb, int) and not isinstance(mb, bool) and mb >= 1:
                buckets = [1 << i for i in range(mb.bit_length()) if (1 << i) < mb] + [mb]
                data = {**data, "batch_buckets": buckets}
        return data

    @model_validator(mode="after")
    def _cross_fields(self) -> TargetSection:
        b = list(self.batch_buckets)
        if not b:
            raise _cross("batch_buckets", b, "must not be empty; the last bucket must equal max_batch")
        if any(x < 1 for x in b):
            raise _cross("batch_buckets", b, "every bucket must be >= 1")
        if b != sorted(set(b)):
            raise _cross("batch_buckets", b, "must be sorted ascending with no duplicates")
        if b[-1] != self.max_batch:
            raise _cross(
                "batch_buckets",
                b,
                f"every bucket must be <= max_batch ({self.max_batch}) and the last must equal it",
            )
        if self.max_num_batched_tokens < self.kv_page_size:
            raise _cross(
                "max_num_batched_tokens",
                self.max_num_batched_tokens,
                f"must be >= kv_page_size ({self.kv_page_size})",
            )
        if self.max_num_batched_tokens < self.max_batch:
            raise _cross(
                "max_num_batched_tokens",
                self.max_num_batched_tokens,
                f"must be >= max_batch ({self.max_batch}): a full decode step takes one token per sequence",
            )
        if self.max_seq_len < self.kv_page_size:
            raise _cross("max_seq_len", self.max_seq_len, f"must be >= kv_page_size ({self.kv_page_size})")
        return self


class CalibrationSection(_Section):
    """Data the calibrated methods (gptq, awq, int8 with SmoothQuant, fp8 with static activations) and the
    KV-cache scales of target.kv_dtype fp8_e4m3 / int8 run."""

    data: str = Field(default="models/calibration.jsonl", min_length=1)
    """A .jsonl file ({"token_ids": [...]} or {"text": ...} rows), a text file, or a folder of text files;
    the default is the shipped models' held-in corpus sample."""
    num_samples: int = Field(default=128, ge=1)
    seq_len: int = Field(default=512, ge=2)


class QuantizationSection(_Section):
    """What ``spanda build`` quantizes and how (see compiler/quantize). lm_head and embeddings stay in the
    model dtype unless ``quantize_lm_head`` is set."""

    method: Literal["none", "fp8", "int8", "gptq", "awq", "rtn"] = "none"
    bits: Literal[4, 8] | None = None
    """gptq/awq/rtn weight bits (default 4; awq supports only 4)."""
    group_size: Literal[-1, 32, 64, 128, 256] = 128
    """Input channels per scale for gptq/awq/rtn; -1 = one scale per output channel."""
    symmetric: bool | None = None
    """gptq/rtn default true; awq default false (zero points)."""
    act_order: bool = False
    """GPTQ: quantize columns in order of decreasing Hessian diagonal (stored permuted; the kernel gathers)."""
    damp_percent: float = Field(default=0.01, gt=0, lt=1)
    """GPTQ: dampening added to the Hessian diagonal, as a fraction of its mean."""
    weight_scale: Literal["per_channel", "per_tensor"] = "per_channel"
    """fp8 weight scales."""
    activations: Literal["dynamic", "static", "none"] = "dynamic"
    """fp8/int8 activation scales: dynamic (per token, at run time), static (per tensor, calibrated; fp8
    only), none (int8 only: weight-only W8A16)."""
    smoothquant_alpha: float | None = Field(default=0.5, ge=0, le=1)
    """int8 W8A8: SmoothQuant migration strength (null = no smoothing)."""
    quantize_lm_head: bool = False
    calibration: CalibrationSection = CalibrationSection()

    @model_validator(mode="after")
    def _method_rules(self) -> QuantizationSection:
        m = self.method
        if self.bits is not None and m not in ("gptq", "awq", "rtn"):
            raise _cross("bits", self.bits, f"applies to gptq, awq and rtn only, not method {m!r}")
        if m == "awq" and self.bits == 8:
            raise _cross("bits", self.bits, "awq supports 4 bits only")
        if self.act_order and m != "gptq":
            raise _cross("act_order", self.act_order, f"applies to gptq only, not method {m!r}")
        if m == "fp8" and self.activations == "none":
            raise _cross("activations", "none", "fp8 is W8A8: choose dynamic or static")
        if m == "int8" and self.activations == "static":
            raise _cross("activations", "static", "int8 supports dynamic (W8A8) or none (weight-only)")
        if self.quantize_lm_head and m not in ("fp8", "int8", "rtn"):
            raise _cross("quantize_lm_head", True, "supported for fp8, int8 and rtn only")
        return self

    @property
    def weight_bits(self) -> int:
        if self.method in ("fp8", "int8"):
            return 8
        return self.bits or 4

    @property
    def is_symmetric(self) -> bool:
        if self.symmetric is not None:
            return self.symmetric
        return self.method != "awq"

    @property
    def calibrated(self) -> bool:
        """Whether the method needs calibration data."""
        m = self.method
        return (m in ("gptq", "awq") or (m == "fp8" and self.activations == "static")
                or (m == "int8" and self.activations == "dynamic" and self.smoothquant_alpha is not None))


class EvalSection(_Section):
    """Accuracy measured by the build and recorded in the artifact's eval.json (see runtime/evaluate.py)."""

    data: str | None = Field(default=None, min_length=1)
    """JSON-lines file of {"token_ids": [...]} or {"text": "..."}; null = no evaluation at build time."""
    max_sequences: int | None = Field(default=None, ge=1)
    """Evaluate at most this many sequences of the file (None = all)."""
    max_perplexity_increase: float | None = Field(default=None, ge=0)
    """Quantized builds: fail when perplexity rises by more than this fraction over the unquantized source
    (0.02 = 2%). Quantized builds with eval data always record the comparison in eval.json."""
    max_mean_kl: float | None = Field(default=None, ge=0)
    """Quantized builds: fail when mean KL(source || artifact) in nats exceeds this."""
    min_top1_agreement: float | None = Field(default=None, ge=0, le=1)
    """Quantized builds: fail when top-1 agreement with the source falls below this."""


class Recipe(_Section):
    """A validated recipe. Frozen: derive variants with `model_copy(update=...)`/`with_model_source`."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=128)
    model: ModelSection = ModelSection()
    passes: PassesSection = PassesSection()
    target: TargetSection = TargetSection()
    quantization: QuantizationSection = QuantizationSection()
    eval: EvalSection = EvalSection()

    @model_validator(mode="after")
    def _gates_need_data(self) -> Recipe:
        e = self.eval
        for gate in ("max_perplexity_increase", "max_mean_kl", "min_top1_agreement"):
            if getattr(e, gate) is not None and e.data is None:
                raise _cross(f"eval.{gate}", getattr(e, gate), "an accuracy gate needs eval.data to measure it")
            if getattr(e, gate) is not None and self.quantization.method == "none":
                raise _cross(f"eval.{gate}", getattr(e, gate),
                             "accuracy gates compare a quantized build with its source; quantization.method is none")
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists); what the manifest's provenance.recipe stores."""
        return self.model_dump(mode="json")

    def canonical_json(self, *, include_source: bool = False) -> str:
        """Sorted-key compact JSON of the validated recipe (defaults filled in)."""
        data = self.to_dict()
        if not include_source:
            data["model"].pop("source", None)
        return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    def sha256(self, *, include_source: bool = False) -> str:
        """Hex sha256 of `canonical_json()`.

        `model.source` (a local path) is left out by default: the checkpoint is identified by content
        in the manifest's provenance.source_files, so the same recipe and the same checkpoint bytes
        give the same hash wherever the checkpoint lives.
        """
        return hashlib.sha256(self.canonical_json(include_source=include_source).encode("utf-8")).hexdigest()

    def with_model_source(self, path: str | os.PathLike[str]) -> Recipe:
        """A copy with model.source set to `path` (the CLI's --model)."""
        return self.model_copy(update={"model": self.model.model_copy(update={"source": os.fspath(path)})})


# ---------------------------------------------------------------- loading and error formatting


def _show(value: Any, limit: int = 80) -> str:
    text = repr(value) if isinstance(value, str) else json.dumps(value, default=repr)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _section_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    cls: type[BaseModel] = Recipe
    for part in loc:
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        ann = field.annotation if field is not None else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        cls = ann
    return cls


def format_validation_error(err: ValidationError) -> list[str]:
    """One line per pydantic problem: `dotted.path = value: what is wrong / what is allowed`."""
    lines = []
    for e in err.errors():
        loc, kind, msg = tuple(e["loc"]), e["type"], e["msg"]
        ctx = e.get("ctx") or {}
        msg = msg.removeprefix("Value error, ")
        if kind == "cross_field":
            lines.append(f"{_dotted(loc + (ctx['field'],))} = {ctx['value']}: {msg}")
        elif kind == "extra_forbidden":
            section = _section_at(loc[:-1])
            allowed = ", ".join(section.model_fields) if section else "?"
            lines.append(f"{_dotted(loc)}: unknown key {_show(loc[-1])}; allowed keys here: {allowed}")
        elif kind == "missing":
            lines.append(f"{_dotted(loc)}: required field is missing")
        else:
            lines.append(f"{_dotted(loc)} = {_show(e.get('input'))}: {msg}")
    return lines


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (a silent override is usually a mistake)."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def recipe_from_dict(data: Any, origin: str = "<dict>") -> Recipe:
    """Validate an already-parsed recipe mapping; errors name `origin` like a file."""
    if not isinstance(data, dict):
        kind = "empty document" if data is None else type(data).__name__
        raise RecipeError(origin, [f"(top level): expected a mapping of sections, got {kind}"])
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(origin, format_validation_error(err)) from None


def load_recipe(path: str | os.PathLike[str]) -> Recipe:
    """Read and validate a recipe YAML file. Raises RecipeError (a ValueError) on any problem."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(str(p), ["file not found"]) from None
    except IsADirectoryError:
        raise RecipeError(str(p), ["is a directory, expected a YAML file"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(str(p), [f"cannot read: {exc}"]) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(str(p), [f"YAML syntax error{where}: {problem}"]) from None
    return recipe_from_dict(data, origin=str(p))
