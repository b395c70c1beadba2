"""Data of the offline tasks for lm-eval's own command line and `simple_evaluate`: each task YAML
here names one of these as its `custom_dataset`, so `--include_path harness/tasks` finds tasks
whose data is attached, built from the installed offline-english corpus on first use.

lm-eval imports this file by path (its `!function` tag) and calls the loader with the task's
metadata; `data_dir` there (lm-eval's `--metadata '{"data_dir": ...}'`) points at a suite built
elsewhere, as the grid file's `eval: {data_dir: ...}` does.
"""

from __future__ import annotations

from typing import Any

import datasets

from harness.tasks.offline_suite import OfflineSuiteUnavailable, offline_suite_dir


def load_task(name: str, data_dir: str | None = None) -> datasets.DatasetDict:
    path = offline_suite_dir(data_dir) / name / "test.jsonl"
    if not path.is_file():
        raise OfflineSuiteUnavailable(f"task {name}: no items in {path}; build the suite from offline-english first")
    return datasets.load_dataset("json", data_files={"test": str(path)})


def regla_define(data_dir: str | None = None, **metadata: Any) -> datasets.DatasetDict:
    return load_task("regla_define", data_dir)


def regla_lastword(data_dir: str | None = None, **metadata: Any) -> datasets.DatasetDict:
    return load_task("regla_lastword", data_dir)


def regla_ppl(data_dir: str | None = None, **metadata: Any) -> datasets.DatasetDict:
    return load_task("regla_ppl", data_dir)


def regla_mqar(data_dir: str | None = None, **metadata: Any) -> datasets.DatasetDict:
    return load_task("regla_mqar", data_dir)
