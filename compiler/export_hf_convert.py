"""Converting an artifact's model into a Hugging Face checkpoint's contents, for compiler/export_hf.py (which
plans, streams and writes them): config.json rebuilt from the manifest (``hf_config``), an artifact module's
tensors as its HF modules' checkpoint tensors (``classify``, ``_module_tensors``), and the compressed-tensors
scheme arguments of each quantized group (``_weights_args``).

Quantized artifacts become compressed-tensors checkpoints (the format vLLM, SGLang and transformers read):

- ``linear_wna16`` (GPTQ, AWQ, RTN int4/int8) -> ``pack-quantized``: ``weight_packed`` int32 [N, K*bits/32]
  (codes + 2^(bits-1) offset, i.e. our unsigned codes, packed along the input dim, lowest bits first: exactly
  the transpose of our ``qweight``), ``weight_scale`` [N, G] in the model dtype, ``weight_shape`` [2] int64,
  and for asymmetric models ``weight_zero_point`` [N*bits/32, G] int32 (signed zero points + offset, packed
  along N). Act-order artifacts (``perm``) are refused: their groups are not contiguous in input order and
  compressed-tensors removed ``actorder: group`` (``weight_g_idx``) in 0.20.
- ``linear_fp8`` -> ``float-quantized``: ``weight`` float8_e4m3fn [N, K], ``weight_scale`` float32 [N, 1]
  (channel) or [1] (tensor), ``input_scale`` [1] when static; activations dynamic per token otherwise.
- ``linear_int8`` -> ``int-quantized``: ``weight`` int8 [N, K], ``weight_scale`` float32 [N, 1], activations
  int8 dynamic per token (or static per tensor with ``input_scale``).

Scales of the W8A8 formats are written in float32 (our internal precision, so the checkpoint dequantizes to
exactly the weights Spanda serves; compressed-tensors itself would store them in the model dtype and every
reader accepts both). Fused projections are split back along N (qkv_proj -> q/k/v, gate_up_proj -> gate/up).
Unquantized artifacts export plain safetensors in the artifact's dtype. Layouts checked against
compressed-tensors 0.20 (compressors/pack_quantized, naive_quantized) and its own decompression in
tests/test_quant_formats.py.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch

from compiler.quantize.packing import _pack
from runtime.ops.quant_linear import unpack_mma_zeros, unpack_wna16_mma

# Fused artifact module -> the HF modules it was made of, in order along N.
FUSED_MODULES: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}
# HF linear module names (last component): the ones compressed-tensors' "Linear" target reaches, so a float one
# among them goes into ``ignore``.
LINEAR_LEAVES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
# Artifact tensors that are not checkpoint parameters (runtime buffers).
ARTIFACT_ONLY = ("model.rope_cos_sin",)
# Artifact parameter suffixes per op (the names the build's quantization pass writes); a module whose suffixes
# include the first key of an entry is that op.
OP_SUFFIXES: dict[str, tuple[str, ...]] = {
    "linear_wna16": ("qweight", "qweight_mma", "scales", "zeros", "perm", "bias"),  # qweight_mma: wna16_mma pass
    "linear_w8a8": ("weight", "weight_scale", "input_scale", "bias"),  # fp8 or int8 by the weight's dtype
    "float": ("weight", "bias"),
}


def classify(names: list[str]) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Artifact tensor names -> ({module prefix: {suffix: full name}}, names that are not module parameters)."""
    modules: dict[str, dict[str, str]] = defaultdict(dict)
    other = []
    for n in names:
        if n in ARTIFACT_ONLY:
            continue
        prefix, _, suffix = n.rpartition(".")
        if prefix and suffix in {s for v in OP_SUFFIXES.values() for s in v}:
            modules[prefix][suffix] = n
        else:
            other.append(n)
    return dict(modules), other


def _op_of(suffixes: dict[str, str], weight_dtype: torch.dtype | None) -> str:
    if "qweight" in suffixes or "qweight_mma" in suffixes:
        return "linear_wna16"
    if "weight_scale" in suffixes:
        if weight_dtype == torch.float8_e4m3fn:
            return "linear_fp8"
        if weight_dtype == torch.int8:
            return "linear_int8"
        raise ValueError(f"weight_scale next to a {weight_dtype} weight: not an fp8 or int8 linear")
    return "float"


