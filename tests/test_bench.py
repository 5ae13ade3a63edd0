"""`sla2 bench`: option checking, the timing method, correctness gates, outputs, and the CLI end to end."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

import sla2cli
from sla2cli.bench.cases import FORWARD, FORWARD_BACKWARD, AttentionShape, parse_shape
from sla2cli.bench.checks import KernelMismatch, dense_attention_float32
from sla2cli.bench.environment import describe, git_commit
from sla2cli.bench.flops import selected_blocks, shape_flops, sparse_share
from sla2cli.bench.inputs import make_inputs
from sla2cli.bench.kernel_mode import KernelBenchPlan, fill_speedups, measure, run_kernel_bench
from sla2cli.bench.output import header_lines, print_report, rows_frame, write_csv, write_json
from sla2cli.bench.plot import speedup_figure, write_plot
from sla2cli.bench.providers import get_provider, provider_names, select_providers
from sla2cli.bench.providers.dense import DenseProvider
from sla2cli.bench.providers.sparse import Sla2, Sla2Routing, block_mask_from_lut
from sla2cli.bench.records import FAILED, OK, REQUIRED_COLUMNS, SKIPPED, Measurement
from sla2cli.bench.timing import CacheFlusher, TimingPlan, repeats_within_budget, time_call
from sla2cli.cli import main
from sla2cli.errors import UserError
from sla2cli.ops import route, sla2_attention

CPU = torch.device("cpu")
SMALL = AttentionShape(1, 2, 512, 64)
QUICK = TimingPlan(warmup=1, repeats=3, budget_s=1.0)


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch):
    """rich wraps at the console width (80 without a terminal); messages are checked as single lines."""
    monkeypatch.setenv("COLUMNS", "300")


@pytest.fixture(autouse=True)
def _one_thread():
    """Many tiny ops: one intra-op thread keeps them fast on a busy machine (restored afterwards)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _plan(providers, shape=SMALL, modes=(FORWARD,), sparsities=(0.9,)) -> KernelBenchPlan:
    return KernelBenchPlan(
        shapes=[shape], sparsities=list(sparsities), modes=list(modes), providers=list(providers),
        dtype=torch.float32, device=CPU, timing=QUICK,
    )


def _measure(provider, mode=FORWARD, sparsity=0.9, shape=SMALL) -> Measurement:
    plan = _plan([provider], shape=shape, modes=(mode,))
    inputs = make_inputs(shape, mode, torch.float32, CPU, seed=0)
    level = None if provider.kind == "dense" else sparsity
    return measure(provider, inputs, level, mode, plan, CacheFlusher(CPU), describe(CPU))


# ----- options ---------------------------------------------------------------------------------------


def test_parse_shape_reads_four_integers():
    assert parse_shape("1,12,32760,128") == AttentionShape(1, 12, 32760, 128)
    assert parse_shape(" 2, 4, 100, 64 ").label == "2x4x100x64"


@pytest.mark.parametrize(
    "text", ["1,2,512", "1,2,512,64,1", "a,2,512,64", "1,2,-5,64", "1,0,512,64", "1,2,512,96", ""]
)
def test_parse_shape_rejects_malformed(text):
    with pytest.raises(ValueError, match="--shape"):
        parse_shape(text)


def test_unknown_provider_is_a_user_error():
    with pytest.raises(UserError, match="unknown"):
        get_provider("flash4")
    expected = {"sla2", "sla2-lowbit", "sla2-routing", "fa2", "flash-attn", "cudnn", "flex", "sage", "sdpa"}
    assert expected <= set(provider_names())


@pytest.mark.parametrize("name, module", [("sage", "sageattention"), ("flash-attn", "flash_attn")])
def test_naming_a_provider_that_is_not_installed_is_a_user_error(name, module):
    if _installed(module):
        pytest.skip(f"{module} is installed here")
    with pytest.raises(UserError, match="not installed"):
        select_providers([name])
    assert name in [p.name for p in select_providers(None)]  # the default run keeps it, as a skipped row


# ----- flops and timing ------------------------------------------------------------------------------


