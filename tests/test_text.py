"""The plain-text helpers every report uses."""

from __future__ import annotations

from onnxfold.text import first_line, table


def test_table_sizes_columns_to_their_widest_cell_and_aligns_them():
    lines = table(["op", "before", ""], [["Conv", 10, "(-5)"], ["BatchNormalization", 2, ""]], align="<>")
    assert lines == ["op                  before",
                     "Conv                    10  (-5)",
                     "BatchNormalization       2"]
    assert table(["a", "b"], [], indent="  ") == ["  a  b"]


def test_first_line_of_an_error():
    assert first_line(ValueError("bad thing\nat line 2")) == "bad thing"
    assert first_line(OSError()) == "OSError"
