"""`quiver export`: make the embedding backends' exports now (once per machine), e.g. while building an image,
so that no run pays for one."""

import argparse
import json
from pathlib import Path

from platform_defs.cli_progress import progress
from quiver.backends import BACKENDS, export_record


def export(args: argparse.Namespace) -> int:
    from platform_defs.resources import build_resources

    pool = build_resources(resolve_env=True)["model_pool"]
    backends = args.backend or [pool.backend]
    with progress("quiver export", len(backends)) as bar:  # an export takes minutes: a bar on a terminal
        for backend in backends:
            configured = pool.model_copy(update={"backend": backend})
            if configured.export_spec() is None:
                with bar.step(f"{backend}: nothing to export"):
                    bar.out(f"{backend}: runs the model as loaded ({configured.model_path}); nothing to export")
                continue
            with bar.step(f"exporting {backend} (made once per machine, then reused)"):
                state = configured.state()
            record = export_record(Path(state.export_dir))
            facts = {k: v for k, v in record.items() if k not in ("model_path", "versions")}
            bar.out(f"{backend}: {state.export_dir}\n  {json.dumps(facts)}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    exp = sub.add_parser("export", help="make the embedding backends' exports now (once per machine)")
    exp.add_argument("--backend", action="append", choices=BACKENDS,
                     help="a backend to export (repeatable); default: the configured one (QUIVER_MODEL_BACKEND)")
    exp.set_defaults(func=export)
