"""Fusion passes over the exported graph, each rewriting the graph and the weight plan together.

- ``fuse_qkv`` / ``fuse_gate_up``: sibling projections reading the same input become one GEMM over
  concatenated weights, followed by a split.
- ``fuse_act_mul``: ``silu(gate) * up`` over the two halves of one fused projection -> spanda::silu_and_mul.
- ``fuse_add_rmsnorm``: ``s = a + b; rms_norm(s)`` -> spanda::fused_add_rms_norm returning (normed, s).
- ``fuse_act_quant`` (after quantization): an RMSNorm or SiLU-and-multiply whose output only feeds W8A8
  linears (linear_fp8 / linear_int8, one kind, one input scale) quantizes that output itself
  (spanda::rms_norm_quant, fused_add_rms_norm_quant, silu_and_mul_quant) and the linears become
  spanda::linear_w8a8 on the codes: one activation-quantization launch fewer per linear.
- ``fuse_norm_epilogue`` (after ``wna16_mma``): ``linear_wna16_mma -> fused_add_rms_norm -> linear_wna16_mma``
  (o_proj -> post-attention norm -> gate_up, down -> next input norm -> qkv) -> spanda::linear_wna16_mma_add_norm
  and spanda::linear_wna16_mma_rms: the two GEMMs' epilogues carry the residual add and the norm where the Hopper
  decode GEMM runs (quant_linear's module docstring), one launch fewer per norm.
- ``fuse_silu_epilogue`` (after ``fuse_norm_epilogue``): ``linear_wna16_mma(_rms) -> silu_and_mul`` (gate_up ->
  SiLU-and-multiply) -> spanda::linear_wna16_mma_silu: where the Hopper decode GEMM runs, its epilogue computes
  silu(gate) * up, one launch fewer per layer.
Each pass returns how many sites it rewrote; the build records the passes that applied.
"""

from __future__ import annotations

import operator
from collections import defaultdict

import torch
from torch import fx

from compiler.passes.graph_utils import aten, attr_tensor, finalize, getitem, is_call, set_parameter
from compiler.weights import WeightPlan

spanda = torch.ops.spanda


def _linear_parts(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node | None]:
    x, w = node.args[0], node.args[1]
    b = node.args[2] if len(node.args) > 2 else None
    return x, w, b


def fuse_sibling_linears(gm: fx.GraphModule, plan: WeightPlan, members: tuple[str, ...], fused: str) -> int:
    """Fuse linears named ``<prefix>.<member>.weight`` that share an input into ``<prefix>.<fused>``."""
    groups: dict[tuple[fx.Node, str], dict[str, fx.Node]] = defaultdict(dict)
    for node in gm.graph.nodes:
        if not is_call(node, aten.linear.default):
            continue
        x, w, _ = _linear_parts(node)
        if w.op != "get_attr":
            continue
        prefix, _, tail = str(w.target).rpartition(".")[0].rpartition(".")
        if tail in members and tail not in groups[(x, prefix)]:
            groups[(x, prefix)][tail] = node
    count = 0
    for (x, prefix), found in groups.items():
        if set(found) != set(members):
            continue
        nodes = [found[m] for m in members]
        biases = [_linear_parts(n)[2] for n in nodes]
        if any(b is None for b in biases) and not all(b is None for b in biases):
            continue
        weights = [_linear_parts(n)[1] for n in nodes]
        sizes = [attr_tensor(gm, w).shape[0] for w in weights]
        w_name = f"{prefix}.{fused}.weight"
        set_parameter(gm, w_name, torch.empty(sum(sizes), *attr_tensor(gm, weights[0]).shape[1:],
                                              dtype=attr_tensor(gm, weights[0]).dtype, device="meta"))
        plan.fuse(w_name, [str(w.target) for w in weights])
        args = [x]
        graph = gm.graph
        first = min(nodes, key=lambda n: list(graph.nodes).index(n))
        with graph.inserting_before(first):
            args.append(graph.get_attr(w_name))
            if biases[0] is not None:
                b_name = f"{prefix}.{fused}.bias"
                set_parameter(gm, b_name, torch.empty(sum(sizes), dtype=attr_tensor(gm, biases[0]).dtype,
                                                      device="meta"))
                plan.fuse(b_name, [str(b.target) for b in biases])
                args.append(graph.get_attr(b_name))
            out = graph.call_function(aten.linear.default, tuple(args))
            parts = graph.call_function(aten.split_with_sizes.default, (out, sizes, -1))
            for i, n in enumerate(nodes):
                n.replace_all_uses_with(getitem(graph, parts, i))
        for n in nodes:
            graph.erase_node(n)
        count += 1
    finalize(gm)
    return count


def fuse_qkv(gm: fx.GraphModule, plan: WeightPlan) -> int:
    return fuse_sibling_linears(gm, plan, ("q_proj", "k_proj", "v_proj"), "qkv_proj")


def fuse_gate_up(gm: fx.GraphModule, plan: WeightPlan) -> int:
    return fuse_sibling_linears(gm, plan, ("gate_proj", "up_proj"), "gate_up_proj")


