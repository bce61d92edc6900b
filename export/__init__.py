"""Static-graph export of GLM generation models."""

import paddle_glm  # noqa: F401,E402  (first: it hides third-party import noise before paddle loads)
