"""`sla2 demo`: the table, the CSV, the router-vs-random comparison, user mistakes (exit code 2), and the
synthetic pattern of `sla2cli.demo` (its block masses are `report.metrics.true_block_mass`, tested there)."""

import csv

import pytest
import torch

from sla2cli.cli import main
from sla2cli.demo.pattern import grid_positions, video_like_qkv

FAST = ["demo", "--tokens", "1536", "--heads", "2", "--repeats", "1"]
COLUMNS = [
    "tokens", "heads", "head_dim", "sparsity", "k_sel", "key_blocks", "selection", "mass_kept",
    "rel_l2_error", "cosine", "dense_ms", "sla2_ms", "speedup", "device",
]


def run(argv, capsys):
    """Run the real entry point; return (exit code, stdout, stderr)."""
    try:
        main(argv)
        code = 0
    except SystemExit as done:
        code = done.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_table_and_csv(tmp_path, capsys):
    path = tmp_path / "demo.csv"
    code, out, _ = run([*FAST, "--sparsity", "0.9", "--sparsity", "0.75", "--csv", str(path)], capsys)
    assert code == 0
    assert "router" in out and "random" in out and "CPU" in out
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == COLUMNS
    assert [(row["sparsity"], row["selection"]) for row in rows] == [
        ("0.9", "router"), ("0.9", "random"), ("0.75", "router"), ("0.75", "random"),
    ]
    assert [int(row["k_sel"]) for row in rows] == [2, 2, 6, 6]  # 24 key blocks
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.csv"]  # no temporary file left behind
    for router, chance in zip(rows[::2], rows[1::2], strict=True):
        assert float(router["rel_l2_error"]) < 0.5 * float(chance["rel_l2_error"])
        assert float(router["mass_kept"]) > 3 * float(chance["mass_kept"])
        assert float(router["cosine"]) > float(chance["cosine"])
        assert float(router["dense_ms"]) > 0 and float(router["sla2_ms"]) > 0


@pytest.mark.parametrize(
    "extra, option",
    [
        (["--sparsity", "1.0"], "--sparsity"),
        (["--sparsity", "-0.1"], "--sparsity"),
        (["--head-dim", "96"], "--head-dim"),
        (["--tokens", "100"], "--tokens"),
        (["--heads", "0"], "--heads"),
        (["--repeats", "0"], "--repeats"),
    ],
)
def test_user_mistakes_exit_2_with_one_line(extra, option, capsys):
    code, _, err = run([*FAST, *extra], capsys)
    assert code == 2
    assert option in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_csv_into_a_directory_is_a_user_mistake(tmp_path, capsys):
    code, _, err = run([*FAST, "--csv", str(tmp_path)], capsys)
    assert code == 2 and "--csv" in err


def test_help_explains_every_option(capsys):
    code, out, _ = run(["demo", "--help"], capsys)
    assert code == 0
    for option in ("--tokens", "--heads", "--head-dim", "--sparsity", "--seed", "--repeats", "--csv"):
        assert option in out


def test_grid_is_raster_order_over_frames():
    positions = grid_positions(2100)
    assert positions.shape == (2100, 3)
    assert positions[0].tolist() == [0, 0, 0] and positions[33].tolist() == [0, 1, 1]
    assert positions[1024].tolist() == [1, 0, 0] and positions[-1].tolist() == [2, 1, 19]


def test_pattern_is_local_in_space_and_time():
    """Tokens attend far more to near neighbours than to far-away tokens, like a video DiT."""
    q, k, _ = video_like_qkv(2048, 1, 64, seed=0)
    probs = torch.softmax(q @ k.transpose(-1, -2) / 8, dim=-1)[0, 0]
    positions = grid_positions(2048)
    distance = (positions[:, None] - positions[None]).abs().amax(-1)
    near = (probs * (distance <= 2)).sum(-1).mean()
    assert near > 0.5  # 5 x 5 x 3 tokens out of 2048 hold most of the probability
