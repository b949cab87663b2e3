"""Unstructured pruning: importance rankings whose prefixes are nested masks."""

from prfl.pruning.ranking import Ranking, build_ranking, kept_count

__all__ = ["Ranking", "build_ranking", "kept_count"]
