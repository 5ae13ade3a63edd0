"""`sla2cli.files`: the one JSON writer every output goes through."""

from __future__ import annotations

import json
import math

from sla2cli.files import write_csv_file, write_json_file


def test_json_is_strict_and_written_whole(tmp_path):
    path = tmp_path / "out" / "rows.json"
    document = {"b": [1.5, math.nan, {"c": math.inf}], "a": (-math.inf, "text", None, 2)}
    write_json_file(path, document, sort_keys=True)
    text = path.read_text(encoding="utf-8")
    assert json.loads(text, parse_constant=lambda name: name) == {"a": [None, "text", None, 2],
                                                                  "b": [1.5, None, {"c": None}]}
    assert text.index('"a"') < text.index('"b"') and text.endswith("}\n")
    assert [p.name for p in path.parent.iterdir()] == ["rows.json"]  # no temporary file left beside it


def test_csv_is_written_whole_with_empty_cells_for_missing_keys(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("old\n")
    write_csv_file(path, ["a", "b"], [{"a": 1, "b": 2.5}, {"a": 3}])
    assert path.read_text().splitlines() == ["a,b", "1,2.5", "3,"]
    assert [p.name for p in tmp_path.iterdir()] == ["rows.csv"]
