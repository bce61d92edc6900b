"""Static-graph export of GLM generation models."""
