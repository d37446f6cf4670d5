"""The benchmark script runs and writes its documented outputs (no timing is asserted)."""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import throughput  # noqa: E402


def test_throughput_quick_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert throughput.main(["--quick", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    impls = {r["impl"] for r in data["rows"]}
    assert {"base", "published", "mogu:reference"} <= impls
    assert all(r["ratio_to_base"] > 0 for r in data["rows"])
    assert "ratio to base" in capsys.readouterr().out
