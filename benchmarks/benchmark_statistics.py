"""The statistics of the accuracy benchmarks: the held-out test split, the shuffled-residual pairing, and the
seed summary with a paired bootstrap interval against the baseline row, and the paired intervals between other rows
(a trainer against its controls).

All three are deterministic functions of their inputs and a seed, so that a second run of a benchmark holds out
the same images, pairs the same residuals and draws the same bootstrap resamples.
"""
from typing import Dict, List, Mapping, Sequence, Tuple

import numpy as np

#: Seed of the test split, the shuffled-residual pairing and the bootstrap unless a benchmark is told otherwise.
DEFAULT_SEED = 0


def held_out_split(cases: Sequence[str], strata: Sequence, test_size, seed: int = DEFAULT_SEED) \
        -> Tuple[List[str], List[str]]:
    """``(training cases, test cases)``, both sorted: a seeded split stratified by ``strata`` (one label per case,
    e.g. whether its reference mask is empty), by scikit-learn's ``train_test_split``.

    ``test_size``: a fraction (float in (0, 1)) or a number of cases (int). The cases are sorted before the split,
    so the result does not depend on the order they were listed in. A stratum with fewer than two cases cannot be
    split in proportion: then the split is not stratified (random, seeded).
    """
    from sklearn.model_selection import train_test_split

    if len(cases) != len(strata):
        raise ValueError(f"{len(cases)} cases but {len(strata)} strata")
    order = np.argsort(np.asarray(cases, dtype=object), kind="stable")
    ordered_cases = [cases[i] for i in order]
    ordered_strata = [strata[i] for i in order]
    counts = np.unique(np.asarray(ordered_strata), return_counts=True)[1]
    stratify = ordered_strata if counts.min() >= 2 and len(counts) > 1 else None
    train, test = train_test_split(ordered_cases, test_size=test_size, random_state=seed, shuffle=True,
                                   stratify=stratify)
    return sorted(train), sorted(test)


def derangement(n: int, seed: int = DEFAULT_SEED) -> List[int]:
    """``partner[i] != i`` for every ``i``: a seeded cyclic shift of a random order (case ``order[k]`` is paired with
    ``order[k + 1]``, the last with the first), so no case keeps its own entry and the pairing is one fixed
    permutation. Needs ``n >= 2``."""
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 items, got {n}")
    order = np.random.default_rng(seed).permutation(n)
    partner = np.empty(n, dtype=int)
    partner[order] = np.roll(order, -1)
    return partner.tolist()


def paired_bootstrap(scores: np.ndarray, reference: np.ndarray, n_resamples: int = 10000,
                     confidence: float = 0.95, seed: int = DEFAULT_SEED) -> Dict[str, float]:
    """Mean per-image difference ``scores - reference`` and its paired bootstrap interval over images.

    ``scores`` and ``reference``: per-image values, shape ``(images,)`` or ``(seeds, images)`` (the two may have
    different numbers of seeds): each image's value is first averaged over the seeds (runs of one setting are not
    paired with the other row's runs of the same seed: their seeds share nothing), then the per-image differences
    are resampled over images (``scipy.stats.bootstrap``, percentile method, seeded). The interval answers "which
    test images"; the spread between runs is the seeds' standard deviation, reported beside it.
    """
    from scipy.stats import bootstrap

    row, base = (np.atleast_2d(np.asarray(a, dtype=float)).mean(axis=0) for a in (scores, reference))
    if row.shape != base.shape:
        raise ValueError(f"scores of {row.shape[0]} images against a reference of {base.shape[0]}")
    differences = row - base
    if differences.size < 2:
        raise ValueError("a bootstrap interval needs at least 2 images")
    interval = bootstrap((differences,), np.mean, n_resamples=n_resamples, confidence_level=confidence,
                         method="percentile", random_state=np.random.default_rng(seed)).confidence_interval
    return {"mean_difference": float(differences.mean()), "low": float(interval.low), "high": float(interval.high),
            "confidence": confidence, "n_images": int(differences.size), "n_resamples": n_resamples, "seed": seed}


