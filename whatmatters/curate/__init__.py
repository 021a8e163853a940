"""curate: see DESIGN in README."""
