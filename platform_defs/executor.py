"""The multiprocess executor Quiver runs with: forkserver, with the model preloaded before fork."""

from typing import Any

from dagster import Field, multiprocess_executor

DEFINITIONS_MODULE = "platform_defs.definitions"
PRELOAD_MODULE = "platform_defs.preload"


def executor_config(preload_model: bool, max_concurrent: int = 0) -> dict[str, Any]:
    """An explicit preload list replaces Dagster's default one, so the definitions module is listed too."""
    modules = [DEFINITIONS_MODULE, PRELOAD_MODULE] if preload_model else [DEFINITIONS_MODULE]
    config: dict[str, Any] = {"start_method": {"forkserver": {"preload_modules": modules}}}
    if max_concurrent:
        config["max_concurrent"] = max_concurrent
    return config


def _from_run_config(config: dict[str, Any]) -> dict[str, Any]:
    return executor_config(config["preload_model"], config["max_concurrent"])


def quiver_executor(preload_model: bool = True):  # noqa: ANN201 - an ExecutorDefinition
    """Steps fork from a forkserver that imported the definitions (and, by default, loaded the model)."""
    return multiprocess_executor.configured(
        _from_run_config,
        name="quiver_multiprocess",
        config_schema={
            "preload_model": Field(bool, default_value=preload_model,
                                   description="Load the model in the forkserver so steps inherit it."),
            "max_concurrent": Field(int, default_value=0, description="Step processes at once; 0: CPU count."),
        },
    )
