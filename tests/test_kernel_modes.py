"""sla2_kernels.modes: one table of quant mode names and kernel codes, shared by ops and kernels."""

from __future__ import annotations

import subprocess
import sys

import pytest

import sla2cli.ops.quantization as quantization
from sla2_kernels import backward, forward, modes
from sla2cli.ops.geometry import SUPPORTED_HEAD_DIMS


def test_ops_use_the_kernels_mode_names():
    assert quantization.QUANT_MODES is modes.QUANT_MODES
    for name in ("QUANT_NONE", "QUANT_INT8", "QUANT_INT8_FP8"):
        assert getattr(quantization, name) is getattr(modes, name)


def test_every_mode_has_its_own_code():
    codes = [modes.kernel_code(mode) for mode in modes.QUANT_MODES]
    assert len(set(codes)) == len(modes.QUANT_MODES)
    assert (forward.CODE_OFF, forward.CODE_INT8, forward.CODE_INT8_FP8) == tuple(codes)


@pytest.mark.parametrize("mode", [quantization.QUANT_AUTO, "fp4", None])
def test_only_concrete_modes_have_a_code(mode):
    with pytest.raises(ValueError, match="concrete modes: none, int8, int8-fp8"):
        modes.kernel_code(mode)


def test_launch_settings_cover_every_head_dim_and_mode():
    expected = {(head_dim, modes.kernel_code(mode)) for head_dim in SUPPORTED_HEAD_DIMS for mode in modes.QUANT_MODES}
    assert set(forward.FORWARD_LAUNCH) == expected
    assert set(backward.QUERY_LAUNCH) == set(backward.KEY_LAUNCH) == set(SUPPORTED_HEAD_DIMS)


def test_mode_names_load_without_triton():
    """sla2cli reads the mode table at import; Triton (optional off Linux) loads only with a kernel."""
    code = (
        "import sys; import sla2cli.ops, sla2_kernels.modes; "
        "sys.exit('triton' in sys.modules or 'sla2_kernels.forward' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