def test_flop_counts_follow_the_formulas():
    shape = AttentionShape(1, 12, 32760, 128)
    assert shape_flops(shape, FORWARD) == 4 * 12 * 32760**2 * 128
    assert shape_flops(shape, FORWARD_BACKWARD) == pytest.approx(3.5 * 4 * 12 * 32760**2 * 128)
    assert selected_blocks(shape, 0.97) == (15, 512)
    assert sparse_share(shape, 0.97) == pytest.approx(15 / 512)
    assert sparse_share(shape, None) == 1.0


def test_repeats_shrink_for_slow_calls_but_not_below_the_minimum():
    plan = TimingPlan(warmup=1, repeats=50, budget_s=1.0)
    assert repeats_within_budget(plan, 1.0) == 50
    assert repeats_within_budget(plan, 100.0) == 10
    assert repeats_within_budget(plan, 10_000.0) == 5
    assert repeats_within_budget(TimingPlan(repeats=2), 10_000.0) == 2


def test_cpu_timing_is_the_median_wall_time():
    calls = []

    def sleepy() -> None:
        calls.append(1)
        time.sleep(0.004)

    timing = time_call(sleepy, CPU, TimingPlan(warmup=2, repeats=5, budget_s=10.0), CacheFlusher(CPU))
    assert timing.repeats == 5 and len(calls) == 7
    assert 4.0 <= timing.median_ms < 50.0
    assert timing.min_ms <= timing.median_ms


# ----- correctness gates -----------------------------------------------------------------------------


