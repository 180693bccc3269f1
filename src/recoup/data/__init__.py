"""Text corpora, calibration sampling and the installed data packs."""
