"""The benchmark suite behind ``lorakern-bench``: providers x modes x shapes, JSONL records, plots."""
