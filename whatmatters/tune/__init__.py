"""tune: see DESIGN in README."""
