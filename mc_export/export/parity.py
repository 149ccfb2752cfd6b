"""The numbers every parity gate reports and the rule it applies: one row per output (max-abs, max-abs relative
to the reference's scale, cosine) and a miss raised as one table. Numpy only: the build's gates
(`onnx_export.parity_gate`, against PyTorch) and the TensorRT target build's gates (against the references a
TensorRT export stores, on a GPU machine without torch) share it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from metacanvas_deploy.mc_export.components.spec_data import Tolerance
from metacanvas_deploy.mc_export.errors import StageParityError


@dataclass(frozen=True)
class ParityRow:
    stage: str
    case: str
    output: str
    max_abs: float
    max_rel: float
    cosine: float

    def fmt(self) -> str:
        return (f"{self.stage:<14} {self.case:<10} {self.output:<22} {self.max_abs:>10.3e} {self.max_rel:>10.3e} "
                f"{self.cosine:>10.7f}")


TABLE_HEADER = f"{'stage':<14} {'case':<10} {'output':<22} {'max_abs':>10} {'max_rel':>10} {'cosine':>10}"


def compare(stage: str, case: str, name: str, ours: np.ndarray, ref: np.ndarray) -> ParityRow:
    """Max-abs, max-abs relative to max(1, max|ref|), and cosine of two outputs."""
    a, b = np.asarray(ours, np.float64).ravel(), np.asarray(ref, np.float64).ravel()
    if a.shape != b.shape:
        raise StageParityError(stage, f"{name}: shape {np.shape(ours)} != reference {np.shape(ref)}")
    diff = float(np.max(np.abs(a - b))) if a.size else 0.0
    finite = bool(np.isfinite(a).all())
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    cos = float(a @ b / denom) if denom > 0 else float(np.array_equal(a, b))
    rel = diff / max(1.0, float(np.max(np.abs(b))) if b.size else 1.0)
    return ParityRow(stage, case, name, diff if finite else float("inf"), rel if finite else float("inf"), cos)


def check_rows(stage: str, rows: list[ParityRow], tol: Tolerance) -> list[ParityRow]:
    """``rows`` if every one reaches ``tol``; else StageParityError naming the stage, with the whole table."""
    bad = [r for r in rows if not (r.max_rel <= tol.max_rel and r.cosine >= tol.min_cosine)]
    if bad:
        table = "\n".join([TABLE_HEADER] + [r.fmt() for r in rows])
        raise StageParityError(stage, f"the engine misses the tolerance (max_rel <= {tol.max_rel}, "
                                      f"cosine >= {tol.min_cosine}):\n{table}")
    return rows