class _WrongScale(DenseProvider):
    """Dense attention with the softmax scale forgotten: a plausible kernel bug."""

    name = "wrong-scale"
    summary = "test provider"

    def attention(self, q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v


class _ExactForward(torch.autograd.Function):
    """Identity forward with a doubled gradient: right output, wrong backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return 2 * grad


class _WrongBackward(DenseProvider):
    name = "wrong-backward"
    summary = "test provider"

    def attention(self, q, k, v):
        return dense_attention_float32(_ExactForward.apply(q), k, v).to(q.dtype)


class _WrongBlocks(Sla2):
    """SLA2 that routes at a different sparsity than it claims."""

    name = "wrong-blocks"

    def build(self, inputs, sparsity):
        return lambda: sla2_attention(inputs.q, inputs.k, inputs.v, sparsity=0.5, alpha=inputs.alpha)


class _Crashes(DenseProvider):
    name = "crashes"
    summary = "test provider"

    def attention(self, q, k, v):
        raise RuntimeError("kernel launch failed\n  on this device")


def test_a_crashing_provider_gets_an_error_row():
    row = _measure(_Crashes())
    assert row.status == FAILED and row.median_ms is None
    assert row.note == "RuntimeError: kernel launch failed on this device"


def test_a_wrong_dense_kernel_stops_the_bench():
    with pytest.raises(KernelMismatch, match="wrong-scale: output"):
        _measure(_WrongScale())


def test_a_wrong_backward_is_caught_in_fwd_bwd_only():
    assert _measure(_WrongBackward(), mode=FORWARD).status == OK
    with pytest.raises(KernelMismatch, match="dq"):
        _measure(_WrongBackward(), mode=FORWARD_BACKWARD)


def test_sla2_with_other_blocks_than_the_router_picks_is_caught():
    shape = AttentionShape(1, 2, 1024, 64)  # 16 key blocks: 0.9 keeps 1, 0.5 keeps 8
    with pytest.raises(KernelMismatch, match="wrong-blocks: output"):
        _measure(_WrongBlocks(), shape=shape)


@pytest.mark.parametrize("mode", [FORWARD, FORWARD_BACKWARD])
def test_sla2_passes_its_gate_and_is_timed(mode):
    row = _measure(get_provider("sla2"), mode=mode, shape=AttentionShape(1, 2, 1000, 64))
    assert row.status == OK and row.median_ms > 0 and row.repeats == 3
    assert row.k_sel == 1 and row.note.startswith("SLA2 op")
    assert row.sparse_tflops == pytest.approx(row.dense_tflops * 1 / 16)


@pytest.mark.parametrize("mode", [FORWARD, FORWARD_BACKWARD])
def test_lowbit_sla2_passes_its_gate_and_measures_its_error_against_sla2(mode):
    from sla2cli.ops import sla2_reference
    from sla2cli.ops.quantization import sla2_lowbit_reference

    shape = AttentionShape(1, 2, 1000, 64)
    row = _measure(get_provider("sla2-lowbit"), mode=mode, sparsity=0.5, shape=shape)
    assert row.status == OK and row.median_ms > 0, row.note
    assert row.quant == "int8" and row.note.endswith("ran int8")

    inputs = make_inputs(shape, mode, torch.float32, CPU, seed=0)
    q, k, v, alpha = (t.detach() for t in inputs.leaves)
    lut = route(q, k, sparsity=0.5).lut
    lowbit = sla2_lowbit_reference(q, k, v, lut, mode="int8", alpha=alpha)
    exact = sla2_reference(q, k, v, sparsity=0.5, alpha=alpha)
    expected = float((lowbit - exact).norm() / exact.norm())
    assert 0 < row.extra["rel_l2_vs_sla2"] == pytest.approx(expected, rel=1e-3)
    assert _measure(get_provider("sla2"), sparsity=0.5, shape=shape).extra["rel_l2_vs_sla2"] is None


def test_lowbit_sla2_that_ignores_the_mode_is_caught(monkeypatch):
    import sla2cli.bench.providers.sparse as sparse

    def unquantised(q, k, v, *, quant=None, **kw):
        return sla2_attention(q, k, v, **kw)

    monkeypatch.setattr(sparse, "sla2_attention", unquantised)
    with pytest.raises(KernelMismatch, match="sla2-lowbit: output"):
        _measure(get_provider("sla2-lowbit"), sparsity=0.5, shape=AttentionShape(1, 2, 1000, 64))


def test_lowbit_sla2_is_skipped_where_auto_means_none(monkeypatch):
    import sla2cli.bench.providers.sparse as sparse

    monkeypatch.setattr(sparse, "resolve_quant_mode", lambda mode, device: "none")
    row = _measure(get_provider("sla2-lowbit"))
    assert row.status == SKIPPED and "no low-bit mode" in row.note and row.median_ms is None


def test_routing_gate_rejects_blocks_outside_the_top_k():
    provider = Sla2Routing()
    inputs = make_inputs(AttentionShape(1, 2, 1024, 64), FORWARD, torch.float32, CPU, seed=0)
    lut = route(inputs.q, inputs.k, sparsity=0.9).lut
    provider.verify(inputs, 0.9, lambda: lut)
    worst = route(inputs.q, -inputs.k, sparsity=0.9).lut  # the lowest-scoring blocks instead
    with pytest.raises(KernelMismatch, match="top 1"):
        provider.verify(inputs, 0.9, lambda: worst)


def test_routing_has_no_backward_row():
    row = _measure(Sla2Routing(), mode=FORWARD_BACKWARD)
    assert row.status == SKIPPED and "no backward" in row.note and row.median_ms is None


@pytest.mark.parametrize("name", ["fa2", "cudnn", "flex"])
def test_gpu_only_providers_are_skipped_on_cpu_with_a_reason(name):
    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    row = _measure(get_provider(name))
    assert row.status == SKIPPED and row.note == "needs a CUDA GPU"


def test_flex_block_mask_keeps_exactly_the_routed_blocks():
    pytest.importorskip("torch.nn.attention.flex_attention")
    length = 1000  # partial last blocks on both axes
    q, k = torch.randn(1, 2, length, 64), torch.randn(1, 2, length, 64)
    routing = route(q, k, sparsity=0.75)
    num_q_blocks, num_k_blocks = routing.scores.shape[-2:]
    mask = block_mask_from_lut(routing.lut, length, num_k_blocks)
    expected = torch.zeros(1, 2, num_q_blocks, num_k_blocks, dtype=torch.int32)
    expected.scatter_(-1, routing.lut.long(), 1)
    assert torch.equal(mask.to_dense().to(torch.int32), expected)
    assert mask.seq_lengths == (length, length)


def test_speedups_are_relative_to_fa2_at_the_same_shape_and_mode():
    rows = [
        Measurement("fa2", "s", None, FORWARD, median_ms=10.0),
        Measurement("sla2", "s", 0.9, FORWARD, median_ms=2.0),
        Measurement("sla2", "s", 0.9, FORWARD_BACKWARD, median_ms=2.0),
        Measurement("sla2", "t", 0.9, FORWARD, median_ms=2.0),
    ]
    fill_speedups(rows)
    assert [r.speedup_vs_fa2 for r in rows] == [1.0, 5.0, None, None]


# ----- outputs ---------------------------------------------------------------------------------------


def test_plot_draws_speedups_or_times(tmp_path):
    rows = [
        Measurement("fa2", "s", None, FORWARD, median_ms=10.0),
        Measurement("sla2", "s", 0.9, FORWARD, median_ms=2.0),
        Measurement("sla2", "s", 0.97, FORWARD, median_ms=1.0),
        Measurement("flex", "s", 0.9, FORWARD, status=SKIPPED, note="needs a CUDA GPU"),
    ]
    fill_speedups(rows)
    write_plot(rows, tmp_path / "speed.png", cpu_numbers=False)
    write_plot(rows[1:], tmp_path / "times.png", cpu_numbers=True)
    for name in ("speed.png", "times.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["speed.png", "times.png"]  # no temp files left


def test_kernel_bench_rows_cover_every_case():
    providers = [get_provider("sdpa"), get_provider("sla2")]
    plan = _plan(providers, modes=(FORWARD, FORWARD_BACKWARD), sparsities=(0.9, 0.95))
    seen = []
    rows = run_kernel_bench(plan, describe(CPU), seen.append)
    assert plan.size == len(rows) == len(seen) == 2 * (1 + 2)
    assert [(r.provider, r.sparsity, r.mode) for r in rows[:3]] == [
        ("sdpa", None, FORWARD), ("sla2", 0.9, FORWARD), ("sla2", 0.95, FORWARD)
    ]
    assert all(r.status == OK and r.environment["device"] == "cpu" for r in rows)


def _rounded(sparsity: float, key_blocks: int) -> tuple[int, float]:
    """(k_sel, effective sparsity) by the formula of the design: k_sel = max(1, floor((1 - s) * T_n))."""
    k_sel = max(1, math.floor((1 - sparsity) * key_blocks))
    return k_sel, 1 - k_sel / key_blocks


def test_rows_carry_k_sel_and_the_effective_sparsity():
    """At 1024 tokens (16 key blocks) 0.9 and 0.97 both keep one key block: the rows say so."""
    shape = AttentionShape(1, 2, 1024, 64)
    plan = _plan([get_provider("sdpa"), get_provider("sla2")], shape=shape, sparsities=(0.9, 0.97, 0.5))
    rows = run_kernel_bench(plan, describe(CPU), lambda step: None)
    dense = rows[0]
    assert (dense.sparsity, dense.k_sel, dense.key_blocks, dense.effective_sparsity) == (None, None, None, None)
    for row in rows[1:]:
        k_sel, effective = _rounded(row.sparsity, 16)
        assert (row.k_sel, row.key_blocks) == (k_sel, 16)
        assert row.effective_sparsity == pytest.approx(effective)
    assert rows[1].effective_sparsity == rows[2].effective_sparsity != pytest.approx(0.9)
    assert rows[3].effective_sparsity == pytest.approx(0.5)
    frame = rows_frame(rows)
    assert list(frame["k_sel"])[1:] == [r.k_sel for r in rows[1:]]
    assert frame["effective_sparsity"].tolist()[1:] == [r.effective_sparsity for r in rows[1:]]


def _rows_at(sparsities, shape="1x2x1024x64", key_blocks=16):
    rows = [Measurement("sdpa", shape, None, FORWARD, median_ms=10.0)]
    for sparsity in sparsities:
        k_sel, effective = _rounded(sparsity, key_blocks)
        rows.append(Measurement("sla2", shape, sparsity, FORWARD, median_ms=2.0 + sparsity, k_sel=k_sel,
                                key_blocks=key_blocks, effective_sparsity=effective))
    return rows


def _printed(rows) -> str:
    from rich.console import Console

    console = Console(record=True, width=250)
    print_report(console, rows, describe(CPU), "bench")
    return console.export_text()


def test_table_and_note_show_the_rounding_once_where_it_happens():
    text = _printed(_rows_at([0.9, 0.97]))
    header = next(line for line in text.splitlines() if "┃ provider" in line)
    assert "k_sel" in header and "eff. sparsity" in header
    assert text.count("note: sparsity is applied in whole key blocks") == 1
    note = next(line for line in text.splitlines() if line.startswith("note:"))
    assert "0.9 keeps 1 of 16 key blocks (effective_sparsity 0.938)" in note
    assert "0.97 keeps 1 of 16 key blocks (effective_sparsity 0.938)" in note
    exact = _printed(_rows_at([0.5, 0.75]))  # whole numbers of blocks: nothing to say
    assert "eff. sparsity" not in exact and "note:" not in exact


def test_written_files_get_the_usual_permissions(tmp_path):
    """Written under a private temporary name, published with the permissions any new file gets."""
    umask = os.umask(0)
    os.umask(umask)
    rows = _rows_at([0.9])
    write_csv(rows, tmp_path / "rows.csv")
    write_json(rows, tmp_path / "rows.json")
    for name in ("rows.csv", "rows.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.csv", "rows.json"]


def test_plot_puts_points_at_the_effective_sparsity_and_names_k_sel():
    import matplotlib.pyplot as plt

    rows = _rows_at([0.8, 0.9, 0.97])
    figure = speedup_figure(rows, cpu_numbers=True)
    try:
        axis = figure.axes[0]
        sla2_line = next(line for line in axis.get_lines() if line.get_label() == "sla2")
        expected = sorted(_rounded(s, 16)[1] for s in (0.8, 0.9, 0.97))
        assert list(sla2_line.get_xdata()) == pytest.approx(expected)
        labels = [tick.get_text() for tick in axis.get_xticklabels()]
        assert "0.938\nk_sel 1" in labels and "0.812\nk_sel 3" in labels
        assert "requested 0.9, 0.97 -> 0.938 (k_sel 1 of 16)" in axis.get_title()
        assert axis.get_xlabel().startswith("effective sparsity")
    finally:
        plt.close(figure)


# ----- where the numbers come from -------------------------------------------------------------------


def _git(folder, *args) -> str:
    done = subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *args], cwd=folder,
        capture_output=True, text=True, check=True, env={k: v for k, v in os.environ.items() if k != "GIT_DIR"},
    )
    return done.stdout.strip()


@pytest.fixture()
def other_repository(tmp_path):
    """A git repository that is not sla2, with one commit."""
    repo = tmp_path / "other"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "notes.txt").write_text("not sla2")
    _git(repo, "add", "notes.txt")
    _git(repo, "commit", "-q", "-m", "unrelated")
    return repo


def _own_commit() -> str | None:
    """sla2's commit when this package is a git checkout (as in development), found independently."""
    package = Path(sla2cli.__file__).resolve().parent
    done = subprocess.run(["git", "-C", str(package.parent), "ls-files", "--error-unmatch", "sla2cli/__init__.py"],
                          capture_output=True, text=True)
    return _git(package.parent, "rev-parse", "HEAD") if done.returncode == 0 else None


def test_rows_carry_sla2s_version_and_never_the_commit_of_the_current_folder(other_repository, monkeypatch):
    monkeypatch.delenv("SLA2_COMMIT", raising=False)
    monkeypatch.chdir(other_repository)
    foreign, own = _git(other_repository, "rev-parse", "HEAD"), _own_commit()
    environment = describe(CPU)
    assert environment.sla2_version == sla2cli.__version__
    assert environment.git_commit == own != foreign
    monkeypatch.setenv("GIT_DIR", str(other_repository / ".git"))  # git's variables do not mislead it either
    assert git_commit() == own
    row = _measure(get_provider("sdpa"))
    assert row.environment["sla2_version"] == sla2cli.__version__


@pytest.mark.parametrize("tracked", [False, True])
def test_an_installed_copy_inside_another_repository_has_no_commit(other_repository, monkeypatch, tracked):
    """A virtual environment inside some project's repository: the project's commit is not sla2's."""
    monkeypatch.delenv("SLA2_COMMIT", raising=False)
    package = other_repository / "venv" / "lib" / "site-packages" / "sla2cli"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('__version__ = "0.1.0"\n')
    if tracked:
        _git(other_repository, "add", "-f", "venv")
        _git(other_repository, "commit", "-q", "-m", "vendored")
    assert git_commit(package) is None
    top_level = other_repository / "sla2cli"  # even at the top, only a tracked package is a checkout
    top_level.mkdir()
    (top_level / "__init__.py").write_text("")
    assert git_commit(top_level) is None
    _git(other_repository, "add", "sla2cli/__init__.py")
    _git(other_repository, "commit", "-q", "-m", "sla2 itself")
    assert git_commit(top_level) == _git(other_repository, "rev-parse", "HEAD")
    monkeypatch.setenv("SLA2_COMMIT", "abc1234")  # a copied tree names its commit
    assert git_commit(package) == "abc1234"


def test_the_header_names_a_commit_only_when_there_is_one():
    environment = describe(CPU)
    without = dataclasses.replace(environment, git_commit=None)
    assert "commit" not in header_lines(without)[1] and f"sla2 {sla2cli.__version__}" in header_lines(without)[1]
    with_commit = dataclasses.replace(environment, git_commit="abc1234")
    assert "commit abc1234" in header_lines(with_commit)[1]


# ----- the command -----------------------------------------------------------------------------------


def _exit_code(argv: list[str]) -> int:
    try:
        main(argv)
    except SystemExit as done:
        return done.code
    return 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--shape", "1,2,512"], "--shape"),
        (["--shape", "1,2,x,64"], "--shape"),
        (["--sparsity", "1.0"], "--sparsity"),
        (["--sparsity", "-0.5"], "--sparsity"),
        (["--provider", "nope"], "--provider 'nope' is unknown"),
        (["--mode", "bwd"], "--mode"),
        (["--dtype", "int8"], "--dtype"),
        (["--train-step", "--frames", "9"], "--frames, --train-step belong to model mode"),
    ],
)
def test_bad_options_give_one_line_and_exit_code_2(argv, message, capsys):
    assert _exit_code(["bench", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("option, name", [("--csv", "rows.txt"), ("--json", "rows.csv"), ("--plot", "folder.png")])
def test_output_files_are_checked_before_any_timing(tmp_path, capsys, option, name):
    (tmp_path / "folder.png").mkdir()
    assert _exit_code(["bench", "--provider", "sla2", "--shape", "1,2,512,64", option, str(tmp_path / name)]) == 2
    err = capsys.readouterr().err.strip()
    assert option in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.png"]


def test_a_missing_provider_named_explicitly_exits_2(capsys):
    if _installed("sageattention"):
        pytest.skip("sageattention is installed here")
    assert _exit_code(["bench", "--provider", "sage", "--shape", "1,2,512,64"]) == 2
    assert "pip install sageattention" in capsys.readouterr().err


def test_a_wrong_kernel_fails_the_command(monkeypatch, capsys):
    import sla2cli.bench.providers.sparse as sparse

    monkeypatch.setattr(sparse, "sla2_attention", lambda q, k, v, **kw: v * 1.0)
    code = _exit_code(["bench", "--provider", "sla2", "--shape", "1,2,512,64", "--mode", "fwd"])
    assert code == 1
    captured = capsys.readouterr()
    assert "sla2: output differs" in captured.err and "median" not in captured.out


def test_a_peer_crash_is_reported_as_a_warning_after_writing(monkeypatch, tmp_path, capsys):
    from sla2cli.bench.providers.dense import DefaultSdpa

    monkeypatch.setattr(DefaultSdpa, "attention", _Crashes.attention)
    csv = tmp_path / "rows.csv"
    argv = ["bench", "--provider", "sdpa", "--provider", "sla2", "--shape", "1,2,512,64", "--mode", "fwd",
            "--sparsity", "0.9", "--csv", str(csv)]
    assert _exit_code(argv) == 0
    assert "warning: sdpa raised errors" in capsys.readouterr().err
    frame = pd.read_csv(csv).set_index("provider")
    assert frame.loc["sdpa", "status"] == FAILED and frame.loc["sla2", "status"] == OK


def test_a_crash_of_sla2_exits_1_after_writing(monkeypatch, tmp_path, capsys):
    import sla2cli.bench.providers.sparse as sparse

    def crash(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(sparse, "sla2_attention", crash)
    csv = tmp_path / "rows.csv"
    argv = ["bench", "--provider", "sla2", "--shape", "1,2,512,64", "--mode", "fwd", "--sparsity", "0.9",
            "--csv", str(csv)]
    assert _exit_code(argv) == 1
    assert "error: sla2 raised errors" in capsys.readouterr().err
    assert pd.read_csv(csv).set_index("provider").loc["sla2", "status"] == FAILED


def test_help_documents_every_option(capsys):
    assert _exit_code(["bench", "--help"]) == 0
    text = capsys.readouterr().out
    for option in ("--shape", "--sparsity", "--mode", "--provider", "--dtype", "--device", "--warmup",
                   "--repeats", "--time-budget", "--seed", "--csv", "--json", "--plot", "--model",
                   "--resolution", "--frames", "--random-weights", "--scaled-down", "--train-step"):
        assert option in text, option


def test_cpu_run_writes_csv_json_plot_in_under_a_minute(tmp_path):
    csv, js, png = tmp_path / "bench.csv", tmp_path / "bench.json", tmp_path / "bench.png"
    start = time.perf_counter()
    done = subprocess.run(
        ["sla2", "bench", "--shape", "1,2,512,64", "--csv", str(csv), "--json", str(js), "--plot", str(png)],
        capture_output=True, text=True, timeout=180,
        # One intra-op thread: on a busy 2-core machine, spinning OpenMP threads make every small op
        # wait for a descheduled sibling, which measures the machine's load, not the command.
        env={**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"},
    )
    elapsed = time.perf_counter() - start
    assert done.returncode == 0, done.stderr
    assert elapsed < 60, elapsed
    assert "NOT GPU numbers" in done.stdout

    frame = pd.read_csv(csv)
    assert tuple(frame.columns[: len(REQUIRED_COLUMNS)]) == REQUIRED_COLUMNS
    assert set(frame["device"]) == {"cpu"}
    timed = frame[frame["status"] == OK]
    assert set(timed["provider"]) == {"sdpa", "sla2", "sla2-lowbit", "sla2-routing"}
    assert set(timed.set_index("provider").loc[["sla2-lowbit"], "quant"]) == {"int8"}  # auto on a CPU
    assert set(timed.set_index("provider").loc[["sla2"], "quant"]) == {"none"}
    assert timed.set_index("provider").loc[["sdpa"], "quant"].isna().all()
    assert (timed.set_index("provider").loc[["sla2-lowbit"], "rel_l2_vs_sla2"] > 0).all()
    assert (timed["median_ms"] > 0).all()
    assert timed["speedup_vs_fa2"].isna().all()  # FA2 cannot run on a CPU
    sla2_rows = frame[frame["provider"] == "sla2"]
    for _, row in sla2_rows.iterrows():
        assert (row["k_sel"], row["key_blocks"]) == (_rounded(row["sparsity"], 8)[0], 8)  # 512 tokens
        assert row["effective_sparsity"] == pytest.approx(_rounded(row["sparsity"], 8)[1])
    assert sorted(zip(sla2_rows["sparsity"], sla2_rows["mode"], strict=True)) == sorted(
        (s, m) for s in (0.9, 0.95, 0.97) for m in (FORWARD, FORWARD_BACKWARD)
    )
    flops = 4 * 2 * 512**2 * 64
    sdpa_fwd = timed[(timed["provider"] == "sdpa") & (timed["mode"] == FORWARD)].iloc[0]
    assert sdpa_fwd["dense_tflops"] == pytest.approx(flops / (sdpa_fwd["median_ms"] * 1e-3) / 1e12, rel=1e-6)
    skipped = frame[frame["status"] == SKIPPED].set_index(["provider", "mode"])
    assert skipped.loc[("fa2", FORWARD), "note"] == "needs a CUDA GPU"
    assert "not installed" in skipped.loc[("sage", FORWARD), "note"] or _installed("sageattention")

    rows = json.loads(js.read_text())
    assert len(rows) == len(frame) and list(rows[0])[: len(REQUIRED_COLUMNS)] == list(REQUIRED_COLUMNS)
    assert rows[0]["speedup_vs_fa2"] is None and not any(
        isinstance(v, float) and math.isnan(v) for row in rows for v in row.values()
    )
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["bench.csv", "bench.json", "bench.png"])


# ----- GPU -------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_providers_pass_their_gates_on_a_small_shape():
    device = torch.device("cuda")
    plan = KernelBenchPlan(
        shapes=[AttentionShape(1, 4, 4096, 128)], sparsities=[0.9], modes=[FORWARD, FORWARD_BACKWARD],
        providers=select_providers(None), dtype=torch.bfloat16, device=device, timing=QUICK,
    )
    rows = run_kernel_bench(plan, describe(device))
    by_key = {(r.provider, r.mode): r for r in rows}
    for name in ("fa2", "sla2", "flex", "sla2-routing"):
        assert by_key[(name, FORWARD)].status == OK, by_key[(name, FORWARD)].note
    for mode in (FORWARD, FORWARD_BACKWARD):
        lowbit = by_key[("sla2-lowbit", mode)]
        assert lowbit.status == OK, lowbit.note
        assert lowbit.quant == "int8"  # what auto picks on every GPU that runs INT8
        assert 0 < lowbit.extra["rel_l2_vs_sla2"] < 0.1
    assert by_key[("sla2", FORWARD)].speedup_vs_fa2 is not None
    assert by_key[("sla2", FORWARD)].peak_mem_mb is not None


# ----- model mode ------------------------------------------------------------------------------------


def _model_plan(model: str, *, scaled_down: bool, train_step: bool, resolution: str, frames: int):
    from sla2cli.bench.model_mode import ModelBenchPlan

    return ModelBenchPlan(
        model=model, resolution=resolution, frames=frames, random_weights=True, scaled_down=scaled_down,
        train_step=train_step, sparsity=None, dtype=torch.float32, device=CPU,
        timing=TimingPlan(warmup=1, repeats=1),
    )


def test_model_mode_times_dense_and_sla2_with_the_same_weights():
    from sla2cli.bench.model_mode import run_model_bench

    plan = _model_plan("embedded", scaled_down=False, train_step=True, resolution="16x16", frames=2)
    rows = run_model_bench(plan, describe(CPU))
    assert [(r.provider, r.mode) for r in rows] == [
        ("sdpa", FORWARD), ("sla2", FORWARD), ("sdpa", FORWARD_BACKWARD), ("sla2", FORWARD_BACKWARD)
    ]
    assert all(r.status == OK and r.median_ms > 0 for r in rows)
    # 2 latent frames of 16 x 16 with 1 x 2 x 2 patches: 128 tokens; the embedded model has 4 heads of 64.
    assert {r.shape for r in rows} == {"1x4x128x64"}
    sla2_rows = [r for r in rows if r.provider == "sla2"]
    assert all(r.sparsity == 0.97 and r.k_sel == 1 for r in sla2_rows)
    # Same weights, different attention: the outputs differ, but not wildly.
    assert 0.0 < sla2_rows[0].extra["rel_error_vs_dense"] < 1.0
    assert sla2_rows[0].extra["speedup_vs_dense"] == pytest.approx(rows[0].median_ms / rows[1].median_ms)
    assert rows[0].extra["clip"] == "16x16x2"


def test_model_mode_builds_a_recipe_model_scaled_down():
    from sla2cli.bench.model_mode import run_model_bench
    from sla2cli.integration.conversion import sla2_processors

    plan = _model_plan("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", scaled_down=True, train_step=False,
                       resolution="128x128", frames=5)
    rows = run_model_bench(plan, describe(CPU))
    assert [r.provider for r in rows] == ["sdpa", "sla2"]
    assert {r.shape for r in rows} == {"1x2x128x64"}  # scaled-down Wan: 2 heads of 64
    assert "Wan2.1 T2V 1.3B" in rows[1].note and "scaled down" in rows[1].note
    from sla2cli.bench.model_setup import prepare_model

    bench = prepare_model(plan.request())
    assert len(sla2_processors(bench.model)) == 2  # both layers converted


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "no-such-model", "--random-weights"], "unknown recipe"),
        (["--model", "embedded", "--random-weights", "--shape", "1,2,512,64"], "kernel mode"),
        (["--model", "embedded", "--random-weights", "--resolution", "big"], "--resolution"),
        (["--model", "embedded", "--scaled-down"], "--random-weights"),
    ],
)
def test_model_mode_mistakes_exit_2(argv, message, capsys):
    assert _exit_code(["bench", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.gpu
def test_gpu_model_mode_pins_fa2_for_the_dense_run():
    from sla2cli.bench.model_mode import ModelBenchPlan, run_model_bench

    device = torch.device("cuda")
    plan = ModelBenchPlan(
        model="wan2.1-t2v-1.3b", resolution="256x256", frames=9, random_weights=True, scaled_down=True,
        train_step=True, sparsity=0.9, dtype=torch.bfloat16, device=device, timing=QUICK,
    )
    rows = run_model_bench(plan, describe(device))
    assert [r.provider for r in rows] == ["fa2", "sla2", "fa2", "sla2"]
    assert all(r.status == OK and r.peak_mem_mb is not None for r in rows)
    assert rows[1].speedup_vs_fa2 is not None and rows[1].shape == "1x2x768x64"
