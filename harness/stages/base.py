"""What every stage is: a named step that reads a RunSpec (and what earlier stages left in the run
directory) and returns metric records, which the runner turns into result rows.

Adding a stage: subclass `Stage` in a module of its own, give it a `config_class` (its settings in
the grid file, under the stage's name, hashed into its own stage id), and register an instance in
`harness.stages.STAGES`. It only adds rows; nothing else changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import from_dict, to_dict
from ..data import prepare_data
from ..spec import RunSpec
from ..tracking import Tracker, TrackingOptions, open_tracker


class StageNotApplicable(ValueError):
    """A stage that has no meaningful result for this run (its message says why); `advice` says
    what to run instead. Recorded as the stage's failure with that advice."""

    def __init__(self, message: str, advice: str):
        super().__init__(message)
        self.advice = advice


@dataclass
class StageContext:
    """What the runner hands every stage: where to write, which device, shared caches."""

    run_dir: Path
    device: str = "auto"
    progress: bool = True
    data_cache: dict = field(default_factory=dict)
    #: False on the non-zero ranks of a torchrun job: they compute but write nothing
    is_main: bool = True
    #: `run --track`: mirror training curves to a tracker (None: off)
    tracking: TrackingOptions | None = None

    def data_for(self, spec: RunSpec) -> Any:
        """Prepared data, shared by all runs of a grid with the same source and tokenizer."""
        key = (spec.data.source, spec.data.tokenizer, repr(sorted(spec.data.options.items())))
        if key not in self.data_cache:
            self.data_cache[key] = prepare_data(spec.data.source, spec.data.tokenizer, dict(spec.data.options))
        return self.data_cache[key]

    def tracker_for(self, spec: RunSpec) -> Tracker:
        """The run's tracker (harness.tracking); a no-op one when tracking is off or not rank 0."""
        options = self.tracking if self.is_main else None
        return open_tracker(options, spec.grid, spec.name, spec.run_id)

    @property
    def model_dir(self) -> Path:
        return self.run_dir / "model"


class Stage:
    name: str = ""
    #: the stage's settings, read strictly from the grid file under the stage's name
    config_class: type = type(None)
    #: stages whose successful result this stage needs
    requires: tuple[str, ...] = ()
    #: True when every rank of a torchrun job takes part (DDP training); else rank 0 runs it alone
    distributed: bool = False

    def validate(self, settings: Any) -> dict[str, Any]:
        """The stage's settings from a grid file, checked strictly and normalised (every default
        filled in), as they are hashed into the stage id; raises ConfigError naming the problem."""
        return to_dict(from_dict(self.config_class, settings, self.name))

    def settings(self, spec: RunSpec) -> Any:
        return from_dict(self.config_class, spec.stages.get(self.name, {}), self.name)

    def run(self, spec: RunSpec, ctx: StageContext) -> list[dict[str, Any]]:  # pragma: no cover
        raise NotImplementedError
