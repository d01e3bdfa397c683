"""Ready-made data sets: MovieLens loaders and a synthetic cold-start generator."""

from metarec.datasets.movielens import detect_variant, download_movielens, load_movielens
from metarec.datasets.synthetic import synthetic

__all__ = ["detect_variant", "download_movielens", "load_movielens", "synthetic"]
