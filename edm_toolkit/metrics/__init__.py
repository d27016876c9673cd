"""Evaluation: the FID Inception detector and its weight readers, FID / IS / sFID / precision-recall, bits/dim.

Data flow: images (generated in memory or read from disk) -> detector -> streaming float64 statistics ->
metrics against reference statistics. See docs/evaluation.md.
"""

from .detector_files import find_detector, load_detector
from .inception import InceptionOutputs, InceptionV3
from .statistics import FeatureStatistics, FIDStatistics, frechet_distance

__all__ = ["FIDStatistics", "FeatureStatistics", "InceptionOutputs", "InceptionV3", "find_detector",
           "frechet_distance", "load_detector"]