def _split_half(node: fx.Node, index: int) -> fx.Node | None:
    """If node is getitem(split_with_sizes(y, [n, n]), index), return y."""
    if not (is_call(node, operator.getitem) and node.args[1] == index):
        return None
    split = node.args[0]
    if not is_call(split, aten.split_with_sizes.default):
        return None
    sizes = split.args[1]
    if len(sizes) != 2 or sizes[0] != sizes[1] or split.args[2] not in (-1, 1):
        return None
    return split.args[0]


def fuse_act_mul(gm: fx.GraphModule, plan: WeightPlan) -> int:
    count = 0
    graph = gm.graph
    for node in list(graph.nodes):
        if not is_call(node, aten.mul.Tensor):
            continue
        act, up = node.args
        if not (isinstance(act, fx.Node) and is_call(act, aten.silu.default)):
            continue
        src = _split_half(act.args[0], 0)
        if src is None or src is not _split_half(up, 1):
            continue
        with graph.inserting_before(node):
            fused = graph.call_function(spanda.silu_and_mul.default, (src,))
        node.replace_all_uses_with(fused)
        graph.erase_node(node)
        count += 1
    finalize(gm)
    return count


def fuse_add_rmsnorm(gm: fx.GraphModule, plan: WeightPlan) -> int:
    count = 0
    graph = gm.graph
    for node in list(graph.nodes):
        if not is_call(node, spanda.rms_norm.default):
            continue
        s = node.args[0]
        if not (isinstance(s, fx.Node) and is_call(s, aten.add.Tensor)):
            continue
        a, b = s.args
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            continue
        _, weight, eps = node.args
        # Insert right after the add, so every other user of the sum still comes after its replacement.
        with graph.inserting_before(s.next):
            fused = graph.call_function(spanda.fused_add_rms_norm.default, (b, a, weight, eps))
            normed, total = getitem(graph, fused, 0), getitem(graph, fused, 1)
        node.replace_all_uses_with(normed)
        s.replace_all_uses_with(total)
        graph.erase_node(node)
        graph.erase_node(s)
        count += 1
    finalize(gm)
    return count


def fuse_rope_kv_write(gm: fx.GraphModule, plan: WeightPlan) -> int:
    """rotary_embedding(pos, q, k) feeding paged_attention(q', k', v) -> rope_and_cache(pos, q, k, v) (rotate
    and write the cache in one kernel) followed by paged_attention_cached(q')."""
    count = 0
    graph = gm.graph
    for attn in list(graph.nodes):
        if not is_call(attn, spanda.paged_attention.default):
            continue
        q, k, v, layer, n_heads, n_kv, head_dim, scale, window = attn.args
        if not (is_call(q, operator.getitem) and is_call(k, operator.getitem)):
            continue
        rot = q.args[0]
        if not (is_call(rot, spanda.rotary_embedding.default) and k.args[0] is rot
                and (q.args[1], k.args[1]) == (0, 1) and len(k.users) == 1):
            continue
        positions, q_in, k_in, cos_sin, _ = rot.args
        with graph.inserting_before(attn):
            q_rot = graph.call_function(spanda.rope_and_cache.default,
                                        (positions, q_in, k_in, v, cos_sin, layer, head_dim, n_kv))
            out = graph.call_function(spanda.paged_attention_cached.default,
                                      (q_rot, layer, n_heads, n_kv, head_dim, scale, window))
        attn.replace_all_uses_with(out)
        graph.erase_node(attn)
        count += 1
    finalize(gm)
    return count


def _x_readers(out: fx.Node, targets) -> list[fx.Node] | None:
    """The users of ``out`` if there are some and each is a call to one of ``targets`` reading ``out`` as its x (the
    first argument, and only there); None otherwise."""
    users = list(out.users)
    if not users or any(u.op != "call_function" or u.target not in targets or u.args[0] is not out
                        or out in u.args[1:] for u in users):
        return None
    return users


def _replace_each(graph: fx.Graph, nodes: list[fx.Node], target, prefix: tuple, keep: tuple[int, ...],
                  suffix: tuple = ()) -> None:
    """Each node replaced, where it stands, by a call to ``target`` on ``prefix``, the node's arguments at the
    positions ``keep``, then ``suffix``."""
    for node in nodes:
        with graph.inserting_before(node):
            new = graph.call_function(target, (*prefix, *(node.args[i] for i in keep), *suffix))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)


_W8A8 = {spanda.linear_fp8.default: False, spanda.linear_int8.default: True}  # op -> int8
_QUANT_PRODUCERS = {spanda.rms_norm.default: spanda.rms_norm_quant.default,
                    spanda.fused_add_rms_norm.default: spanda.fused_add_rms_norm_quant.default,
                    spanda.silu_and_mul.default: spanda.silu_and_mul_quant.default}


