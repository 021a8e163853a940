"""compress: see DESIGN in README."""
