"""Local ``evaluate`` word error rate metric; load it with :func:`hf_tome.evaluation.metrics.load_metric`."""
