"""The manifest schema: `manifest.json`, the contract between `spanda build` and the runtime.

Every section is a frozen pydantic model with `extra="forbid"`: a runtime refuses a manifest with
keys it does not understand rather than ignoring them. Bump `SCHEMA_VERSION` on any change that an
older runtime would misread (a new required field, a changed meaning); the reader refuses other
versions by name (`parse_manifest`).

`model.config` is an open dict so each compiler family can add keys. The keys the runtime and
`summary_lines` expect: hidden_size, num_layers, num_heads, num_kv_heads, head_dim, intermediate_size,
vocab_size, max_position_embeddings, rope_theta, rope_scaling, rms_norm_eps, tie_word_embeddings,
dtype (and sliding_window where the family has one).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
_SHA256_HEX = r"^[0-9a-f]{64}$"


class ManifestError(ValueError):
    """A manifest that is not valid JSON for this schema. `problems`: one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid manifest: " + "; ".join(problems))


class SchemaVersionError(ManifestError):
    """The manifest's schema_version is not the one this Spanda reads."""

    def __init__(self, found: Any) -> None:
        self.found = found
        self.expected = SCHEMA_VERSION
        msg = (
            f"schema_version is {found!r} in the artifact, this Spanda reads schema_version {SCHEMA_VERSION}"
        )
        super().__init__([msg])


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelInfo(_Section):
    family: str
    """Compiler family that built the graph: llama, mistral, qwen2, ..."""
    architecture: str
    """The checkpoint's architecture name, e.g. LlamaForCausalLM."""
    config: dict[str, Any]
    """Normalized model config (see the module docstring for the expected keys)."""


class TokenizerInfo(_Section):
    files: list[str] = []
    """Tokenizer files copied into the artifact (tokenizer.json, tokenizer_config.json, ...)."""
    chat_template: str | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = []
    pad_token_id: int | None = None


class QuantizationInfo(_Section):
    method: str = "none"
    bits: int | None = None
    group_size: int | None = None
    scales_layout: str | None = None
    """How scales are stored, e.g. "per_channel", "per_group_rowmajor"; None when unquantized."""
    unquantized: list[str] = []
    """Parameter names (or patterns) left in the model dtype."""
    op: str | None = None
    """The runtime op the quantized linears lower to (linear_wna16, linear_fp8, linear_int8)."""
    linears: int | None = None
    symmetric: bool | None = None
    act_order: bool | None = None
    weight_scale: str | None = None
    activations: str | None = None
    smoothquant_alpha: float | None = None
    calibration: dict[str, Any] | None = None
    """Calibration data path, sample count, sequence length and sha256 (calibrated methods)."""
    source_format: str | None = None
    """For pre-quantized checkpoints: the format read (gptq, gptq_v2, awq, fp8, compressed-tensors)."""


class GraphInfo(_Section):
    file: str
    """The torch.export program (.pt2, no weights)."""
    input_names: list[str]
    output_names: list[str]
    dynamic_dims: dict[str, Any] = {}
    """Dynamic dimensions by input name, e.g. {"input_ids": {"0": "T"}}."""


class WeightsInfo(_Section):
    files: list[str]
    """safetensors shard file names, in load order."""
    dtype: str


class Envelope(_Section):
    """Where the artifact was built for; `artifacts.store.check_envelope` compares it with the runtime."""

    device: Literal["cpu", "cuda"]
    gpu_arch: str | None = None
    """e.g. "sm_90"; None for cpu builds."""
    torch: str
    triton: str | None = None
    cuda: str | None = None
    python: str


class Limits(_Section):
    max_seq_len: int = Field(ge=1)
    max_batch: int = Field(ge=1)
    max_num_batched_tokens: int = Field(ge=1)
    batch_buckets: list[int]
    kv_page_size: int = Field(ge=1)
    kv_dtype: str
    """Resolved KV dtype (never "auto" in a built artifact, though the schema does not insist): a float dtype,
    or fp8_e4m3 / int8 for a quantized cache."""
    kv_scales: list[list[float]] | None = None
    """Quantized (fp8_e4m3/int8) cache: per layer [k_scale, v_scale] (float32 values; stored = x / scale)."""
    kv_cache_blocks: int | None = None
    enable_prefix_caching: bool = True


class Parallel(_Section):
    tensor_parallel: int = Field(default=1, ge=1)
    pipeline_parallel: int = Field(default=1, ge=1)


class FileEntry(_Section):
    size: int = Field(ge=0)
    sha256: str = Field(pattern=_SHA256_HEX)


class Provenance(_Section):
    recipe_sha256: str
    recipe: dict[str, Any]
    """The validated recipe as a dict."""
    source_files: dict[str, str] = {}
    """Source checkpoint file name -> sha256."""
    calibration_sha256: str | None = None
    spanda_version: str
    build_host: str
    build_time: str
    """ISO 8601 UTC, e.g. 2026-01-02T03:04:05Z."""
    build_seconds: float


class KernelsInfo(_Section):
    """Compile-time GPU work shipped in the artifact (absent for CPU builds)."""

    tuning_file: str | None = None
    """JSON of the autotuned kernel configs (runtime.ops.triton_attention.pinned() form)."""
    cache_dir: str | None = None
    """Triton cache directory holding every kernel compiled for `envelope.gpu_arch` during the build."""
    num_kernels: int = 0
    tuning_seconds: float = 0.0
    warmup_seconds: float = 0.0


