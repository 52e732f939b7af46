"""Every bench metric with its interval, computed from features extracted once per set of images.

Metrics come from torch-fidelity's own functions on those features: FID from statistics
(``fid_features_to_statistics`` / ``fid_statistics_to_metric``), KID (mean ± sd over subsets), IS
(mean ± sd over splits), precision and recall (Kynkäänniemi et al. 2019, k-NN manifolds). On top:

- **FID: basic (reverse-percentile) bootstrap.** Each of B replicates resamples the generated samples
  *and* the reference with replacement and recomputes FID from statistics. A resample holds duplicates,
  which make FID larger, so the replicates sit above the point estimate by about as much as the finite-N
  point estimate sits above the FID of the two distributions (the bootstrap principle). A percentile
  interval would therefore be shifted upward twice over; the basic interval
  ``[2·F − q(1−α/2), 2·F − q(α/2)]`` reflects the replicates about ``F`` and so subtracts that bias: it is
  an interval for the *population* FID (infinitely many samples, infinite reference), the quantity two
  pipelines really differ in. Its lower end is clipped at 0 (a FID cannot be negative); for near-real
  samples it may lie below the point estimate, which is the point: at that N the estimate is mostly bias.
- **Proportions** (prompt accuracy, precision, recall): Wilson score intervals. Precision counts generated
  samples inside the reference's k-NN manifold, recall reference samples inside the generated one; each
  interval holds the other set's manifold fixed (resampling with duplicates would shrink k-NN radii to 0).
- **CLIP score**: basic bootstrap of the mean per-sample score.
- **Comparisons**: paired bootstrap. Every cell of a run uses the same seeds and prompts, and every cell
  uses the same B index vectors (sample positions and reference images), so replicate b of cell A and
  replicate b of cell B are computed on the same resampled seeds, prompts and reference images; the
  difference's interval is the basic interval of the B replicate differences. "Resolved" means that
  interval excludes 0.
- **Real-data floor**: N real images against the reference, measured exactly like a cell: disjoint from
  the reference when it holds at least 2N images (N held out, the rest is the floor's reference), else N
  images drawn with replacement from the reference (an ideal generator's sample of the reference's
  empirical distribution).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

# Above this many floats the per-replicate reference statistics are recomputed for every cell, not kept.
_MAX_CACHED_STAT_FLOATS = 64 * 2**20


@dataclass
class SampleSet:
    """What every metric of one set of images needs, computed once (and cached as safetensors).

    ``features`` (N, D) float32 for FID/KID/PRC; ``logits`` (N, C) for IS; ``predictions`` (N,) digits the
    classifier reads and ``labels`` (N,) digits the prompts name (prompt accuracy); ``clip`` (N,) CLIP scores.
    """

    features: torch.Tensor
    logits: torch.Tensor
    predictions: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    clip: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def subset(self, index: torch.Tensor) -> SampleSet:
        """The samples at ``index`` (a LongTensor; repeats allowed)."""
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return SampleSet(self.features[index], self.logits[index], pick(self.predictions), pick(self.labels),
                         pick(self.clip))

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The non-empty fields as a flat tensor dict (for safetensors)."""
        return {k: v.contiguous() for k, v in vars(self).items() if v is not None}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> SampleSet:
        """Inverse of :meth:`to_tensors` (extra keys are ignored)."""
        names = ("features", "logits", "predictions", "labels", "clip")
        return cls(**{k: tensors.get(k) for k in names})

    @property
    def correct(self) -> torch.Tensor | None:
        """(N,) float 0/1: the classifier reads the prompt's digit; None without labels."""
        if self.predictions is None or self.labels is None:
            return None
        return (self.predictions == self.labels).double()


@dataclass
class Resampler:
    """B fixed bootstrap index vectors, shared by every cell of a run (what makes comparisons paired).

    ``gen`` (B, N): positions among a cell's N samples (seed + i, prompt i); ``ref`` (B, M): reference
    images; ``real`` (B, N): positions among the floor's N real images.
    """

    num_samples: int
    num_reference: int
    replicates: int
    seed: int = 0
    gen: torch.Tensor = field(init=False)
    ref: torch.Tensor = field(init=False)
    real: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        g = torch.Generator().manual_seed(self.seed)
        self.gen = torch.randint(self.num_samples, (self.replicates, self.num_samples), generator=g)
        self.ref = torch.randint(self.num_reference, (self.replicates, self.num_reference), generator=g)
        self.real = torch.randint(self.num_samples, (self.replicates, self.num_samples), generator=g)


# ------------------------------------------------------------------------------------------------ intervals

