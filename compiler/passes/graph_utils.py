"""Small helpers for rewriting the fx graph of ``ExportedProgram.module()`` (weights as get_attr nodes)."""

from __future__ import annotations

import operator

import torch
from torch import fx, nn

aten = torch.ops.aten


def is_call(node: fx.Node, target) -> bool:
    return node.op == "call_function" and node.target == target


def set_parameter(gm: fx.GraphModule, qualname: str, tensor: torch.Tensor) -> None:
    """Register ``tensor`` as parameter ``qualname`` (dotted), creating empty parent modules as needed."""
    *path, leaf = qualname.split(".")
    mod: nn.Module = gm
    for part in path:
        if not hasattr(mod, part):
            mod.add_module(part, nn.Module())
        mod = getattr(mod, part)
    mod.register_parameter(leaf, nn.Parameter(tensor, requires_grad=False))


def attr_tensor(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    obj = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part)
    return obj


def getitem(graph: fx.Graph, node: fx.Node, i: int) -> fx.Node:
    return graph.call_function(operator.getitem, (node, i))


def finalize(gm: fx.GraphModule) -> None:
    """Drop dead nodes, unused parameters/submodules; recompile and lint."""
    gm.graph.eliminate_dead_code()
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters()):
        if name not in used:
            *path, leaf = name.split(".")
            owner = gm.get_submodule(".".join(path)) if path else gm
            delattr(owner, leaf)
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