def fuse_act_quant(gm: fx.GraphModule, plan: WeightPlan, dtype: torch.dtype) -> int:
    """Runs after the quantization pass (the W8A8 linears exist only then); see the module docstring. ``dtype``:
    the model's (the linears' output dtype)."""
    count = 0
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _QUANT_PRODUCERS:
            continue
        fused_add = node.target == spanda.fused_add_rms_norm.default
        if fused_add:  # its normed output is getitem 0; getitem 1 (the sum) keeps its users
            outs = [u for u in node.users if is_call(u, operator.getitem) and u.args[1] == 0]
            if len(outs) != 1 or len(node.users) != sum(is_call(u, operator.getitem) for u in node.users):
                continue
            out = outs[0]
        else:
            out = node
        linears = _x_readers(out, _W8A8)
        if linears is None:
            continue
        kinds = {_W8A8[u.target] for u in linears}
        scales = {u.args[3] for u in linears}  # the input_scale node (static) or None (dynamic)
        if len(kinds) != 1 or len(scales) != 1:
            continue
        int8, input_scale = kinds.pop(), scales.pop()
        # the quantizing producer replaces the producer where it stands (its inputs are defined there); a static
        # scale is a get_attr node, which must come first: moved before the producer
        if input_scale is not None and input_scale.op == "get_attr":
            node.prepend(input_scale)
        with graph.inserting_before(node):
            q = graph.call_function(_QUANT_PRODUCERS[node.target], (*node.args, input_scale, int8))
            codes, x_scale = getitem(graph, q, 0), getitem(graph, q, 1)
            if fused_add:
                total = getitem(graph, q, 2)
        # linear_fp8 / _int8 (x, weight, weight_scale, input_scale, bias) -> linear_w8a8 on the codes
        _replace_each(graph, linears, spanda.linear_w8a8.default, (codes, x_scale), (1, 2, 4), (dtype,))
        if fused_add:
            for u in list(node.users):
                if u is not out:
                    u.replace_all_uses_with(total)
                    graph.erase_node(u)
            graph.erase_node(out)
        graph.erase_node(node)
        count += 1
    finalize(gm)
    return count


def fuse_norm_epilogue(gm: fx.GraphModule, plan: WeightPlan, dtype: torch.dtype | None = None) -> int:
    """Runs after the wna16_mma pass (its linears exist only then); see the module docstring. A norm qualifies
    when one of its two inputs is a linear_wna16_mma used by nothing else and every user of its normed output
    is a linear_wna16_mma reading it as x."""
    count = 0
    graph = gm.graph
    mma = spanda.linear_wna16_mma.default
    for node in list(graph.nodes):
        if not is_call(node, spanda.fused_add_rms_norm.default):
            continue
        a, b, weight, eps = node.args
        pick = [(p, r) for p, r in ((a, b), (b, a)) if is_call(p, mma) and len(p.users) == 1]
        outs = {u.args[1]: u for u in node.users if is_call(u, operator.getitem)}
        if not pick or len(outs) != len(node.users) or 0 not in outs:
            continue
        prod, residual = pick[0]
        normed = outs[0]
        linears = _x_readers(normed, (mma,))
        if linears is None:
            continue
        with graph.inserting_before(node):
            fused = graph.call_function(spanda.linear_wna16_mma_add_norm.default, (*prod.args, residual, weight, eps))
            total, h, ss = (getitem(graph, fused, i) for i in range(3))
        fused.meta.update(prod.meta)
        # linear_wna16_mma (x, qmma, scales, zeros, perm, bias, group_size) -> linear_wna16_mma_rms on h
        _replace_each(graph, linears, spanda.linear_wna16_mma_rms.default, (h,), tuple(range(1, 7)), (ss, eps))
        if 1 in outs:
            outs[1].replace_all_uses_with(total)
            graph.erase_node(outs[1])
        graph.erase_node(normed)
        graph.erase_node(node)
        graph.erase_node(prod)
        count += 1
    finalize(gm)
    return count


def fuse_silu_epilogue(gm: fx.GraphModule, plan: WeightPlan, dtype: torch.dtype | None = None) -> int:
    """Runs after the wna16_mma and fuse_norm_epilogue passes; see the module docstring. A silu_and_mul
    qualifies when its input is a linear_wna16_mma (or linear_wna16_mma_rms) used by nothing else whose halves
    are whole 64-row tiles (N % 128 == 0)."""
    count = 0
    graph = gm.graph
    mma, rms = spanda.linear_wna16_mma.default, spanda.linear_wna16_mma_rms.default
    for node in list(graph.nodes):
        if not is_call(node, spanda.silu_and_mul.default):
            continue
        prod = node.args[0]
        if not (isinstance(prod, fx.Node) and (is_call(prod, mma) or is_call(prod, rms)) and len(prod.users) == 1):
            continue
        qmma = prod.args[1]
        if qmma.op != "get_attr" or attr_tensor(gm, qmma).shape[0] % 2:
            continue
        ss, eps = (prod.args[7], prod.args[8]) if is_call(prod, rms) else (None, 0.0)
        with graph.inserting_before(node):
            fused = graph.call_function(spanda.linear_wna16_mma_silu.default, (*prod.args[:7], ss, eps))
        fused.meta.update(node.meta)
        node.replace_all_uses_with(fused)
        graph.erase_node(node)
        graph.erase_node(prod)
        count += 1
    finalize(gm)
    return count
