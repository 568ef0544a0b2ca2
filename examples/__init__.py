"""Worked examples of Sp2PS inside compression loops (docs/compression_loops.md)."""
