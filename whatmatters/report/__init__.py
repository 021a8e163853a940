"""Plots and a self-contained HTML report (importing this package imports matplotlib)."""

from whatmatters.report.html import agreement_matrix, describe_model, render_report, write_report
from whatmatters.report.plots import (
    agreement_heatmap,
    bar_chart,
    curves,
    figure_to_data_uri,
    figure_to_png,
    sample_heatmap,
    sample_maps,
)

__all__ = [
    "agreement_heatmap",
    "agreement_matrix",
    "bar_chart",
    "curves",
    "describe_model",
    "figure_to_data_uri",
    "figure_to_png",
    "render_report",
    "sample_heatmap",
    "sample_maps",
    "write_report",
]
