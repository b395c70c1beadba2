"""lm-eval task definitions: the paper's suite (lm-eval's own tasks on hub or local data) and the
offline suite built from held-out `offline-english` text (regla_define, regla_lastword, regla_ppl,
regla_mqar)."""

from .offline_suite import (
    OFFLINE_TASKS,
    OfflineSuiteUnavailable,
    build_offline_suite,
    offline_suite_dir,
    write_offline_task_yaml,
)
from .paper import PAPER_TASKS, TABLE5_TASKS, TaskDataMissing, data_layout, write_paper_task_yaml

__all__ = [
    "OFFLINE_TASKS",
    "OfflineSuiteUnavailable",
    "PAPER_TASKS",
    "PERPLEXITY_TASKS",
    "KNOWN_TASKS",
    "SUITES",
    "TABLE5_TASKS",
    "TaskDataMissing",
    "build_offline_suite",
    "data_layout",
    "offline_suite_dir",
    "write_offline_task_yaml",
    "write_paper_task_yaml",
]

#: Perplexity tasks (loglikelihood_rolling): few-shot examples have no meaning there, so they run once, at 0 shots.
PERPLEXITY_TASKS = frozenset({"wikitext", "regla_ppl"})
#: Names that stand for several tasks in EvalConfig.tasks.
SUITES: dict[str, tuple[str, ...]] = {
    "table5": TABLE5_TASKS,
    "paper": tuple(PAPER_TASKS),
    "offline": OFFLINE_TASKS,
}
KNOWN_TASKS = (*PAPER_TASKS, *OFFLINE_TASKS)
