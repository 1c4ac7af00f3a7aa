"""A Parquet result is written in chunks: one schema that fits every chunk, and memory that does
not grow with the number of rows when the records can be read twice (finalize's merge)."""

from __future__ import annotations

import tracemalloc

import pyarrow.parquet as pq

from spider.data import sinks


def test_chunks_with_different_column_types_share_one_schema(tmp_path, monkeypatch):
    monkeypatch.setattr(sinks, "PARQUET_CHUNK", 3)
    rows = ([{"row_index": i, "completion": None, "usage": {"t": i}} for i in range(4)]
            + [{"row_index": 4, "completion": "text", "extra": 1.5, "usage": {"t": 4}}]
            + [{"row_index": i, "completion": "more", "usage": None} for i in range(5, 8)])
    path = tmp_path / "result.parquet"
    assert sinks.write_result(lambda: iter(rows), path, "parquet") == 8
    table = pq.read_table(path)
    assert table.column_names == ["row_index", "completion", "usage", "extra"]
    back = table.to_pylist()
    assert [r["row_index"] for r in back] == list(range(8))
    assert [r["completion"] for r in back] == [None] * 4 + ["text"] + ["more"] * 3
    assert [r["extra"] for r in back] == [None] * 4 + [1.5] + [None] * 3
    assert back[2]["usage"] == '{"t": 2}' and back[6]["usage"] is None
    # A plain iterable (read once) gives the same file.
    again = tmp_path / "again.parquet"
    assert sinks.write_result(iter(rows), again, "parquet") == 8
    assert pq.read_table(again).to_pylist() == back


def peak_bytes(rows: int, tmp_path) -> int:
    def records():
        for i in range(rows):
            yield {"row_index": i, "sample_index": 0, "completion": f"answer {i} " * 8,
                   "usage": {"prompt_tokens": 12, "completion_tokens": 16}}

    tracemalloc.start()
    try:
        assert sinks.write_result(records, tmp_path / f"r{rows}.parquet", "parquet") == rows
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_stays_flat_in_the_number_of_rows(tmp_path):
    small, large = peak_bytes(20_000, tmp_path), peak_bytes(200_000, tmp_path)
    # Ten times the rows: the peak is one chunk's, not the result's (holding every row would be ~10x).
    assert large < 2 * small, (small, large)
