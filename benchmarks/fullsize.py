"""Full size on one small machine: build a checkpoint's bundle at a small request shape, then generate from it,
recording what each costs.

    python -m benchmarks.fullsize --checkpoint DIR --bundle OUT [--height 256 --width 256 --frames 9 --steps 4]
                                  [--prompt TEXT] [--skip-build] [--build-args "--precision w4 ..."]
                                  [--frames-out F.npy] [--reference F.npy] [--json OUT]

Per stage (from the manifest the build writes, `build.stages` and `build.parity`): export and gate seconds, peak
resident and private memory, bytes, the gate's verdict. For the whole build and the whole request (each in a fresh
process): wall time, peak resident memory (the kernel's ru_maxrss) and peak private memory (RssAnon, sampled every
20 ms: what mapped weights do not count against), plus disk: checkpoint, bundle, and the free space left. The
request runs in low-memory mode (one stage at a time, weights mapped) and reports each stage's engine time; a
bundle without a text-only task (FLUX.1-Kontext edits) is given a fixed colour-gradient image.
``--frames-out`` keeps the request's frames; ``--reference`` (another run's ``--frames-out``, e.g. the fp32 bundle's
at the same shape, prompt and seed) adds their PSNR: how far a quantized bundle lands from the float path.
With ``--build-args "--target tensorrt --export-only --precision bf16"`` OUT is a TensorRT export (engines are
built on the GPU machine): the same per-stage figures, from its index, and no request.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.env import fingerprint
from metacanvas_deploy.mc_export.tensorrt.export_folder import INDEX_NAME

# Runs in the child: a thread samples private memory while ``body`` runs, then prints one JSON line.
_CHILD = """
import json, sys, threading, time
from metacanvas_deploy.runtime.memory import private_mb
peak = [0.0]
stop = threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], private_mb() or 0.0)
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
result = {{}}
{body}
stop.set()
print("FULLSIZE " + json.dumps({{**result, "peak_private_mb": round(peak[0], 1)}}))
sys.exit(result.get("exit") or 0)  # a build that failed is the child's exit status
"""

_BUILD = """
from metacanvas_deploy.mc_export.cli import main
result["exit"] = main({argv!r})
"""

_GENERATE = """
import numpy as np
from metacanvas_deploy.runtime.pipeline import Pipeline
pipe = Pipeline.load({bundle!r}, low_memory=True)
# a bundle with no text-only task (FLUX.1-Kontext edits) gets a fixed test image: a colour gradient
image = None
if not {{"t2i", "t2v"}} & set(pipe.manifest.tasks):
    y, x = np.mgrid[0:{height}, 0:{width}]
    image = np.stack([x * 255 // max({width} - 1, 1), y * 255 // max({height} - 1, 1), (x + y) % 256], -1)
    image = image.astype(np.uint8)
out = pipe({prompt!r}, image=image, height={height}, width={width}, num_frames={frames}, num_inference_steps={steps},
           seed=0)
result.update(timings=out.timings, calls=out.calls, frames=list(out.frames.shape))
if {frames_out!r}:
    np.save({frames_out!r}, out.frames)
"""


def _run_child(body: str) -> dict:
    """``body`` in a fresh process: its JSON result, wall seconds and peak resident MiB (ru_maxrss). Its output is
    unbuffered, so a long phase's progress lines come as they are written."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-u", "-c", _CHILD.format(body=body)], stdout=subprocess.PIPE, text=True)
    out_lines = []
    for line in proc.stdout:
        out_lines.append(line)
        sys.stderr.write(line)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    result = next((json.loads(ln[len("FULLSIZE "):]) for ln in out_lines if ln.startswith("FULLSIZE ")), {})
    result.update(wall_s=round(wall, 1), peak_rss_mb=round(usage.ru_maxrss / 1024, 1),
                  exit_status=os.waitstatus_to_exitcode(status))
    return result


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) if Path(path).exists() else 0


def run(checkpoint: Path, bundle: Path, height: int, width: int, frames: int, steps: int, prompt: str,
        build: bool = True, build_args: tuple[str, ...] = (), frames_out: Path | None = None,
        reference: Path | None = None) -> dict:
    result = {"checkpoint": str(checkpoint), "bundle": str(bundle), "shape": [height, width, frames],
              "steps": steps, "environment": fingerprint(threads=os.cpu_count() or 1)}
    if build:
        argv = ["build", "--checkpoint", str(checkpoint), "--out", str(bundle), "--height", f"{height}:{height}",
                "--width", f"{width}:{width}", "--steps", str(steps), "--lazy-weights", "on"]
        if frames > 1:
            argv += ["--frames", f"{frames}:{frames}"]
        argv += list(build_args)
        result["build_args"] = list(build_args)
        result["build"] = _run_child(_BUILD.format(argv=argv))
        if result["build"]["exit_status"] != 0:
            return result
    export = (bundle / INDEX_NAME).exists()  # `--target tensorrt --export-only`: engines are built elsewhere
    manifest = json.loads((bundle / INDEX_NAME).read_text())["manifest"] if export else json.loads(
        (bundle / "manifest.json").read_text())
    result["stages"] = {s: {**r, "gate": manifest["build"]["parity"].get(s)}
                        for s, r in manifest["build"].get("stages", {}).items()}
    if "build" in result and result["stages"]:  # the build resets the kernel's high-water mark per stage, so its
        # ru_maxrss shows the last stage only: the peak is the largest stage's
        result["build"]["peak_rss_mb"] = max(result["build"]["peak_rss_mb"],
                                             *(r["peak_rss_mb"] for r in result["stages"].values()))
    result["disk"] = {"checkpoint_gb": round(_du(checkpoint) / 1e9, 2), "bundle_gb": round(_du(bundle) / 1e9, 2),
                      "free_gb": round(shutil.disk_usage(bundle).free / 1e9, 1)}
    if export:
        return result
    keep = str(frames_out or (reference and Path(bundle).with_name(Path(bundle).name + ".frames.npy")) or "")
    result["generate"] = _run_child(_GENERATE.format(bundle=str(bundle), prompt=prompt, height=height, width=width,
                                                     frames=frames, steps=steps, frames_out=keep))
    if reference is not None and result["generate"]["exit_status"] == 0:
        import numpy as np

        from metacanvas_deploy.calib.quantize import psnr

        result["generate"]["psnr_db_vs_reference"] = round(psnr(np.load(keep), np.load(reference)), 2)
        result["reference"] = str(reference)
    return result


def markdown(result: dict) -> str:
    rows = ["| stage | export s | gate s | gate | peak RSS GiB | bytes GB | engine s (request) |",
            "|---|---|---|---|---|---|---|"]
    timings = result.get("generate", {}).get("timings", {})
    for stage, r in result.get("stages", {}).items():
        rows.append(f"| {stage} | {r['export_s']:.0f} | {r['gate_s']:.0f} | {r['gate']} | "
                    f"{r['peak_rss_mb'] / 1024:.1f} | {r['bytes'] / 1e9:.2f} | {timings.get(stage, 0):.2f} |")
    lines = [f"{result['checkpoint']}: {result['shape']} x {result['steps']} steps", "", *rows, ""]
    for phase in ("build", "generate"):
        if phase in result:
            r = result[phase]
            lines.append(f"{phase}: {r['wall_s']:.0f} s, peak RSS {r['peak_rss_mb'] / 1024:.1f} GiB, peak private "
                         f"{r.get('peak_private_mb', 0) / 1024:.1f} GiB (exit {r['exit_status']})")
    if "psnr_db_vs_reference" in result.get("generate", {}):
        lines.append(f"frames vs {result['reference']}: {result['generate']['psnr_db_vs_reference']} dB PSNR")
    if "disk" in result:
        d = result["disk"]
        lines.append(f"disk: checkpoint {d['checkpoint_gb']} GB, bundle {d['bundle_gb']} GB, {d['free_gb']} GB free")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.fullsize", description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--bundle", type=Path, required=True, help="where the bundle is (or is built)")
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--frames", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--prompt", default="a red fox running through snow")
    ap.add_argument("--skip-build", action="store_true", help="measure an existing bundle's request only")
    ap.add_argument("--build-args", default="", help="more build arguments, one string (e.g. \"--precision w4\")")
    ap.add_argument("--frames-out", type=Path, help="save the request's frames (.npy)")
    ap.add_argument("--reference", type=Path, help="frames (.npy) of a reference run: reports the PSNR against them")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    result = run(args.checkpoint, args.bundle, args.height, args.width, args.frames, args.steps, args.prompt,
                 build=not args.skip_build, build_args=tuple(shlex.split(args.build_args)),
                 frames_out=args.frames_out, reference=args.reference)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result))
    return 0 if result.get("build", {}).get("exit_status", 0) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