def hf_config(manifest) -> dict[str, Any]:
    """config.json of the source model, rebuilt from the manifest's normalized ModelConfig."""
    c = manifest.model.config
    family = manifest.model.family
    cfg: dict[str, Any] = {
        "architectures": [manifest.model.architecture],
        "model_type": family,
        "vocab_size": c["vocab_size"],
        "hidden_size": c["hidden_size"],
        "intermediate_size": c["intermediate_size"],
        "num_hidden_layers": c["num_layers"],
        "num_attention_heads": c["num_heads"],
        "num_key_value_heads": c["num_kv_heads"],
        "head_dim": c["head_dim"],
        "hidden_act": "silu",
        "rms_norm_eps": c["rms_norm_eps"],
        "rope_theta": c["rope_theta"],
        "rope_scaling": c.get("rope_scaling"),
        "max_position_embeddings": c["max_position_embeddings"],
        "tie_word_embeddings": c["tie_word_embeddings"],
        "torch_dtype": c.get("dtype", manifest.weights.dtype),
        "bos_token_id": manifest.tokenizer.bos_token_id,
        "eos_token_id": (manifest.tokenizer.eos_token_ids[0] if len(manifest.tokenizer.eos_token_ids) == 1
                         else manifest.tokenizer.eos_token_ids or None),
    }
    if manifest.tokenizer.pad_token_id is not None:
        cfg["pad_token_id"] = manifest.tokenizer.pad_token_id
    if family == "llama":
        cfg["attention_bias"] = bool(c.get("qkv_bias", False))
        cfg["mlp_bias"] = bool(c.get("mlp_bias", False))
    windows = list(c.get("sliding_windows") or [])
    used = [w for w in windows if w is not None]
    if family == "mistral":
        cfg["sliding_window"] = used[0] if used else None
    elif family == "qwen2":
        cfg["use_sliding_window"] = bool(used)
        cfg["sliding_window"] = used[0] if used else None
        cfg["max_window_layers"] = next((i for i, w in enumerate(windows) if w is not None), len(windows))
        cfg["layer_types"] = ["sliding_attention" if w is not None else "full_attention" for w in windows]
    return cfg


def _split_sizes(leaf: str, n: int, c: dict[str, Any]) -> tuple[int, ...]:
    if leaf == "qkv_proj":
        sizes = (c["num_heads"] * c["head_dim"], c["num_kv_heads"] * c["head_dim"], c["num_kv_heads"] * c["head_dim"])
    elif leaf == "gate_up_proj":
        sizes = (c["intermediate_size"], c["intermediate_size"])
    else:
        sizes = (n,)
    if sum(sizes) != n:
        raise ValueError(f"{leaf}: {n} output channels, expected {sum(sizes)} from the model config ({sizes})")
    return sizes


def _in_features(leaf: str, c: dict[str, Any]) -> int:
    if leaf == "o_proj":
        return c["num_heads"] * c["head_dim"]
    if leaf == "down_proj":
        return c["intermediate_size"]
    return c["hidden_size"]


