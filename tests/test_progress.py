"""Progress of long phases (`mc_export.progress`): the line a non-terminal log gets, with the time left, exactly;
and the lazy export reports its weights through it."""

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
