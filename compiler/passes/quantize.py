"""The quantization pass: ``aten.linear`` nodes become quantized linear ops (runtime/ops/quant_linear.py).

It runs after the fusion passes, so a fused QKV or gate/up projection is quantized as one matrix (its parts
share an input, so GPTQ's Hessian and AWQ's activation statistics are the same for all of them). For each
rewritten linear the weight plan gets a *derived* group: one function of the checkpoint that returns the
op's tensors in the internal layout (RTN and FP8/INT8 weights are computed there, lazily, one linear at a
time; calibrated methods and pre-quantized checkpoints supply their own functions).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx

from compiler.passes.graph_utils import aten, attr_tensor, finalize, is_call, set_parameter
from compiler.weights import Derived, WeightPlan, WeightSource
from runtime.ops import quant_linear as ql

spanda = torch.ops.spanda


@dataclass(frozen=True)
class LinearScheme:
    """How one linear is stored and computed. ``op``: wna16 | fp8 | int8."""

    op: str
    bits: int = 4
    group_size: int = 128
    act_order: bool = False
    per_channel: bool = True  # fp8 weight scale per output channel (else per tensor)
    static_input: bool = False  # fp8: calibrated per-tensor input scale

    def params(self, n: int, k: int, dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Tensor name (after the module prefix) -> (shape, dtype) for a linear of ``k`` inputs, ``n`` outputs."""
        if self.op == "wna16":
            per = 32 // self.bits
            gs = k if self.group_size == -1 else self.group_size
            if k % gs or k % per:
                raise ValueError(f"a linear with {k} input features cannot use group_size {self.group_size} at "
                                 f"{self.bits} bits (needs a multiple of {gs} and of {per})")
            out = {"qweight": ((k // per, n), torch.int32), "scales": ((k // gs, n), dtype),
                   "zeros": ((k // gs, n), torch.uint8)}
            if self.act_order:
                out["perm"] = ((k,), torch.int32)
            return out
        if self.op == "fp8":
            out = {"weight": ((n, k), torch.float8_e4m3fn), "weight_scale": ((n if self.per_channel else 1,),
                                                                              torch.float32)}
            if self.static_input:
                out["input_scale"] = ((1,), torch.float32)
            return out
        if self.op == "int8":
            return {"weight": ((n, k), torch.int8), "weight_scale": ((n,), torch.float32)}
        raise ValueError(f"unknown linear scheme op {self.op!r}")


@dataclass(frozen=True)
class QuantSite:
    """A rewritten linear: ``prefix`` (module path), the float weight's plan entry, its shape and scheme."""

    prefix: str
    source: WeightSource
    out_features: int
    in_features: int
    scheme: LinearScheme


def quantize_linears(gm: fx.GraphModule, plan: WeightPlan, choose: Callable[[str], LinearScheme | None],
                     make: Callable[[QuantSite], Derived]) -> list[QuantSite]:
    """Rewrite every linear whose weight is a parameter and for which ``choose(prefix)`` gives a scheme.

    ``make(site)`` returns the function that produces the site's tensors; it is called during the pass, the
    function itself only when the weights are written."""
    sites: list[QuantSite] = []
    graph = gm.graph
    for node in list(graph.nodes):
        if not is_call(node, aten.linear.default):
            continue
        x, w = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else None
        if w.op != "get_attr" or not str(w.target).endswith(".weight"):
            continue
        w_name = str(w.target)
        prefix = w_name[: -len(".weight")]
        scheme = choose(prefix)
        if scheme is None:
            continue
        meta = attr_tensor(gm, w)
        n, k = meta.shape
        site = QuantSite(prefix, plan.entries[w_name], n, k, scheme)
        fn = make(site)
        names = {}
        for key, (shape, dtype) in scheme.params(n, k, meta.dtype).items():
            qname = f"{prefix}.{key}"
            if qname == w_name:
                delattr(gm.get_submodule(prefix), "weight")
            set_parameter(gm, qname, torch.empty(shape, dtype=dtype, device="meta"))
            names[qname] = key
        plan.derive(prefix, names, fn)
        with graph.inserting_before(node):
            p = {key: graph.get_attr(f"{prefix}.{key}") for key in names.values()}
            if scheme.op == "wna16":
                args = (x, p["qweight"], p["scales"], p["zeros"], p.get("perm"), bias, scheme.bits,
                        scheme.group_size)
                new = graph.call_function(spanda.linear_wna16.default, args)
            elif scheme.op == "fp8":
                new = graph.call_function(spanda.linear_fp8.default,
                                          (x, p["weight"], p["weight_scale"], p.get("input_scale"), bias))
            else:
                new = graph.call_function(spanda.linear_int8.default, (x, p["weight"], p["weight_scale"], None, bias))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        sites.append(site)
    finalize(gm)
    return sites


def pack_wna16_mma(gm: fx.GraphModule, plan: WeightPlan, dtype: torch.dtype) -> int:
    """After quantization: 4-bit ``linear_wna16`` nodes whose shapes the tensor-core layout holds (N % 64 == 0,
    K % 128 == 0, group size 128 or per channel) become ``linear_wna16_mma`` and their ``qweight`` becomes
    ``qweight_mma`` (quant_linear.pack_wna16_mma: the same codes, the same bytes, rearranged for the Hopper
    kernel), packed when the weights are written; with group size 128 in bf16/fp16 their ``zeros`` become
    quant_linear.pack_mma_zeros' int32 words. ``dtype`` is unused (the pass signature of the build)."""
    count = 0
    graph = gm.graph
    for node in list(graph.nodes):
        if not is_call(node, spanda.linear_wna16.default):
            continue
        x, qw, scales, zeros, perm, bias, bits, gs = node.args
        if bits != 4 or gs not in (128, -1) or qw.op != "get_attr":
            continue
        meta = attr_tensor(gm, qw)
        k, n = meta.shape[0] * 8, meta.shape[1]
        if n % ql.MMA_ROWS or k % ql.MMA_K:
            continue
        name = str(qw.target)
        new_name = name + "_mma"
        source = plan.entries[name]
        if source.kind != "derived":  # quantize_linears derives every linear_wna16's tensors (RTN, calibrated
            continue                  # methods and prequantized checkpoints alike)
        # the codes come out of one call per linear: pack them in its result
        group, key = source.sources
        inner = plan.derived[group]
        # group size 128 in bf16/fp16: the zero points as pack_mma_zeros' words (with the scale: four bytes the
        # kernel's cp.async pipeline loads; a one-byte zero point is loaded, and waited for, tile by tile)
        s_meta = attr_tensor(gm, scales)
        words = gs == 128 and s_meta.dtype in ql.MMA_MAGIC

        def derived(read, inner=inner, key=key, words=words):
            out = dict(inner(read))
            q = out.pop(key)
            # integer shuffles, the same bytes anywhere: on a GPU if there is one (an 8B model's take minutes
            # on a few CPU cores)
            on = torch.device("cuda") if torch.cuda.is_available() else q.device
            out[key + "_mma"] = ql.pack_wna16_mma(q.to(on)).to(q.device)
            if words:
                out["zeros"] = ql.pack_mma_zeros(out["scales"], out["zeros"])
            return out

        plan.derived[group] = derived
        plan.entries[new_name] = WeightSource("derived", (group, key + "_mma"))
        del plan.entries[name]
        set_parameter(gm, new_name, torch.empty((n // ql.MMA_ROWS, k // ql.MMA_K, 2048), dtype=torch.int16,
                                                device="meta"))
        if words:  # the same derived group's "zeros" (quantize_linears), now its words
            set_parameter(gm, str(zeros.target), torch.empty(s_meta.shape, dtype=torch.int32, device="meta"))
        with graph.inserting_before(node):
            new_qw = graph.get_attr(new_name)
            new = graph.call_function(spanda.linear_wna16_mma.default, (x, new_qw, scales, zeros, perm, bias, gs))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        count += 1
    finalize(gm)
    return count