def z_value(confidence: float) -> float:
    """Two-sided standard normal quantile: 1.96 for 0.95."""
    return statistics.NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(successes: float, n: int, confidence: float) -> list[float]:
    """Wilson score interval of a binomial proportion (Wilson 1927): honest near 0 and 1, unlike p ± z·se."""
    if n <= 0:
        return [math.nan, math.nan]
    z = z_value(confidence)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def basic_interval(estimate: float, replicates: np.ndarray, confidence: float) -> list[float]:
    """Basic (reverse-percentile) bootstrap interval ``[2θ − q(1−α/2), 2θ − q(α/2)]`` (Davison & Hinkley 1997, 5.2)."""
    alpha = 1 - confidence
    lo_q, hi_q = np.quantile(replicates, [alpha / 2, 1 - alpha / 2])
    return [float(2 * estimate - hi_q), float(2 * estimate - lo_q)]


# ------------------------------------------------------------------------------------------------ FID

def fid_statistics(features: torch.Tensor) -> dict[str, np.ndarray]:
    """torch-fidelity's FID statistics (mean and covariance, float64) of (N, D) features."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    return fid_features_to_statistics(features.double())


def fid_from_statistics(stats_1: dict, stats_2: dict) -> float:
    """torch-fidelity's Fréchet distance between two sets of statistics."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    return float(fid_statistics_to_metric(stats_1, stats_2, verbose=False)[KEY_METRIC_FID])


class ReferenceStats:
    """FID statistics of the reference and of its B resamples, computed once per run where they fit."""

    def __init__(self, features: torch.Tensor, index: torch.Tensor):
        self.features, self.index = features, index
        self.full = fid_statistics(features)
        d = features.shape[1]
        fits = index.shape[0] * d * d <= _MAX_CACHED_STAT_FLOATS
        self._reps = [fid_statistics(features[i]) for i in index] if fits else None

    def replicate(self, b: int) -> dict[str, np.ndarray]:
        """Statistics of resample ``b``."""
        return self._reps[b] if self._reps is not None else fid_statistics(self.features[self.index[b]])


def fid_replicates(features: torch.Tensor, index: torch.Tensor, reference: ReferenceStats) -> np.ndarray:
    """(B,) FID of each resample ``features[index[b]]`` against reference resample b."""
    return np.array([fid_from_statistics(fid_statistics(features[i]), reference.replicate(b))
                     for b, i in enumerate(index)])


# ------------------------------------------------------------------------------------------------ PRC

def prc_indicators(gen: torch.Tensor, ref: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample precision (N,) and recall (M,) indicators; their means are torch-fidelity's precision/recall.

    Precision: generated sample inside some reference sample's ball (radius: distance to its k-th nearest
    reference neighbour); recall: reference sample inside some generated sample's ball (Kynkäänniemi 2019).
    """
    def radii(x: torch.Tensor) -> torch.Tensor:
        return torch.cdist(x, x).kthvalue(k + 1, dim=1).values  # k+1: the point itself is at distance 0

    d_gen_ref = torch.cdist(gen, ref)  # (N, M)
    precision = (d_gen_ref <= radii(ref)[None, :]).any(dim=1).double()
    recall = (d_gen_ref.T <= radii(gen)[None, :]).any(dim=1).double()
    return precision, recall


# ------------------------------------------------------------------------------------------------ one cell

@dataclass
class CellStats:
    """One cell's point metrics, intervals (``summary``) and bootstrap replicates (for comparisons)."""

    summary: dict[str, Any]
    replicates: dict[str, np.ndarray]


def point_metrics(gen: SampleSet, ref: SampleSet, kid_subset_size: int, k: int) -> dict[str, float]:
    """FID, KID, IS, precision and recall of ``gen`` against ``ref``, each by torch-fidelity's function."""
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
    from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

    n, m = len(gen), len(ref)
    kid = kid_features_to_metric(gen.features, ref.features, kid_subset_size=min(kid_subset_size, n, m),
                                 verbose=False)
    isc = isc_features_to_metric(gen.logits, splits=min(10, n))
    prc = prc_features_to_metric(gen.features, ref.features, prc_neighborhood=k, save_cpu_ram=True, verbose=False)
    return {
        "fid": fid_from_statistics(fid_statistics(gen.features), fid_statistics(ref.features)),
        "kid_mean": float(kid[KEY_METRIC_KID_MEAN]), "kid_std": float(kid[KEY_METRIC_KID_STD]),
        "isc_mean": float(isc[KEY_METRIC_ISC_MEAN]), "isc_std": float(isc[KEY_METRIC_ISC_STD]),
        "precision": float(prc[KEY_METRIC_PRECISION]), "recall": float(prc[KEY_METRIC_RECALL]),
    }


