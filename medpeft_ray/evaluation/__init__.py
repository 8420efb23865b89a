"""What a comparison of configurations rests on beyond point estimates: each trial's per-image
predictions (:mod:`.predictions`), bootstrap confidence intervals, paired significance tests with a
correction for many comparisons, and calibration."""
