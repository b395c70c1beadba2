"""The stages a grid can run on each RunSpec, in the order they usually run:

    train    trains the model (validation loss, perplexity, bits per byte)
    probe    gate-saturation histograms before and after training
    eval     lm-eval tasks
    profile  training-step throughput and memory, generation time and memory
    mqar     multi-query associative recall trained from scratch, accuracy per setting

`STAGES` is the registry the grid file's `stages:` and the CLI's `--stages` name them from. One
module per stage over `base`; a new stage is a module like them plus one line here.
"""

from __future__ import annotations

from registry import Registry

from .base import Stage, StageContext, StageNotApplicable
from .probing import ProbeStage
from .profiling import ProfileStage
from .recall import MQARStage
from .scoring import EvalStage
from .training import TrainStage

__all__ = [
    "STAGES",
    "EvalStage",
    "MQARStage",
    "ProbeStage",
    "ProfileStage",
    "Stage",
    "StageContext",
    "StageNotApplicable",
    "TrainStage",
]

#: Stage instances by name, in registration order (which `list` and error messages show).
STAGES: Registry[Stage] = Registry("stage", hint="A stage is a harness.stages.Stage registered in harness.stages.")
for _stage in (TrainStage(), EvalStage(), ProbeStage(), ProfileStage(), MQARStage()):
    STAGES.register(_stage.name, _stage)
