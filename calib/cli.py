"""`python -m calib`: accuracy reports for quantized bundles, and the shipped recipes as editable JSON.

    python -m calib report --bundle bundles/sana-int8 [--float bundles/sana-int8-fp32]
    python -m calib recipe --backbone sana --precision int8 > my-recipe.json   # then build --recipe my-recipe.json
"""

from __future__ import annotations

import argparse
import json

from metacanvas_deploy.calib.errors import CalibError
from metacanvas_deploy.runtime.errors import MetaCanvasRuntimeError, run_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m calib", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("report", help="a quantized bundle's accuracy against its float bundle")
    p.add_argument("--bundle", required=True)
    p.add_argument("--float", dest="float_bundle", help="the fp32 bundle (default: the one the build recorded)")
    p.add_argument("--threads", type=int)
    r = sub.add_parser("recipe", help="print a backbone's default recipe as JSON")
    r.add_argument("--backbone", required=True, choices=["wan", "flux", "sana"])
    r.add_argument("--precision", required=True, choices=["int8", "fp8"])
    r.add_argument("--num-layers", type=int, help="the DiT's depth (Wan keeps its first and last blocks float)")
    r.add_argument("--target", default="onnxruntime", choices=["onnxruntime", "tensorrt"])
    args = parser.parse_args(argv)
    return run_cli(lambda: _run(args), (CalibError, MetaCanvasRuntimeError))


def _run(args) -> None:
    if args.command == "report":
        from metacanvas_deploy.calib.report import report

        print("\n".join(report(args.bundle, args.float_bundle, args.threads)))
    else:
        from metacanvas_deploy.calib.recipes import default_recipe

        recipe = default_recipe(args.backbone, args.precision, args.num_layers, args.target)
        print(json.dumps(recipe.to_json(), indent=2))

