"""``fp8compile`` command line: plan, calibrate, export.

A model is named ``MODULE:FACTORY``: MODULE is a dotted import path or a ``.py`` file, FACTORY a
callable in it returning ``(model, args)`` or ``(model, args, kwargs)`` — the model and example
inputs its ``forward`` takes.  For example ``examples/quickstart.py:build``.

    fp8compile plan examples/quickstart.py:build --html plan.html
    fp8compile plan examples/quickstart.py:build --config policy.json --json plan.json
    fp8compile calibrate examples/quickstart.py:build --min-sqnr 25 --out policy.json
    fp8compile export examples/quickstart.py:build model.onnx --recipe rowwise
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["load_factory", "main"]


def _fail(msg: str) -> None:
    raise ValueError(msg)


def load_factory(spec: str) -> tuple[Any, tuple, dict]:
    """``MODULE:FACTORY`` → ``(model, args, kwargs)``."""
    if ":" not in spec:
        _fail(f"{spec!r} is not MODULE:FACTORY (e.g. examples/quickstart.py:build)")
    mod_name, _, fn_name = spec.rpartition(":")
    if mod_name.endswith(".py") or os.sep in mod_name:
        if not os.path.isfile(mod_name):
            _fail(f"no such file {mod_name!r}")
        sys.path.insert(0, os.path.dirname(os.path.abspath(mod_name)))
        s = importlib.util.spec_from_file_location(
            os.path.splitext(os.path.basename(mod_name))[0], mod_name
        )
        module = importlib.util.module_from_spec(s)
        s.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(mod_name)
        except ImportError as e:
            _fail(f"cannot import {mod_name!r}: {e}")
    factory = getattr(module, fn_name, None)
    if not callable(factory):
        _fail(f"{mod_name!r} has no callable {fn_name!r}")
    out = factory()
    if not isinstance(out, tuple) or len(out) not in (2, 3):
        _fail(f"{spec} must return (model, args) or (model, args, kwargs), got {type(out)}")
    model, args = out[0], out[1]
    kwargs = out[2] if len(out) == 3 else {}
    if not isinstance(args, (tuple, list)):
        args = (args,)
    return model, tuple(args), dict(kwargs)


def _config(ns: argparse.Namespace):
    from .config import Fp8Config

    cfg = Fp8Config.from_json(ns.config) if ns.config else Fp8Config()
    if getattr(ns, "recipe", None):
        cfg = Fp8Config.from_dict({**cfg.to_dict(), "recipe": ns.recipe})
    return cfg


def _positional_model(ns: argparse.Namespace, command: str):
    cfg = _config(ns)
    model, args, kwargs = load_factory(ns.model)
    if kwargs:
        _fail(f"{command} takes factories that return (model, args) only")
    return cfg, model, args


def _progress(msg: str) -> None:
    print(f"[fp8compile] {msg}", file=sys.stderr, flush=True)


def cmd_plan(ns: argparse.Namespace) -> int:
    import fp8compile

    cfg = _config(ns)
    model, args, kwargs = load_factory(ns.model)
    _progress("tracing the model and deciding precisions...")
    plan = fp8compile.plan(model, *args, config=cfg, **kwargs)
    print(plan.summary(gemms_only=ns.gemms_only))
    for path, write in ((ns.json, plan.to_json), (ns.html, plan.to_html), (ns.svg, plan.to_svg)):
        if path:
            write(path)
            _progress(f"wrote {path}")
    if ns.dot:
        with open(ns.dot, "w", encoding="utf-8") as f:
            f.write(plan.to_dot())
        _progress(f"wrote {ns.dot}")
    return 0


def cmd_calibrate(ns: argparse.Namespace) -> int:
    import fp8compile

    cfg, model, args = _positional_model(ns, "calibrate")
    batches = [args]
    if ns.batches_from:
        _, more, _ = load_factory(ns.batches_from)
        batches = list(more)
    cal = fp8compile.calibrate(model, batches, cfg, min_sqnr_db=ns.min_sqnr)
    print(cal.table())
    if ns.out:
        cal.config.to_json(ns.out)
        _progress(f"wrote policy {ns.out}")
    return 0


def cmd_export(ns: argparse.Namespace) -> int:
    import fp8compile

    cfg, model, args = _positional_model(ns, "export")
    _progress(f"exporting to {ns.out} (opset {ns.opset}, target {ns.target})...")
    report = fp8compile.export_onnx(model, args, ns.out, config=cfg, opset=ns.opset,
                                    target=ns.target)
    print(report)
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fp8compile", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(sp):
        sp.add_argument("model", help="MODULE:FACTORY returning (model, args[, kwargs])")
        sp.add_argument("--config", help="JSON policy (Fp8Config.to_json)")
        sp.add_argument("--recipe", choices=["blockwise", "rowwise", "tensorwise"])

    sp = sub.add_parser("plan", help="print the precision plan; write it as HTML/SVG/DOT/JSON")
    model_args(sp)
    sp.add_argument("--html", help="self-contained HTML picture of the plan")
    sp.add_argument("--svg", help="SVG picture of the plan")
    sp.add_argument("--dot", help="Graphviz DOT of the plan")
    sp.add_argument("--json", help="the plan as JSON")
    sp.add_argument("--gemms-only", action="store_true", help="table of GEMMs only")
    sp.set_defaults(run=cmd_plan)

    sp = sub.add_parser("calibrate", help="measure per-layer FP8 error; write a policy")
    model_args(sp)
    sp.add_argument("--batches-from", metavar="MODULE:FN",
                    help="callable returning (model, batches): calibration batches, each a "
                         "tuple of forward args (default: the factory's example args)")
    sp.add_argument("--min-sqnr", type=float, help="demote layers under this SQNR (dB)")
    sp.add_argument("--out", help="write the calibrated policy JSON here")
    sp.set_defaults(run=cmd_calibrate)

    sp = sub.add_parser("export", help="export FP8 QDQ ONNX")
    model_args(sp)
    sp.add_argument("out", help="output .onnx path")
    sp.add_argument("--opset", type=int, default=21)
    sp.add_argument("--target", choices=["ort", "tensorrt"], default="ort")
    sp.set_defaults(run=cmd_export)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    try:
        return ns.run(ns)
    except (ValueError, NotImplementedError, FileNotFoundError) as e:
        print(f"fp8compile: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
