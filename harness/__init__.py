"""The ablation and benchmark harness for gated linear attention (ReGLA)."""

#: The project's version; enters the run id of every run that uses a built-in plugin.
__version__ = "0.1.0"
