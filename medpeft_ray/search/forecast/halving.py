"""The scheduler's epochs: successive halving's rungs and expected epochs, and each study's trials.

Pure arithmetic on the search's settings (no timing, no I/O): what Ray's ASHA and HyperBand
brackets let trials train, in expectation.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from medpeft_ray.config import SearchConfig
    from medpeft_ray.config.sections import SchedulerConfig


def halving_milestones(grace: int, reduction_factor: float, max_t: int, bracket: int = 0) -> list[int]:
    """The epochs at which an ASHA bracket may stop a trial, as Ray's ``_Bracket`` places them.

    Ray's rungs are ``grace * rf ** (k + s)`` for ``k < int(log(max_t / grace) / log(rf) - s + 1)``
    (``s`` the bracket); a rung is checked once a trial reports that many epochs, so a fractional
    rung counts at the next whole epoch.
    """
    grace = min(grace, max_t)
    count = int(math.log(max_t / grace) / math.log(reduction_factor) - bracket + 1)
    return [min(max_t, math.ceil(grace * reduction_factor ** (k + bracket) - 1e-9)) for k in range(max(0, count))]


def halving_epochs_per_trial(grace: int, reduction_factor: float, max_t: int, bracket: int = 0) -> float:
    """Expected epochs of one trial under successive halving with these rungs.

    Every trial trains to the first rung m_0; past rung k only the best 1/rf go on, so a share
    rf^-(k+1) of the trials trains from m_k to m_{k+1} (the last segment ending at max_t):

        E = m_0 + sum_{k=1..K-1} (m_k - m_{k-1}) * rf^-k + (max_t - m_{K-1}) * rf^-K

    E.g. grace 1, rf 2, max_t 4: rungs 1, 2, 4 and E = 1 + 1/2 + 2/4 = 2 epochs. With no rung
    (K = 0) nothing stops: E = max_t.
    """
    rungs = halving_milestones(grace, reduction_factor, max_t, bracket)
    if not rungs:
        return float(max_t)
    epochs = float(rungs[0])
    for k in range(1, len(rungs)):
        epochs += (rungs[k] - rungs[k - 1]) * reduction_factor ** -k
    return epochs + (max_t - rungs[-1]) * reduction_factor ** -len(rungs)


def expected_epochs(scheduler: SchedulerConfig, trials: int, max_t: int) -> tuple[float, str]:
    """(epochs all ``trials`` of a study train in total, how that figure reads: "expected" or "at most").

    asha: successive halving (:func:`halving_epochs_per_trial`). hyperband: Ray puts a trial in
    bracket s with probability proportional to e^(rungs of s); the expectation over brackets.
    median: the rule stops a trial only when it falls below the others' median, which no trial
    has to, so trials x max_t is an upper bound. none: trials x max_t.
    """
    if scheduler.type == "asha":
        return trials * halving_epochs_per_trial(scheduler.grace_period, scheduler.reduction_factor, max_t), "expected"
    if scheduler.type == "hyperband":
        brackets = range(scheduler.brackets)
        sizes = [len(halving_milestones(scheduler.grace_period, scheduler.reduction_factor, max_t, s))
                 for s in brackets]
        weights = [math.exp(size - max(sizes)) for size in sizes]
        per_trial = sum(w * halving_epochs_per_trial(scheduler.grace_period, scheduler.reduction_factor, max_t, s)
                        for w, s in zip(weights, brackets)) / sum(weights)
        return trials * per_trial, "expected"
    if scheduler.type == "median":
        return float(trials * max_t), "at most"
    return float(trials * max_t), "expected"


def halving_epoch_shares(grace: int, reduction_factor: float, max_t: int, bracket: int = 0) -> list[float]:
    """The share of a bracket's trials that trains each epoch 1..max_t under successive halving.

    As :func:`halving_epochs_per_trial` (whose sum this is): every trial trains to the first rung,
    a share rf^-k the epochs after rung k, up to max_t. A trial stopped at a rung has trained that
    epoch, so pays for what is done there (a generation trial's FID).
    """
    rungs = halving_milestones(grace, reduction_factor, max_t, bracket)
    shares = []
    for epoch in range(1, max_t + 1):
        passed = sum(1 for rung in rungs if rung < epoch)  # rungs decided before this epoch
        shares.append(float(reduction_factor ** -passed))
    return shares


def expected_fid_runs(scheduler: SchedulerConfig, trials: int, max_t: int, fid_epochs: list[int]) -> float:
    """Expected FID samplings of all ``trials`` of a study: each trial samples at the ``fid_epochs`` it reaches.

    The shares of trials reaching each epoch as :func:`expected_epochs` counts them (hyperband:
    weighted over the brackets); median and none: every trial reaches every epoch (for median an
    upper bound, as its epochs are).
    """
    epochs = [e for e in fid_epochs if 1 <= e <= max_t]
    if scheduler.type == "asha":
        shares = halving_epoch_shares(scheduler.grace_period, scheduler.reduction_factor, max_t)
    elif scheduler.type == "hyperband":
        grace, rf, brackets = scheduler.grace_period, scheduler.reduction_factor, range(scheduler.brackets)
        sizes = [len(halving_milestones(grace, rf, max_t, s)) for s in brackets]
        weights = [math.exp(size - max(sizes)) for size in sizes]  # as expected_epochs weighs the brackets
        per_bracket = [halving_epoch_shares(grace, rf, max_t, s) for s in brackets]
        shares = [sum(w * b[i] for w, b in zip(weights, per_bracket)) / sum(weights) for i in range(max_t)]
    else:
        shares = [1.0] * max_t
    return trials * sum(shares[e - 1] for e in epochs)


def study_trials(config: SearchConfig) -> list[int]:
    """Trials of each label ratio's study: ``num_samples``, capped by its share of ``search.max_trials``.

    As :class:`~medpeft_ray.search.budget.SearchBudget` shares them out: each study gets an even
    split of the trials left over the studies left, and is taken to use all of its share.
    """
    settings = config.search
    ratios = config.dataset.label_ratios
    left = settings.max_trials
    counts = []
    for index in range(len(ratios)):
        trials = settings.num_samples
        if left is not None:
            trials = min(trials, math.ceil(max(0, left) / (len(ratios) - index)))
            left -= trials
        counts.append(trials)
    return counts
