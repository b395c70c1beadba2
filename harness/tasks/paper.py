"""The paper's benchmark suite (ReGLA Table 5 plus the usual small-LM tasks), by lm-eval's names.

Each task runs through lm-eval's own installed definition. With a data directory, the definition
is pointed at local jsonl files in the dataset's exact schema (see `DATA_LAYOUT`); without one, the
dataset comes from the Hugging Face hub or its local cache, as lm-eval would load it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .task_yaml import installed_task_yaml, local_data_overrides, write_task_yaml


@dataclass(frozen=True)
class PaperTask:
    name: str
    #: the task YAML inside lm_eval/tasks/
    yaml: str
    #: folder under the data directory; truthfulqa_mc1 and _mc2 share one dataset
    folder: str
    #: splits the installed YAML declares (train is only used for few-shot examples)
    splits: tuple[str, ...]
    #: the split lm-eval scores: test when the YAML declares one, else validation
    scored_split: str
    #: one line on the fields each row needs (the hub dataset's own schema)
    schema: str


PAPER_TASKS: dict[str, PaperTask] = {
    t.name: t
    for t in (
        PaperTask(
            "boolq",
            "super_glue/boolq/default.yaml",
            "boolq",
            ("train", "validation"),
            "validation",
            "question, passage, idx, label (0 = no, 1 = yes)  [aps/super_glue boolq]",
        ),
        PaperTask(
            "piqa",
            "piqa/piqa.yaml",
            "piqa",
            ("train", "validation"),
            "validation",
            "goal, sol1, sol2, label (0/1)  [baber/piqa]",
        ),
        PaperTask(
            "hellaswag",
            "hellaswag/hellaswag.yaml",
            "hellaswag",
            ("train", "validation"),
            "validation",
            'activity_label, ctx_a, ctx_b, ctx, endings (4 strings), label (a string: "0".."3")  [Rowan/hellaswag]',
        ),
        PaperTask(
            "winogrande",
            "winogrande/default.yaml",
            "winogrande",
            ("train", "validation"),
            "validation",
            'sentence (with one _), option1, option2, answer ("1"/"2")  [allenai/winogrande winogrande_xl]',
        ),
        PaperTask(
            "truthfulqa_mc1",
            "truthfulqa/truthfulqa_mc1.yaml",
            "truthfulqa",
            ("validation",),
            "validation",
            "question, mc1_targets {choices, labels}, mc2_targets {choices, labels}  "
            "[truthfulqa/truthful_qa multiple_choice]",
        ),
        PaperTask(
            "truthfulqa_mc2",
            "truthfulqa/truthfulqa_mc2.yaml",
            "truthfulqa",
            ("validation",),
            "validation",
            "question, mc1_targets {choices, labels}, mc2_targets {choices, labels}  "
            "[truthfulqa/truthful_qa multiple_choice]",
        ),
        PaperTask(
            "arc_easy",
            "arc/arc_easy.yaml",
            "arc_easy",
            ("train", "validation", "test"),
            "test",
            "id, question, choices {text, label}, answerKey  [allenai/ai2_arc ARC-Easy]",
        ),
        PaperTask(
            "arc_challenge",
            "arc/arc_challenge.yaml",
            "arc_challenge",
            ("train", "validation", "test"),
            "test",
            "id, question, choices {text, label}, answerKey  [allenai/ai2_arc ARC-Challenge]",
        ),
        PaperTask(
            "lambada_openai",
            "lambada/lambada_openai.yaml",
            "lambada_openai",
            ("test",),
            "test",
            "text  [EleutherAI/lambada_openai default]",
        ),
        PaperTask(
            "wikitext",
            "wikitext/wikitext.yaml",
            "wikitext",
            ("train", "validation", "test"),
            "test",
            "page  [EleutherAI/wikitext_document_level wikitext-2-raw-v1]",
        ),
    )
}

#: The six tasks of the paper's Table 5 (0- and 5-shot).
TABLE5_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "truthfulqa_mc1", "truthfulqa_mc2")


class TaskDataMissing(FileNotFoundError):
    """Local data for a task is absent; the message says where to put which file."""


def data_layout(task: PaperTask, data_dir: Path | str = "<data-dir>") -> str:
    optional = [f"{split}.jsonl" for split in task.splits if split != task.scored_split]
    also = f" (optionally also {', '.join(optional)}; train holds few-shot examples)" if optional else ""
    return (
        f"put {task.scored_split}.jsonl{also} in {Path(data_dir) / task.folder}/, "
        f"one JSON object per line with fields {task.schema}"
    )


def local_split_files(task: PaperTask, data_dir: Path) -> dict[str, Path]:
    folder = Path(data_dir) / task.folder
    files = {split: folder / f"{split}.jsonl" for split in task.splits if (folder / f"{split}.jsonl").is_file()}
    if task.scored_split not in files:
        raise TaskDataMissing(
            f"task {task.name}: no local data at {folder / (task.scored_split + '.jsonl')}; "
            f"{data_layout(task, data_dir)}"
        )
    return files


def write_paper_task_yaml(name: str, yaml_dir: Path, data_dir: Path | None) -> Path:
    """The task's YAML for this run: the installed definition, with local data when `data_dir` is set."""
    task = PAPER_TASKS[name]
    overrides = None
    if data_dir is not None:
        overrides = local_data_overrides(local_split_files(task, Path(data_dir)), task.splits)
    return write_task_yaml(yaml_dir, name, installed_task_yaml(task.yaml), overrides)