def cell_stats(gen: SampleSet, ref: SampleSet, reference: ReferenceStats, gen_index: torch.Tensor,
               confidence: float, kid_subset_size: int, k: int) -> CellStats:
    """Every metric of ``gen`` against ``ref`` with its interval, and the replicates comparisons need.

    ``reference`` holds ``ref``'s statistics and resample indices; ``gen_index`` (B, N) the sample resamples.
    """
    out: dict[str, Any] = point_metrics(gen, ref, kid_subset_size, k)
    fid_reps = fid_replicates(gen.features, gen_index, reference)
    out["fid_ci"] = clip_low(basic_interval(out["fid"], fid_reps, confidence))
    out["fid_debiased"] = float(2 * out["fid"] - fid_reps.mean())
    reps = {"fid": fid_reps}
    prec, rec = prc_indicators(gen.features, ref.features, k)
    out["precision_ci"] = wilson_interval(float(prec.sum()), len(prec), confidence)
    out["recall_ci"] = wilson_interval(float(rec.sum()), len(rec), confidence)
    reps["precision"] = prec[gen_index].mean(dim=1).numpy()
    reps["recall"] = rec[reference.index].mean(dim=1).numpy()
    correct = gen.correct
    if correct is not None:
        out["prompt_accuracy"] = float(correct.mean())
        out["prompt_accuracy_ci"] = wilson_interval(float(correct.sum()), len(correct), confidence)
        reps["prompt_accuracy"] = correct[gen_index].mean(dim=1).numpy()
    if gen.clip is not None:
        clip = gen.clip.double()
        out["clip_score"] = float(clip.mean())
        reps["clip_score"] = clip[gen_index].mean(dim=1).numpy()
        out["clip_score_ci"] = basic_interval(out["clip_score"], reps["clip_score"], confidence)
    return CellStats(out, reps)


def clip_low(interval: list[float]) -> list[float]:
    """An interval of a non-negative quantity with its lower end clipped at 0."""
    return [max(0.0, interval[0]), max(0.0, interval[1])]


# ------------------------------------------------------------------------------------------------ floor

def floor_split(num_reference: int, num_samples: int, seed: int) -> tuple[str, torch.Tensor, torch.Tensor]:
    """(mode, real image indices (N,), floor reference indices) into the reference set.

    ``disjoint`` when the reference holds at least 2N images: N held out, the rest is the floor's reference;
    else ``resampled``: N drawn with replacement, against the whole reference.
    """
    g = torch.Generator().manual_seed(seed + 1)
    if num_reference >= 2 * num_samples:
        perm = torch.randperm(num_reference, generator=g)
        return "disjoint", perm[:num_samples], perm[num_samples:]
    return "resampled", torch.randint(num_reference, (num_samples,), generator=g), torch.arange(num_reference)


def real_floor(ref: SampleSet, reference: ReferenceStats, resampler: Resampler, confidence: float,
               kid_subset_size: int, k: int, seed: int) -> tuple[CellStats, dict[str, Any]]:
    """The real-data floor at N: real images against the reference, measured like a cell.

    Returns its CellStats and a description (mode, sizes). In ``disjoint`` mode the floor's reference is
    the rest of the reference, with its own resamples; in ``resampled`` mode it is the run's reference.
    """
    n = resampler.num_samples
    mode, real_idx, ref_idx = floor_split(len(ref), n, seed)
    real = ref.subset(real_idx)
    if mode == "disjoint":
        floor_ref = ref.subset(ref_idx)
        g = torch.Generator().manual_seed(seed + 2)
        idx = torch.randint(len(floor_ref), (resampler.replicates, len(floor_ref)), generator=g)
        floor_reference = ReferenceStats(floor_ref.features, idx)
    else:
        floor_ref, floor_reference = ref, reference
    stats = cell_stats(real, floor_ref, floor_reference, resampler.real, confidence, kid_subset_size, k)
    info = {"mode": mode, "num_real": n, "num_reference": len(floor_ref)}
    return stats, info


# ------------------------------------------------------------------------------------------------ compare

COMPARED = (("fid", "lower"), ("precision", "higher"), ("recall", "higher"), ("prompt_accuracy", "higher"),
            ("clip_score", "higher"))


def compare(a: CellStats, b: CellStats, confidence: float) -> dict[str, dict[str, Any]]:
    """A − B for every metric both cells have: difference, basic bootstrap interval, resolved (excludes 0).

    Replicate b of both cells must come from the same resampled indices (paired bootstrap).
    """
    out = {}
    for name, better in COMPARED:
        if name not in a.replicates or name not in b.replicates:
            continue
        diff = a.summary[name] - b.summary[name]
        ci = basic_interval(diff, a.replicates[name] - b.replicates[name], confidence)
        resolved = ci[0] > 0 or ci[1] < 0
        out[name] = {"a": a.summary[name], "b": b.summary[name], "difference": diff, "ci": ci,
                     "resolved": resolved, "better": better}
    return out


def verdict(name: str, diff: dict[str, Any], label_a: str, label_b: str, confidence: float) -> str:
    """One sentence: which side is better on a metric, or that the interval does not resolve it."""
    level = f"{confidence:.0%}"
    lo, hi = diff["ci"]
    if not diff["resolved"]:
        return f"{name}: not resolved at {level} (difference {diff['difference']:+.4g}, interval [{lo:.4g}, {hi:.4g}] includes 0)"
    a_better = (diff["difference"] < 0) == (diff["better"] == "lower")
    winner, loser = (label_a, label_b) if a_better else (label_b, label_a)
    return (f"{name}: {winner} is better than {loser}, resolved at {level} "
            f"(difference {diff['difference']:+.4g}, interval [{lo:.4g}, {hi:.4g}])")
