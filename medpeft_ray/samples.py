"""How a generation trial's sample images are drawn and kept, for those who draw them (the
generation recipe, the export) and those who show them (the report, which imports no torch)."""

#: seed of the first prompt's sample (prompt i uses SAMPLE_SEED + i) in every trial and every export
SAMPLE_SEED = 0
#: the samples of a trial's epoch, one grey uint8 (N, H, W) image per prompt, in its checkpoint folder
SAMPLES_FILE = "samples.npy"