class Manifest(_Section):
    """The whole manifest. Invariant: every file it references (graph, shards, tokenizer) is in `files`."""

    schema_version: int
    model: ModelInfo
    tokenizer: TokenizerInfo
    quantization: QuantizationInfo = QuantizationInfo()
    passes: list[str] = []
    """Passes applied, in order."""
    graph: GraphInfo
    weights: WeightsInfo
    envelope: Envelope
    limits: Limits
    parallel: Parallel = Parallel()
    kernels: KernelsInfo | None = None
    files: dict[str, FileEntry]
    """Relative posix path -> size and sha256, for every file in the artifact but manifest.json."""
    provenance: Provenance
    eval: dict[str, Any] | None = None

    @field_validator("schema_version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v != SCHEMA_VERSION:
            raise ValueError(
                f"schema_version {v} is not the one this Spanda writes and reads ({SCHEMA_VERSION})"
            )
        return v

    @field_validator("files")
    @classmethod
    def _safe_names(cls, files: dict[str, FileEntry]) -> dict[str, FileEntry]:
        for name in files:
            parts = name.split("/")
            if (
                not name
                or name.startswith("/")
                or "\\" in name
                or any(p in ("", ".", "..") for p in parts)
                or name == MANIFEST_NAME
            ):
                raise ValueError(f"file name {name!r} must be a relative posix path inside the artifact")
        return files

    @model_validator(mode="after")
    def _referenced_files_listed(self) -> Manifest:
        missing = [n for n in self.referenced_files() if n not in self.files]
        if missing:
            raise ValueError(f"files referenced by the manifest but not listed in `files`: {missing}")
        return self

    def referenced_files(self) -> list[str]:
        """Files named by graph, weights and tokenizer sections."""
        return [self.graph.file, *self.weights.files, *self.tokenizer.files]

    def to_json_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def summary_lines(self) -> list[str]:
        """Human-readable lines for `spanda inspect`."""
        c, lim, env, prov, q = (
            self.model.config,
            self.limits,
            self.envelope,
            self.provenance,
            self.quantization,
        )
        keys = [
            "num_layers",
            "hidden_size",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "intermediate_size",
            "vocab_size",
        ]
        sizes = ", ".join(f"{k}={c[k]}" for k in keys if k in c) or "(no size keys in config)"
        total = sum(f.size for f in self.files.values())
        lines = [
            f"schema: v{self.schema_version}",
            f"model: {self.model.family} ({self.model.architecture}), dtype {self.weights.dtype}",
            f"sizes: {sizes}",
            "quantization: "
            + (
                "none"
                if q.method == "none"
                else f"{q.method} bits={q.bits} group_size={q.group_size} scales={q.scales_layout}"
                f" unquantized={len(q.unquantized)}"
            ),
            f"passes: {', '.join(self.passes) or '(none)'}",
            f"limits: max_seq_len={lim.max_seq_len} max_batch={lim.max_batch} "
            f"max_num_batched_tokens={lim.max_num_batched_tokens} buckets={lim.batch_buckets}",
            f"kv cache: page_size={lim.kv_page_size} dtype={lim.kv_dtype}"
            f" blocks={lim.kv_cache_blocks or 'auto'}"
            f" prefix_caching={'on' if lim.enable_prefix_caching else 'off'}",
            f"parallel: tp={self.parallel.tensor_parallel} pp={self.parallel.pipeline_parallel}",
            f"envelope: {env.device}{' ' + env.gpu_arch if env.gpu_arch else ''} torch {env.torch}"
            f" triton {env.triton or '-'} cuda {env.cuda or '-'} python {env.python}",
            f"files: {len(self.files)}, {format_size(total)}",
        ]
        lines += [
            f"  {name}  {format_size(f.size)}  sha256:{f.sha256[:16]}"
            for name, f in sorted(self.files.items())
        ]
        lines += [
            f"provenance: spanda {prov.spanda_version}, built on {prov.build_host} at {prov.build_time}"
            f" in {prov.build_seconds:.1f} s",
            f"  recipe sha256:{prov.recipe_sha256[:16]} ({prov.recipe.get('name', '?')}),"
            f" {len(prov.source_files)} source files, calibration "
            + (f"sha256:{prov.calibration_sha256[:16]}" if prov.calibration_sha256 else "-"),
        ]
        if self.kernels:
            k = self.kernels
            lines.append(f"kernels: {k.num_kernels} compiled for {self.envelope.gpu_arch} in {k.cache_dir}/, "
                         f"tuning {k.tuning_file} ({k.tuning_seconds:.1f} s tuning, {k.warmup_seconds:.1f} s warm-up)")
        if self.eval:
            lines.append("eval: " + ", ".join(f"{k}={v}" for k, v in sorted(self.eval.items())))
        return lines


def format_size(n: int) -> str:
    """1536 -> '1.5 KiB'."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _format_errors(err: ValidationError) -> list[str]:
    out = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        out.append(f"{loc}: {e['msg'].removeprefix('Value error, ')}")
    return out


def parse_manifest(data: Any) -> Manifest:
    """Validate a parsed manifest.json. The schema version is checked first, so a manifest from
    another Spanda gets a version error (SchemaVersionError) rather than a list of field errors."""
    if not isinstance(data, dict):
        raise ManifestError([f"(top level): expected a JSON object, got {type(data).__name__}"])
    if "schema_version" not in data:
        raise ManifestError(["schema_version: missing"])
    if data["schema_version"] != SCHEMA_VERSION or isinstance(data["schema_version"], bool):
        raise SchemaVersionError(data["schema_version"])
    try:
        return Manifest.model_validate(data)
    except ValidationError as err:
        raise ManifestError(_format_errors(err)) from None
