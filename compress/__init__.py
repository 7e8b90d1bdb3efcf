"""Target-model side of autoprune-ray, usable without Ray: models, corpora, calibration
statistics, pruning baselines, perplexity and export."""