def _pack_along_n(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned zero points [n, G] -> compressed-tensors' pack_to_int32(z - 2^(bits-1), packed_dim=0)."""
    per = 32 // bits
    pad = (-z.shape[0]) % per
    if pad:  # compressed-tensors pads with zeros (signed), i.e. the offset, and truncates on unpack
        z = torch.cat([z, torch.full((pad, z.shape[1]), 1 << (bits - 1), dtype=z.dtype, device=z.device)])
    return _pack(z, bits, dim=0).contiguous()


def _module_tensors(read: Callable[[str], torch.Tensor], prefix: str, suffixes: dict[str, str], op: str,
                    c: dict[str, Any], q: dict[str, Any]
                    ) -> Iterator[tuple[str, dict[str, torch.Tensor], tuple | None]]:
    """(HF module name, its checkpoint tensors by local name, scheme key or None for float) per HF module."""
    parent, _, leaf = prefix.rpartition(".")
    parts = FUSED_MODULES.get(leaf, (leaf,))
    t = {s: read(n) for s, n in suffixes.items()}
    if "qweight_mma" in t:  # the tensor-core layout of the same 4-bit codes: back to the GPTQ words
        t["qweight"] = _pack(unpack_wna16_mma(t.pop("qweight_mma"), _in_features(leaf, c)), 4, 0)
        if t["zeros"].dtype == torch.int32:  # and its zero points, stored as pack_mma_zeros' words
            t["zeros"] = unpack_mma_zeros(t["zeros"], t["scales"].dtype)
    bias = t.get("bias")
    if op == "float":
        n_out = t["weight"].shape[0]
    elif op == "linear_wna16":
        n_out = t["qweight"].shape[1]
    else:
        n_out = t["weight"].shape[0]
    sizes = _split_sizes(leaf, n_out, c) if leaf in FUSED_MODULES else (n_out,)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    key = None
    if op == "linear_wna16":
        if "perm" in t:
            raise ValueError(
                f"{prefix}: act-order (perm) cannot be exported to compressed-tensors: its groups are not contiguous "
                "in input order, and compressed-tensors removed actorder='group' (weight_g_idx) in 0.20; rebuild "
                "without quantization.act_order to export")
        k = _in_features(leaf, c)
        bits = t["qweight"].shape[0] * 32 // k
        if q.get("bits") and q["bits"] != bits:
            raise ValueError(f"{prefix}.qweight holds {bits}-bit codes, the manifest says bits={q['bits']}")
        g = t["scales"].shape[0]
        gs = -1 if g == 1 else k // g
        sym = bool((t["zeros"] == (1 << (bits - 1))).all())
        key = ("linear_wna16", bits, gs)
    elif op in ("linear_fp8", "linear_int8"):
        per_tensor = t["weight_scale"].numel() == 1
        key = (op, per_tensor, "input_scale" in t)
    for part, a, n in zip(parts, starts, sizes):
        name = f"{parent}.{part}" if parent else part
        sl = slice(a, a + n)
        out: dict[str, torch.Tensor] = {}
        if op == "float":
            out["weight"] = t["weight"][sl].contiguous()
        elif op == "linear_wna16":
            out["weight_packed"] = t["qweight"][:, sl].t().contiguous()
            out["weight_scale"] = t["scales"][:, sl].t().contiguous()
            out["weight_shape"] = torch.tensor([n, k], dtype=torch.int64)
            out["_zeros"] = t["zeros"][:, sl].t().to(torch.int32).contiguous()  # packed once symmetry is known
            out["_sym"] = torch.tensor(sym)
        else:
            out["weight"] = t["weight"][sl].contiguous()
            ws = t["weight_scale"].float().reshape(-1)
            out["weight_scale"] = ws.clone() if ws.numel() == 1 else ws[sl].reshape(n, 1).contiguous()
            if "input_scale" in t:
                out["input_scale"] = t["input_scale"].float().reshape(1).clone()
        if bias is not None:
            out["bias"] = bias[sl].contiguous()
        yield name, out, key


def _weights_args(key: tuple, sym: bool, per_channel: bool) -> dict[str, Any]:
    op = key[0]
    if op == "linear_wna16":
        _, bits, gs = key
        return {"weights": {"num_bits": bits, "type": "int", "symmetric": sym,
                            "strategy": "channel" if gs == -1 else "group", "group_size": None if gs == -1 else gs,
                            "dynamic": False},
                "input_activations": None, "output_activations": None, "format": "pack-quantized"}
    _, _, static = key
    typ = "float" if op == "linear_fp8" else "int"
    acts = ({"num_bits": 8, "type": typ, "symmetric": True, "strategy": "tensor", "dynamic": False,
             "group_size": None} if static else
            {"num_bits": 8, "type": typ, "symmetric": True, "strategy": "token", "dynamic": True, "group_size": None})
    return {"weights": {"num_bits": 8, "type": typ, "symmetric": True,
                        "strategy": "channel" if per_channel else "tensor", "group_size": None, "dynamic": False},
            "input_activations": acts, "output_activations": None,
            "format": "float-quantized" if op == "linear_fp8" else "int-quantized"}
