"""Plots and a self-contained HTML report."""
