"""The ``musco`` command: list plugins, preview a plan, compress, inspect a saved run."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

STATE_FILE = "state.musco"
REPORT_FILE = "report.json"


class CLIError(Exception):
    """A problem with the command's arguments or inputs, shown as one line."""


def _load_model(spec: str):
    """``package.module:factory`` (called with no arguments) or a file saved with torch.save(model)."""
    import torch
    from torch import nn

    if ":" in spec and not Path(spec).exists():
        module_name, _, attr = spec.partition(":")
        if "" not in sys.path and str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))  # like `python -m`: modules beside you import
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise CLIError(f"cannot import {module_name!r} for MODEL {spec!r}: {exc}") from None
        factory = getattr(module, attr, None)
        if factory is None:
            raise CLIError(f"{module_name!r} has no attribute {attr!r} (MODEL {spec!r})")
        model = factory() if callable(factory) and not isinstance(factory, nn.Module) else factory
    else:
        path = Path(spec)
        if not path.is_file():
            raise CLIError(f"MODEL {spec!r} is neither package.module:factory nor a file")
        # A whole pickled model: this runs code from the file, so only use trusted files.
        model = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(model, nn.Module):
        raise CLIError(f"MODEL {spec!r} gave a {type(model).__name__}, not a torch.nn.Module")
    return model


def _input_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 1,3,224,224, got {text!r}") from None
    if not shape or any(s < 1 for s in shape):
        raise argparse.ArgumentTypeError(f"expected positive sizes like 1,3,224,224, got {text!r}")
    return shape


def _compressor(args):
    import torch

    import musco_core as musco
    from musco_core.errors import MuscoError

    model = _load_model(args.model)
    spec = musco.Spec.load(args.spec)
    try:
        # Random (seeded), not zeros: a zero input hides every weight behind the first
        # layer's bias, which would blind rules that measure damage (budget).
        inputs = torch.randn(args.input_shape, generator=torch.Generator().manual_seed(0))
        return musco.Compressor(model, spec, example_inputs=inputs, progress=not args.quiet)
    except MuscoError:
        raise
    except Exception as exc:  # the model does not run on this input (or an input too large)
        shape = ",".join(map(str, args.input_shape))
        raise CLIError(
            f"could not run MODEL {args.model!r} on an example input of shape {shape} "
            f"(--input-shape): {type(exc).__name__}: {exc}"
        ) from exc


def cmd_plugins(args) -> None:
    from musco_core.registry import default_registry

    registry = default_registry()
    table = registry.available()
    broken = [{"name": b.name, "distribution": b.distribution, "error": b.error}
              for b in registry.broken]
    if args.json:
        print(json.dumps({**table, "broken": broken}, indent=2))
        return
    for kind, rows in table.items():
        print(f"{kind}:")
        for row in rows:
            aliases = f" (aliases: {', '.join(row['aliases'])})" if row["aliases"] else ""
            replaced = row.get("overrides")
            overrides = (f" (overrides {replaced['name']!r} from "
                         f"{replaced['distribution'] or 'an unnamed plugin'})" if replaced else "")
            print(f"  {row['name']:<18} {row['distribution'] or '-':<14} {row['summary']}"
                  f"{aliases}{overrides}")
    if broken:
        print("broken (skipped; MUSCO_STRICT_PLUGINS=1 makes this an error):")
        for row in broken:
            print(f"  {row['name']:<18} {row['distribution'] or '-':<14} {row['error']}")


def cmd_plan(args) -> None:
    from musco_core.report import format_table

    compressor = _compressor(args)
    print(compressor.plan)
    print()
    print(format_table(compressor.preview()))
    for index, table in sorted(compressor.joint_tables.items()):
        # What a joint rule (budget) measured to choose the ranks: per-layer sensitivity.
        print()
        print(f"rule {index} ({compressor.rules[index].rank.name}): how each layer's rank was chosen")
        print(table)


def cmd_compress(args) -> None:
    import musco_core as musco

    out = Path(args.output)
    state = out / STATE_FILE
    if state.exists():
        compressor = musco.Compressor.resume(state, _load_model(args.model), progress=not args.quiet)
        if compressor.spec != musco.Spec.load(args.spec):
            raise CLIError(f"{out} holds a run with a different spec; choose another -o")
        print(f"resuming {state} at step {compressor.position}", file=sys.stderr)
    else:
        compressor = _compressor(args)
    steps = 0
    while not compressor.done and (args.steps is None or steps < args.steps):
        report = compressor.step()
        steps += 1
        if not args.quiet:
            print(report)
        compressor.save(state)
    out.mkdir(parents=True, exist_ok=True)
    run = compressor.report()
    (out / REPORT_FILE).write_text(json.dumps(
        {"position": compressor.position, "done": compressor.done, **run.to_dict()}, indent=2))
    if not args.quiet:
        print(run)
    left = "done" if compressor.done else f"{len(compressor.plan.steps) - compressor.position} step(s) left"
    print(f"{steps} step(s) run, {left}; state in {state}", file=sys.stderr)


