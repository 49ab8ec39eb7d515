"""JSON-lines inputs (runtime/jsonl.py): evaluation data, calibration data and benchmark workloads skip blank lines
and refuse a line that is not JSON with their own error, naming the file and the line."""

from __future__ import annotations

import pytest

from compiler.quantize.calib_data import _read_docs
from compiler.quantize.spec import CalibrationError
from runtime.evaluate import EvalDataError, load_eval_data
from spanda.bench import load_workload


def _encode(text: str) -> list[int]:
    return [ord(c) for c in text]


def test_blank_lines_are_skipped_and_a_bad_line_is_named(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"token_ids": [1, 2, 3]}\n\n{"text": "ab", "prompt": "ab", "max_tokens": 2}\n')
    assert load_eval_data(good, _encode) == [[1, 2, 3], [97, 98]]
    assert _read_docs(good, _encode) == [[1, 2, 3], [97, 98]]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"token_ids": [1, 2], "prompt": "ab", "max_tokens": 1}\n\n{"text": "ab"\n')
    for load, error in ((lambda p: load_eval_data(p, _encode), EvalDataError),
                        (lambda p: _read_docs(p, _encode), CalibrationError),
                        (lambda p: load_workload(p, _encode), ValueError)):
        with pytest.raises(error, match=rf"{bad}:3: not valid JSON"):
            load(bad)
    workload = tmp_path / "w.jsonl"
    workload.write_text('{"prompt": "ab", "max_tokens": 2}\n\n{"prompt_token_ids": [5], "max_tokens": 1}\n')
    assert [(r.prompt_token_ids, r.max_tokens) for r in load_workload(workload, _encode)] == [([97, 98], 2), ([5], 1)]
