"""docs/ops.md and the rule registry must list the same ops."""

import re
from pathlib import Path

from sp2ps_onnx.graph.rules import VJP_RULES


def test_ops_table_matches_registry():
    text = (Path(__file__).parent.parent / "docs" / "ops.md").read_text()
    documented = set()
    for line in text.splitlines():
        match = re.match(r"^\| ([A-Za-z0-9, ]+) \|", line)
        if match and match.group(1).strip() != "Op":
            documented.update(op.strip() for op in match.group(1).split(","))
    assert documented == set(VJP_RULES)
