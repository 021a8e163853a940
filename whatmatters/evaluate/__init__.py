"""Evaluation of any Importance: faithfulness, ground truth, agreement, benchmark table."""

from whatmatters.evaluate.agreement import rank_agreement

__all__ = ["rank_agreement"]
