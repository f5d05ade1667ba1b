"""What one embedding step needs in memory: measured once per machine and model configuration.

The figure is the peak RSS of a fresh process that imports what an embedding step process holds (the
definitions, which the forkserver preloads, and the embed-and-insert stages), loads the model and encodes
one full batch at the model's window (`python -m platform_defs.footprint CONFIG` is that process). It is
kept in `~/.cache/quiver/memory/` ($QUIVER_CACHE_DIR), so the concurrency limits divide the memory budget
by it without measuring again; `quiver limits --measure` measures it again.
"""

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quiver.errors import ModelPoolError
from quiver.exporters import export_in_subprocess
from quiver.settings import PROJECT_ROOT
from resources.model_pool import ModelPool

PROBE_ENV = "QUIVER_FOOTPRINT_PROBE"
_log = logging.getLogger("quiver.footprint")
ESTIMATE = "estimated (model: weights x 2 + 400 MiB; base: 400 MiB)"


@dataclass(frozen=True)
class Footprint:
    """Peak RSS of a step process before the model (`base`) and with it, after a full batch (`model_peak`)."""

    base: int
    model_peak: int
    source: str  # "measured <date>" or "estimated (...)"


def footprint_file(pool: ModelPool) -> Path:
    cache = Path(os.environ.get("QUIVER_CACHE_DIR") or Path.home() / ".cache" / "quiver")
    return cache / "memory" / f"{pool.fingerprint()}-b{pool.batch_size}-l{pool.window_tokens()}.json"


def estimated_footprint(pool: ModelPool, why: str) -> Footprint:
    path = Path(pool.model_path)
    weights = sum(p.stat().st_size for p in path.rglob("*.safetensors")) if path.is_dir() else 0
    return Footprint(400 * 2**20, 2 * weights + 400 * 2**20, f"{ESTIMATE}: {why}")


def footprint(pool: ModelPool, measure: bool = True, log: Any = _log) -> Footprint:
    """What a step process holds without and with the model, and where the figures came from."""
    file = footprint_file(pool)
    if file.is_file():
        recorded = json.loads(file.read_text())
        if "base" in recorded:
            return Footprint(int(recorded["base"]), int(recorded["bytes"]), f"measured {recorded['measured']}")
    if not measure or os.environ.get(PROBE_ENV):
        return estimated_footprint(pool, "not measured yet")
    try:
        base, peak = measure_footprint(pool)
    except Exception as exc:  # noqa: BLE001 - an estimate keeps the limits conservative; the reason is said
        log.warning(f"could not measure the model's memory footprint: {exc}")
        return estimated_footprint(pool, f"measuring failed ({exc})")
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".tmp-{os.getpid()}-{file.name}")
    tmp.write_text(json.dumps({"bytes": peak, "base": base, "measured": time.strftime("%Y-%m-%d"),
                               "model": pool.model}))
    os.replace(tmp, file)
    return Footprint(base, peak, f"measured {time.strftime('%Y-%m-%d')}")


def forget_footprint(pool: ModelPool) -> None:
    footprint_file(pool).unlink(missing_ok=True)


def measure_footprint(pool: ModelPool, timeout_s: float = 300) -> tuple[int, int]:
    """(base, model peak) of a fresh process doing what an embedding step does with this pool's configuration."""
    spec = pool.export_spec()
    if spec is not None:  # the export is made first (once per machine): its making is not what a step holds
        export_in_subprocess(spec, Path(pool.export_dir), lambda _message: None)
    config = json.dumps({"model": pool.model, "batch_size": pool.batch_size, "max_seq_length": pool.max_seq_length,
                         "normalize": pool.normalize, "backend": pool.backend, "quantization": pool.quantization,
                         "export_dir": pool.export_dir, "calibration_texts": pool.calibration_texts,
                         "threads": pool.threads})
    path = os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, PROBE_ENV: "1", "PYTHONPATH": path, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    proc = subprocess.run([sys.executable, "-m", "platform_defs.footprint", config], capture_output=True,
                          text=True, timeout=timeout_s, env=env, cwd=str(PROJECT_ROOT))
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise ModelPoolError(f"footprint probe failed: {proc.stderr.strip().splitlines()[-1:]}")
    figures = json.loads(lines[-1])
    return int(figures["base"]), int(figures["peak"])


def _probe(config: dict[str, Any]) -> dict[str, int]:
    import resource

    import assets.embed_pipeline  # noqa: F401 - what an embedding step holds besides the model
    import platform_defs.definitions  # noqa: F401 - preloaded by the forkserver every step forks from

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    pool = ModelPool(**config)
    window = pool.window_tokens()
    pool.encode(["the quick brown fox jumps over the lazy dog " * (window // 4)] * pool.batch_size)
    return {"base": base, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


if __name__ == "__main__":
    print(json.dumps(_probe(json.loads(sys.argv[1]))))
