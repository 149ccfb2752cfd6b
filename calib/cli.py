"""`python -m calib`: accuracy reports for quantized bundles.

    python -m calib report --bundle bundles/sana-int8 [--float bundles/sana-int8-fp32]

A backbone's default recipe is model knowledge, which calibration does not have: the compiler prints it
(`python -m mc_export recipe --backbone sana --precision int8`).
"""

from __future__ import annotations

import argparse

from metacanvas_deploy.calib.errors import AccuracyBudgetError, CalibError
from metacanvas_deploy.runtime.errors import MetaCanvasRuntimeError, run_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m calib", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("report", help="a quantized bundle's accuracy against its float bundle")
    p.add_argument("--bundle", required=True)
    p.add_argument("--float", dest="float_bundle", help="the fp32 bundle (default: the one the build recorded)")
    p.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    return run_cli(lambda: _run(args), (CalibError, MetaCanvasRuntimeError))


def _run(args) -> None:
    from metacanvas_deploy.calib.report import report

    result = report(args.bundle, args.float_bundle, args.threads)
    print("\n".join(result.lines))
    if not result.passed:  # a report that states a missed budget fails
        raise AccuracyBudgetError(f"{args.bundle} misses its accuracy budget: {'; '.join(result.misses)}")

