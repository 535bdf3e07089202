import math
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from model.rqvae import RQVAE, RQVAEConfig
from pipeline.core.manifest import vae_fingerprint
from pipeline.core.storage import Storage
from pipeline.formats.codes_table import codes_table, to_parquet_bytes
from pipeline.tools.analysis import code_stats, query, read_codes

REPO = Path(__file__).resolve().parents[1]


def rqpipe(*args):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


@pytest.fixture
def known_tables(tmp_path):
    """Two tables, 1x2 positions x 2 depths, K = 8, with hand-chosen codes."""
    codes = np.array([
        [[[0, 5], [1, 5]]],  # a
        [[[1, 5], [0, 5]]],  # b
        [[[0, 5], [1, 5]]],  # c: the same stack as a
        [[[1, 6], [0, 7]]],  # d
    ])  # (4, 1, 2, 2)  # fmt: skip
    keys, labels, captions = ["a", "b", "c", "d"], [0, 1, 1, None], [None, "x", None, None]
    codes_dir = tmp_path / "run" / "codes"
    codes_dir.mkdir(parents=True)
    for name, rows in (("train-000000", [0, 1]), ("train-000001", [2, 3])):
        table = codes_table([keys[i] for i in rows], [labels[i] for i in rows],
                            [captions[i] for i in rows], codes[rows], 8, "fp")  # fmt: skip
        (codes_dir / f"{name}.parquet").write_bytes(to_parquet_bytes(table))
    return codes_dir


def test_stats_match_hand_computation(known_tables):
    stats = code_stats(read_codes(Storage(), str(known_tables)))
    assert stats["rows"] == 4 and stats["code_shape"] == [1, 2, 2]
    depth1, depth2 = stats["depths"]
    # depth 1: codes 0 and 1, four times each: 2 of 8 used, exactly 1 bit
    assert depth1["used_percent"] == 25.0
    assert depth1["entropy_bits"] == pytest.approx(1.0) and depth1["perplexity"] == 2.0
    # depth 2: 5 x6, 6 x1, 7 x1 of 8
    p = np.array([6, 1, 1]) / 8
    assert depth2["entropy_bits"] == pytest.approx(-(p * np.log2(p)).sum())
    assert depth2["top_codes"][0] == [5, 6]
    assert stats["duplicate_groups"] == [["a", "c"]] and stats["duplicate_rows"] == 2
    assert stats["labels"] == {"0": 1, "1": 2, "None": 1}
    assert stats["max_entropy_bits"] == math.log2(8)


def test_tables_read_as_is_everywhere(known_tables):
    pattern = str(known_tables / "*.parquet")
    assert len(pq.read_table(known_tables)) == 4
    assert len(pl.read_parquet(pattern)) == 4
    assert len(pq.read_table(known_tables).to_pandas()) == 4
    duck = duckdb.sql(f"SELECT count(*) AS n, count(label) AS labelled FROM '{pattern}'").fetchall()
    assert duck == [(4, 3)]
    frame = pl.read_parquet(pattern)
    assert frame.schema["codes"] == pl.Array(pl.UInt16, 4)


def test_query_command(known_tables):
    table = query(Storage(), str(known_tables),
                  "SELECT label, count(*) AS n FROM codes GROUP BY label ORDER BY label")  # fmt: skip
    assert table.to_pylist() == [{"label": 0, "n": 1}, {"label": 1, "n": 2},
                                 {"label": None, "n": 1}]  # fmt: skip
    result = rqpipe("query", str(known_tables),
                    "SELECT key FROM codes WHERE codes[1] = 1 ORDER BY key")  # fmt: skip
    assert result.returncode == 0 and result.stdout.split() == ["key", "b", "d"]
    typo = rqpipe("query", str(known_tables), "SELEC key FROM codes")
    assert typo.returncode == 1 and "Traceback" not in typo.stderr
    assert typo.stderr.startswith("rqpipe query: SQL error: Parser Error: syntax error")
    assert len(typo.stderr.strip().splitlines()) == 1
    swapped = rqpipe("query", "SELECT key FROM codes", str(known_tables))
    assert swapped.returncode == 1 and "the tables come first" in swapped.stderr


def test_stats_command_with_plot(known_tables, tmp_path):
    result = rqpipe("stats", str(known_tables), "--plot", str(tmp_path / "usage.png"))
    assert result.returncode == 0, result.stderr
    assert "exact duplicate code stacks: 1 group(s), 2 rows" in result.stdout
    assert Image.open(tmp_path / "usage.png").size[0] > 300
    missing = rqpipe("stats", str(tmp_path / "nowhere"))
    assert missing.returncode == 1 and "no rqpipe code tables" in missing.stderr


def test_table_tools_take_a_run_dir_and_skip_other_parquet_files(known_tables):
    import pyarrow as pa

    from pipeline.core.manifest import Manifest, write_manifest

    run = known_tables.parent
    (run / "shards").mkdir()
    rejects = pa.table({"source": ["x.png"], "reason": ["truncated"]})
    pq.write_table(rejects, run / "shards" / "rejects.parquet")
    pq.write_table(pa.table({"source": ["y.png"]}), known_tables / "notes.parquet")  # not a table
    assert code_stats(read_codes(Storage(), str(known_tables)))["rows"] == 4
    units = [{"name": f"train-00000{i}.parquet", "rows": 2, "bytes": 1} for i in (0, 1)]
    write_manifest(Storage(), str(known_tables), Manifest("encode", 1, {}, {}, units))
    for where in (run, known_tables):  # the run dir, or its codes/ folder
        result = rqpipe("stats", str(where), "--json")
        assert result.returncode == 0, result.stderr
        assert '"rows": 4' in result.stdout
    result = rqpipe("query", str(run), "SELECT count(*) AS n FROM codes")
    assert result.returncode == 0 and result.stdout.split() == ["n", "4"]


def test_decode_command_at_each_depth(tmp_path):
    torch.manual_seed(0)
    model = RQVAE(RQVAEConfig.preset("tiny")).eval()
    run = tmp_path / "run"
    model.save_pretrained(str(run / "vae" / "model"))
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    codes = model.encode(images)
    table = codes_table(["k0", "k1"], [None, None], [None, None], codes.numpy(), 256,
                        vae_fingerprint(Storage(), str(run / "vae" / "model")))  # fmt: skip
    (run / "codes").mkdir()
    (run / "codes" / "train-000000.parquet").write_bytes(to_parquet_bytes(table))
    for depth in (1, 4):
        out = tmp_path / f"k1-d{depth}.png"
        result = rqpipe("decode", str(run / "codes"), "--key", "k1", "--depth", str(depth),
                        "--out", str(out))  # fmt: skip
        assert result.returncode == 0, result.stderr
        expected = ((model.decode_codes(codes[1:], depth).clamp(-1, 1)[0].permute(1, 2, 0) + 1)
                    * 127.5).round().to(torch.uint8).numpy()  # fmt: skip
        assert np.array_equal(np.asarray(Image.open(out)), expected)
    missing = rqpipe(
        "decode", str(run / "codes"), "--key", "nope", "--out", str(tmp_path / "x.png")
    )
    assert missing.returncode == 1 and "no row with key" in missing.stderr
