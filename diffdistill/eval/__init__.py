"""Evaluation: the digits classifier (``digits_classifier``), torch-fidelity metrics with registered feature
extractors (``fidelity``), and the FID/latency-vs-steps benchmark behind ``diffdistill bench`` (``bench``).

Submodules are imported on demand so ``import diffdistill.eval`` stays cheap.
"""