def seed_summary(per_seed: Mapping[str, float]) -> Dict[str, float]:
    """Mean and sample standard deviation (ddof 1; 0 for one seed) of one figure over seeds ``{seed: value}``."""
    values = np.asarray([v for v in per_seed.values() if v is not None], dtype=float)
    if values.size == 0:
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": float(np.nanmean(values)), "sd": float(np.nanstd(values, ddof=1)) if values.size > 1 else 0.0,
            "n": int(values.size)}


#: The figures of one run that a row summarizes over its seeds.
RUN_FIGURES = ("Dice", "pooled_Dice", "HD95", "lesion_F1", "lesion_precision", "lesion_recall", "train_time_s")


def successful_runs(rows: Mapping[str, Mapping[str, dict]]) -> Dict[str, Dict[str, dict]]:
    """``{row: {seed: run}}`` of the runs with ``status`` "ok"; rows without one are left out."""
    ok = {name: {s: r for s, r in runs.items() if r.get("status") == "ok"} for name, runs in rows.items()}
    return {name: runs for name, runs in ok.items() if runs}


def compare_runs(runs: Mapping[str, dict], reference_runs: Mapping[str, dict], name: str, reference: str,
                 n_resamples: int = 10000, seed: int = DEFAULT_SEED) -> Dict[str, float]:
    """:func:`paired_bootstrap` of the per-image Dice of one row's runs ``{seed: run}`` against another row's; a row
    scored on other images than the reference's is an error naming both."""
    images = sorted(next(iter(reference_runs.values()))["per_image_dice"])
    if any(sorted(r["per_image_dice"]) != images for r in runs.values()):
        raise ValueError(f"{name} was scored on other images than {reference}")
    row, base = (np.array([[r["per_image_dice"][i] for i in images] for r in rs.values()])
                 for rs in (runs, reference_runs))
    return paired_bootstrap(row, base, n_resamples, seed=seed)


def paired_comparisons(rows: Mapping[str, Mapping[str, dict]], pairs: Sequence[Tuple[str, str]],
                       n_resamples: int = 10000, seed: int = DEFAULT_SEED) -> List[dict]:
    """:func:`compare_runs` of ``row`` against ``reference`` for each ``(row, reference)`` of ``pairs`` whose two
    rows both have successful runs (others are left out), e.g. a residual trainer against the plain-channel
    control, or against its own models given shuffled residuals."""
    ok = successful_runs(rows)
    comparisons = []
    for name, reference in pairs:
        if name not in ok or reference not in ok:
            continue
        comparisons.append({"row": name, "reference": reference, "seeds": (len(ok[name]), len(ok[reference])),
                            **compare_runs(ok[name], ok[reference], name, reference, n_resamples, seed)})
    return comparisons


def summarize_rows(rows: Mapping[str, Mapping[str, dict]], baseline: str, n_resamples: int = 10000,
                   seed: int = DEFAULT_SEED) -> Dict[str, dict]:
    """Per row of ``{row: {seed: run result}}`` (runs with ``status`` "ok"; each with ``per_image_dice``
    ``{image: Dice}`` and the :data:`RUN_FIGURES`): the seeds, :func:`seed_summary` of every figure, and
    :func:`compare_runs` of its per-image Dice against the ``baseline`` row's (None for the baseline itself,
    or when the baseline has no run). Rows without a successful run are left out; rows scored on other images
    than the baseline's are an error."""
    ok = successful_runs(rows)
    base = ok.get(baseline)
    summaries = {}
    for name, runs in ok.items():
        summary = {"seeds": sorted(runs, key=int)}
        summary.update({figure: seed_summary({s: r.get(figure) for s, r in runs.items()}) for figure in RUN_FIGURES})
        summary["vs_baseline"] = None
        if base and name != baseline:
            summary["vs_baseline"] = compare_runs(runs, base, name, baseline, n_resamples, seed)
        summaries[name] = summary
    return summaries
