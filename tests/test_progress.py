"""Progress of long phases (`mc_export.progress`): the line a non-terminal log gets, with the time left, exactly;
and the lazy export reports its weights through it. What else reaches the user of a long build: ONNX Runtime's
own notes do not."""

from __future__ import annotations

from metacanvas_deploy.mc_export import progress as progress_mod


def test_progress_lines_state_share_amount_elapsed_and_time_left(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(progress_mod.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(progress_mod.sys.stderr, "isatty", lambda: False)
    lines: list[str] = []
    p = progress_mod.Progress("planner: weights", 4_000_000_000, lines.append, interval_s=30)
    now[0] = 10.0
    p.update(1_000_000_000)
    assert lines == []  # within the interval: quiet
    now[0] = 40.0
    p.update(1_000_000_000)
    assert lines == ["planner: weights: 50% (2.0 of 4.0 GB), 40 s in, about 40 s left"]
    now[0] = 160.0
    p.update(1_000_000_000)
    assert lines[-1] == "planner: weights: 75% (3.0 of 4.0 GB), 2 min 40 s in, about 53 s left"
    p.update(1_000_000_000)  # done: no line (the caller says what finished)
    assert len(lines) == 2


def test_a_lazy_export_reports_its_weights(tmp_path, monkeypatch):
    from metacanvas_deploy.mc_export.build import resolve_ranges
    from metacanvas_deploy.mc_export.export.onnx_export import export_component
    from metacanvas_deploy.mc_export.models.metacanvas import MetaCanvas
    from metacanvas_deploy.mc_export.stages import plan_stages

    MetaCanvas.from_preset("sana", "tiny", seed=0).save_pretrained(tmp_path / "ckpt")
    model = MetaCanvas.from_pretrained(tmp_path / "ckpt", lazy=True)
    comp = plan_stages(model, resolve_ranges(model, ()))["denoise"]
    monkeypatch.setattr(progress_mod.sys.stderr, "isatty", lambda: False)
    monkeypatch.setattr(progress_mod.Progress.__init__, "__defaults__", (print, 0.0, True))  # every update
    lines: list[str] = []
    export_component(comp, tmp_path / "denoise.onnx", weights=model.lazy_weights, log=lines.append)
    assert lines and all(line.startswith("denoise: weights: ") and "left" in line for line in lines)


_CASTLIKE = '''
import sys
from pathlib import Path
import numpy as np, onnxruntime as ort
from onnx import TensorProto, helper as h, numpy_helper as nh
from metacanvas_deploy.calib.graph import optimize_for_ort
from metacanvas_deploy.runtime.ort_engine import session_options
# CastLike to bf16 on constants: ONNX Runtime's constant folding has no CPU kernel for it and warns
g = h.make_graph([h.make_node("CastLike", ["a", "like"], ["c"]), h.make_node("Cast", ["c"], ["c32"], to=1),
                  h.make_node("Add", ["x", "c32"], ["y"])], "g", [h.make_tensor_value_info("x", 1, [2])],
                 [h.make_tensor_value_info("y", 1, [2])],
                 [nh.from_array(np.ones(2, np.float32), "a"), h.make_tensor("like", TensorProto.BFLOAT16, [1], [1.0])])
model = h.make_model(g, opset_imports=[h.make_opsetid("", 21)]).SerializeToString()
so = ort.SessionOptions() if sys.argv[1] == "default" else session_options()
print(ort.InferenceSession(model, so, providers=["CPUExecutionProvider"]).run(None, {"x": np.zeros(2, np.float32)}))
if sys.argv[1] == "ours":
    Path(sys.argv[2]).write_bytes(model)
    optimize_for_ort(Path(sys.argv[2]), Path(sys.argv[2] + ".opt"))
'''


def test_onnx_runtime_optimiser_notes_do_not_reach_the_user(tmp_path):
    """ONNX Runtime's session-creation warnings (here "can't constant fold CastLike", as a full-size weight-only
    planner build printed them) stay out of the build's and the runtime's output; the same session with ONNX
    Runtime's default options prints it (the oracle that the graph provokes it), and the result is the same."""
    import subprocess
    import sys

    run = [sys.executable, "-c", _CASTLIKE]
    default = subprocess.run([*run, "default"], capture_output=True, text=True, check=True)
    ours = subprocess.run([*run, "ours", str(tmp_path / "m.onnx")], capture_output=True, text=True, check=True)
    assert "constant fold CastLike" in default.stderr
    assert ours.stderr == "" and ours.stdout == default.stdout == "[array([1., 1.], dtype=float32)]\n"
