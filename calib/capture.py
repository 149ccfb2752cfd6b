"""Calibration data: the quantized stage's real inputs, captured from the float bundle's own pipeline.

A diffusion model's activations drift across timesteps, so the denoise step is captured at every step of
every calibration request, with both CFG rows (the step graph takes them as one batch of 2). Requests cycle
through the bundle's tasks; tasks with image/video inputs get seeded synthetic media at the bundle's default
size (`runtime.media.synthetic_media`: there is no image set to ship).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from metacanvas_deploy.calib.prompts import load_prompts
from metacanvas_deploy.runtime.media import synthetic_media

EDIT_TASKS = ("edit", "v2v")  # tasks whose prompt is an edit instruction


@dataclass(frozen=True)
class CalibRequest:
    task: str
    prompt: str
    seed: int


def requests(tasks: tuple[str, ...], n_prompts: int, seeds: tuple[int, ...], split: str) -> list[CalibRequest]:
    """``n_prompts`` requests per seed, cycling through ``tasks``; prompt i of the split's kind for its task."""
    out = []
    for seed in seeds:
        for i in range(n_prompts):
            task = tasks[i % len(tasks)]
            prompts = load_prompts("edit" if task in EDIT_TASKS else "generation", split)
            out.append(CalibRequest(task, prompts[i % len(prompts)], seed))
    return out


class FeedStore(Sequence):
    """Captured calls on disk, one call in memory at a time: ``store[i]`` loads call i's feeds (.npy, no
    pickle). An array handed to several calls of one request (prompt embeddings, canvas) is written once. At
    full size a Wan call's feeds are about 130 MB plus a 670 MB canvas per request: the default 64 calls would
    otherwise hold about 14 GB."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._calls: list[dict[str, str]] = []  # input name -> file
        self._last: dict[int, tuple[object, str]] = {}  # the previous call's arrays (kept alive: ids stay unique)
        self._files = 0

    def append(self, feeds: dict) -> None:
        call, seen = {}, {}
        for name, value in feeds.items():
            hit = self._last.get(id(value)) or seen.get(id(value))
            if hit is None:
                file = f"{self._files:06d}.npy"
                self._files += 1
                np.save(self.directory / file, np.asarray(value), allow_pickle=False)
                hit = (value, file)
            seen[id(value)] = hit
            call[name] = hit[1]
        self._calls.append(call)
        self._last = seen

    def end_request(self) -> None:
        self._last = {}

    def index(self) -> list[dict[str, str]]:
        """Each call's input name -> file: with the folder, all `reopen` needs (a resumed calibration's feeds)."""
        return [dict(call) for call in self._calls]

    @classmethod
    def reopen(cls, directory: Path, index: list[dict[str, str]]) -> FeedStore:
        """The store whose `index` was ``index``, on the files it wrote under ``directory``."""
        store = cls(directory)
        store._calls = [dict(call) for call in index]
        store._files = len({f for call in index for f in call.values()})
        return store

    def __len__(self) -> int:
        return len(self._calls)

    def __getitem__(self, index):
        if isinstance(index, slice):
            view = copy.copy(self)
            view._calls = self._calls[index]
            return view
        return {name: np.load(self.directory / file, allow_pickle=False)
                for name, file in self._calls[index].items()}


def run(pipe, req: CalibRequest, steps: int, stage: str | None = None, sink=None, engines=None):
    """One request through ``pipe`` at the bundle's default size; with ``stage``/``sink``, the feeds of every call
    of that engine are appended to ``sink`` (through `Pipeline.observe`: run no other request on ``pipe``
    meanwhile, or its calls are captured too). ``engines``: stage -> engine substituted for this request
    (`Pipeline.__call__`). Returns the generation output."""
    d = pipe.manifest.defaults
    media = synthetic_media(req.task, d["height"], d["width"], d["num_frames"], req.seed)

    def generate():
        return pipe(req.prompt, task=req.task, num_inference_steps=steps, seed=req.seed, engines=engines, **media)

    if not stage or stage not in pipe.engines:
        return generate()
    with pipe.observe(stage, lambda feeds, outputs: sink.append(dict(feeds))):
        return generate()


def capture(pipe, stage: str, reqs: list[CalibRequest], steps: int,
            directory: Path | None = None, log=None) -> Sequence[dict[str, np.ndarray]]:
    """Every call's inputs of ``stage`` over the requests, in order (deterministic: seeded noise and media);
    in memory, or in a `FeedStore` under ``directory``. ``log``: progress with the time left, per request."""
    from metacanvas_deploy.calib.progress import Progress

    sink = [] if directory is None else FeedStore(directory)
    progress = Progress(f"{stage}: capture (requests)", len(reqs), log, unit_bytes=False)
    for req in reqs:
        run(pipe, req, steps, stage, sink)
        if directory is not None:
            sink.end_request()
        progress.update(1)
    progress.close()
    return sink


def check_calibration_set(recipe, tasks: tuple[str, ...]) -> None:
    """CalibrationDataError, before any work, when the recipe's calibration set cannot be what it asks for: fewer
    calibration prompts than the bundle has tasks (requests cycle through the tasks: a task never captured would
    run on ranges it never produced), more prompts than the shipped split holds for a task's kind (prompts would
    repeat)."""
    from metacanvas_deploy.calib.errors import CalibrationDataError

    n = recipe.calibration_prompts
    if n < len(tasks):
        raise CalibrationDataError(f"recipe {recipe.name}: {n} calibration prompts for {len(tasks)} tasks "
                                   f"({', '.join(tasks)}): every task needs at least one; set calibration_prompts "
                                   f">= {len(tasks)}")
    for kind in sorted({"edit" if t in EDIT_TASKS else "generation" for t in tasks}):
        have = len(load_prompts(kind, "calibration"))
        share = sum(1 for i in range(n) if (tasks[i % len(tasks)] in EDIT_TASKS) == (kind == "edit"))
        if share > have:
            raise CalibrationDataError(f"recipe {recipe.name}: {share} {kind} calibration prompts asked, the shipped "
                                       f"calibration split has {have}; lower calibration_prompts")
