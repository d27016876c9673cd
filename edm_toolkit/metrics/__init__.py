"""Evaluation: the FID Inception detector and its weight readers, FID / IS / sFID / precision-recall, bits/dim.

Data flow: images (generated in memory or read from disk) -> detector -> streaming float64 statistics ->
metrics against reference statistics.
"""
