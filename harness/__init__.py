"""The harness: specs and grids, model, data, training, evaluation, profiling, probes, results, reports."""
