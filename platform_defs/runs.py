"""Running Quiver's jobs from the command line: run config files, source partitions, failure messages."""

from typing import Any

import yaml
from dagster import DagsterInstance

from assets.common import judged_sources_partitions, sources_partitions
from quiver.errors import ConfigError


def load_run_config(path: str) -> dict[str, Any]:
    """A Dagster run config YAML file (ops, resources, execution), as `dagster ... -c FILE` takes it."""
    try:
        with open(path, encoding="utf-8") as fh:
            loaded = yaml.safe_load(fh) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read run config {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: a run config is a mapping (ops:, resources:, execution:)")
    return loaded


def config_for_job(file_config: dict[str, Any], assets: tuple[str, ...], base: dict[str, Any]) -> dict[str, Any]:
    """The file's config for one job: the `ops` entries of the job's own assets, everything else as is."""
    merged = {**file_config, **base}
    if "ops" in file_config:
        merged["ops"] = {op: value for op, value in file_config["ops"].items() if op in assets}
    return merged


def failure_message(result: Any) -> str:
    """The first failed step and its own message (a Failure's description, else the error)."""
    for event in result.all_events:
        data = event.step_failure_data if event.is_step_failure else None
        if data and data.user_failure_data and data.user_failure_data.description:
            return f"step {event.step_key}: {data.user_failure_data.description.strip()}"
        if data and data.error:
            return f"step {event.step_key}: {data.error.message.strip()}"
    return f"run {result.run_id} did not succeed"


def add_partition(name: str, instance: DagsterInstance | None = None, judged: bool = False) -> None:
    """The source's partition of the document stages and, for a source with judged queries, of retrieval_eval."""
    instance = instance or DagsterInstance.get()
    for partitions in (sources_partitions.name, *([judged_sources_partitions.name] if judged else [])):
        if name not in instance.get_dynamic_partitions(partitions):
            instance.add_dynamic_partitions(partitions, [name])


def remove_partition(name: str) -> None:
    instance = DagsterInstance.get()
    for partitions in (sources_partitions.name, judged_sources_partitions.name):
        if name in instance.get_dynamic_partitions(partitions):
            instance.delete_dynamic_partition(partitions, name)
