"""Generated task YAMLs: a thin file that `include:`s a task definition and overrides its data.

lm-eval resolves `include:` (and the `!function` helpers of the included file) relative to the
included file, so the generated file can live anywhere -- in a temporary directory -- while the
prompt, metrics and preprocessing stay exactly those of the original definition.
"""

from __future__ import annotations

import importlib.util
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

SPLIT_KEYS = {"train": "training_split", "validation": "validation_split", "test": "test_split"}


def installed_task_yaml(relative_path: str) -> Path:
    """Absolute path of a task YAML shipped inside the installed lm_eval package."""
    path = lm_eval_tasks_dir() / relative_path
    if not path.is_file():
        raise FileNotFoundError(
            f"lm-eval {metadata.version('lm_eval')} has no task file {relative_path} under {lm_eval_tasks_dir()}"
        )
    return path


def lm_eval_tasks_dir() -> Path:
    """lm-eval's own task tree, found without importing lm-eval: the task names and settings of
    this package stay importable where lm-eval is not installed (a GPU machine running kernels)."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("lm-eval is not installed: `pip install lm-eval` (make setup installs it)")
    return Path(spec.origin).resolve().parent / "tasks"


def local_data_overrides(split_files: dict[str, Path], declared_splits: tuple[str, ...]) -> dict[str, Any]:
    """Point a task at local jsonl files, one per split.

    Splits the original task declares but the local data lacks are switched off (set to null), so
    lm-eval neither scores nor samples few-shot examples from a split that does not exist.
    """
    overrides: dict[str, Any] = {
        "dataset_path": "json",
        "dataset_name": None,
        # The offline tasks' own YAMLs load their data through a custom_dataset function (for
        # lm-eval's CLI); these files replace it.
        "custom_dataset": None,
        "dataset_kwargs": {"data_files": {split: str(path) for split, path in split_files.items()}},
    }
    for split in declared_splits:
        if split not in split_files:
            overrides[SPLIT_KEYS[split]] = None
    return overrides


def write_task_yaml(directory: Path, task: str, include: Path, overrides: dict[str, Any] | None = None) -> Path:
    """Write `<directory>/<task>.yaml` that includes `include` (absolute) and applies `overrides`."""
    directory.mkdir(parents=True, exist_ok=True)
    body = {"include": str(Path(include).resolve()), "task": task, **(overrides or {})}
    path = directory / f"{task}.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path
