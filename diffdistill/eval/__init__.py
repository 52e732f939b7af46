"""Evaluation behind ``diffdistill bench``, split by job.

``config`` (BenchConfig, validated), ``sampling`` (pipelines, schedulers, timing, memory), ``fidelity``
(torch-fidelity feature extractors: the digits classifier, pickle-free Inception), ``metrics`` (every metric
with its interval, the real-data floor, paired comparisons), ``clip_score``, ``cache`` (content-keyed
safetensors), ``report`` (JSON, Markdown, plot), ``bench`` (the run) and ``cli`` (flags generated from
BenchConfig). ``digits_classifier`` is the judge behind digits FID and prompt accuracy.

Submodules are imported on demand so ``import diffdistill.eval`` stays cheap.
"""
