"""Rank agreement between two importances over the same units (the statistics live in ``core.ranks``)."""

from whatmatters.core.ranks import kendall, rank_agreement, ranks, spearman, topk_overlap

__all__ = ["kendall", "rank_agreement", "ranks", "spearman", "topk_overlap"]