def cmd_inspect(args) -> None:
    from musco_core.persist import read_state
    from musco_core.report import StepReport, layer_history

    path = Path(args.path)
    state = read_state(path / STATE_FILE if path.is_dir() else path)
    manifest = state["manifest"]
    steps = state["plan"]["steps"]
    print(f"position {state['position']} of {len(steps)} step(s), planned through round "
          f"{state['plan'].get('round', 1)} of {state['spec'].get('rounds', 1)}")
    print(f"{len(manifest)} replacement(s):")
    for e in manifest:
        rank = "x".join(map(str, e["rank"])) if isinstance(e["rank"], list) else e["rank"]
        print(f"  round {e['round']}  {e['name']:<40} {e['decomposition']:<10} rank {rank}")
    history = layer_history(StepReport.from_dict(r) for r in state["reports"])
    if history:
        before = sum(first.params_before for first, _ in history.values())
        after = sum(last.params_after for _, last in history.values())
        print(f"compressed layers: {before} -> {after} parameters ({before / max(after, 1):.2f}x)")
    if args.plot:
        from musco_core.plot import plot_run, report_from_state

        try:
            plot_run(report_from_state(state), args.plot)
        except ImportError as exc:
            raise CLIError(str(exc)) from None
        print(f"picture of the run in {args.plot}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="musco", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plugins", help="list strategies and the distributions providing them")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=cmd_plugins)

    for name, help_text, run in (
        ("plan", "show which layer gets what, with ranks, params and FLOPs; changes nothing",
         cmd_plan),
        ("compress", "compress (all steps, or --steps N) and save the state to -o DIR",
         cmd_compress),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("model", metavar="MODEL",
                       help="package.module:factory (called with no arguments) or a file "
                            "saved with torch.save(model)")
        p.add_argument("--spec", required=True, help="spec file (.toml, .yaml or .json)")
        p.add_argument("--input-shape", type=_input_shape, required=True,
                       help="shape of the example input, e.g. 1,3,224,224")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress or tables")
        if name == "compress":
            p.add_argument("-o", "--output", required=True, help="output directory")
            p.add_argument("--steps", type=int, default=None,
                           help="run at most N steps now; run again to continue")
        p.set_defaults(run=run)

    p = sub.add_parser("inspect", help="summarise a directory or state file from 'compress'")
    p.add_argument("path")
    p.add_argument("--plot", metavar="PNG", default=None,
                   help="also draw the run (per layer and per step) to this image; needs "
                        "matplotlib")
    p.set_defaults(run=cmd_inspect)
    return parser


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message says it all: musco's own, the CLI's, and file-system ones."""
    from musco_core.errors import MuscoError

    return (CLIError, MuscoError, OSError)


def _one_line(exc: BaseException) -> str:
    """An exception as one line: a spec's problems joined with '; '."""
    from musco_core.errors import SpecError

    if isinstance(exc, SpecError) and len(exc.problems) > 1:
        text = f"{len(exc.problems)} problems in the spec: " + "; ".join(exc.problems)
    elif isinstance(exc, _expected_errors()):
        text = str(exc)
    else:
        text = f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())


def _stdout_gone() -> None:
    """Point stdout at /dev/null, so that Python's exit-time flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    """Run the command; every error is one line on stderr and exit status 2.

    A closed output pipe (``musco inspect out | head``) ends the command quietly
    with status 141, as for other Unix tools. ``MUSCO_TRACEBACK=1`` shows the
    traceback of an unexpected error instead.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
        sys.stdout.flush()
    except BrokenPipeError:
        _stdout_gone()
        return 141
    except KeyboardInterrupt:
        print(f"musco {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("MUSCO_TRACEBACK", "").strip() not in ("", "0") and not isinstance(
                exc, _expected_errors()):
            raise
        print(f"musco {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    return 0


def console_main() -> Any:
    """Entry point of the ``musco`` console script."""
    sys.exit(main())


if __name__ == "__main__":
    console_main()
