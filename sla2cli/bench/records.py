"""One row per measurement, with the fixed column order that CSV and JSON consumers rely on."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

REQUIRED_COLUMNS = (
    "provider",
    "shape",
    "sparsity",
    "mode",
    "median_ms",
    "speedup_vs_fa2",
    "dense_tflops",
    "sparse_tflops",
    "peak_mem_mb",
)

OK = "ok"
SKIPPED = "skipped"
OUT_OF_MEMORY = "oom"
FAILED = "error"  # the provider raised: reported; an SLA2 provider makes the command exit 1 after writing


@dataclass
class Measurement:
    """A timed (or skipped) provider at one shape, sparsity and mode.

    sparsity is None for dense providers; speedup_vs_fa2 is None when FA2 was not measured; the
    TFLOP/s columns are None where they mean nothing (routing alone, skipped rows).
    """

    provider: str
    shape: str
    sparsity: float | None
    mode: str
    median_ms: float | None = None
    speedup_vs_fa2: float | None = None
    dense_tflops: float | None = None
    sparse_tflops: float | None = None
    peak_mem_mb: float | None = None
    status: str = OK
    note: str = ""
    min_ms: float | None = None
    repeats: int | None = None
    k_sel: int | None = None  # key blocks per query block in the exact branch
    key_blocks: int | None = None
    effective_sparsity: float | None = None  # the requested sparsity rounded to whole blocks: 1 - k_sel / key_blocks
    dtype: str = ""
    quant: str | None = None  # SLA2 rows: the concrete sparse-branch quantisation mode that ran
    extra: dict[str, object] = field(default_factory=dict)  # mode-specific columns (model mode)
    environment: dict[str, str] = field(default_factory=dict)

    def as_row(self) -> dict[str, object]:
        """Flat dict: required columns, then status, note, timing details, extras and environment."""
        row = asdict(self)
        extra, environment = row.pop("extra"), row.pop("environment")
        return {**row, **extra, **environment}


def column_order(rows: list[dict[str, object]]) -> list[str]:
    """Required columns, then every other column in first-seen order."""
    extra: dict[str, None] = {}
    for row in rows:
        for key in row:
            if key not in REQUIRED_COLUMNS:
                extra[key] = None
    return [*REQUIRED_COLUMNS, *extra]
