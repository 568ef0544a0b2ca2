"""Reverse-mode differentiation of the head, emitted as ONNX nodes in the same graph."""

from __future__ import annotations

from collections import defaultdict

from ..errors import UnsupportedOpError
from .builder import GraphBuilder
from .rules import rule_for


def backward(b: GraphBuilder, path: list[int], requires: set[str], seeds: dict[str, str]) -> dict[str, str]:
    """Propagate ``seeds`` (tensor -> gradient) back over ``path`` (node indices in graph order).

    Returns the accumulated gradient of every tensor in ``requires`` that received one.
    Contributions from several consumers are added with one ``Sum`` node per tensor.
    """
    pending: dict[str, list[str]] = defaultdict(list)
    for tensor, grad in seeds.items():
        pending[tensor].append(grad)
    total: dict[str, str] = {}

    def gradient_of(tensor: str) -> str | None:
        if tensor not in total and pending.get(tensor):
            total[tensor] = b.sum_all(pending.pop(tensor))
        return total.get(tensor)

    for idx in reversed(path):
        node = b.info.node(idx)
        dys = [gradient_of(o) if o else None for o in node.output]
        if all(dy is None for dy in dys):
            continue
        needs = [bool(i) and i in requires for i in node.input]
        rule = rule_for(node)
        if rule is None:  # head_nodes() checks first; this guards direct callers
            raise UnsupportedOpError(node.op_type, node.name or node.output[0])
        dxs = rule.fn(b, node, dys, needs)
        for name, dx, need in zip(node.input, dxs, needs, strict=False):
            if need and dx is not None:
                pending[name].append(dx)
    for tensor in list(pending):
        gradient_of(tensor)
    return {t: g for t, g in total.items() if t in requires}
