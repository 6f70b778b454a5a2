"""bench/decode.py: a row per context, the cached step checked against the recompute inside."""
import json

import pytest

from bench import decode as bench_decode


@pytest.mark.slow
def test_decode_bench_writes_a_row_per_context(tmp_path):
  out = tmp_path / "decode.json"
  rows = bench_decode.main(["--contexts", "16", "--repeats", "1", "--json", str(out)])
  assert json.loads(out.read_text()) == rows
  assert [r["context"] for r in rows] == [16]
  for r in rows:
    assert r["cached_tokens_per_s"] > 0 and r["recompute_tokens_per_s"] > 0
    assert abs(r["speedup"] - r["cached_tokens_per_s"] / r["recompute_tokens_per_s"]) < 1e-6 * r["speedup"]
    assert r["cache_bytes"] == r["context"] * r["cache_bytes_per_token"] == r["context"] * 2 * 4 * 2 * 32 * 4
