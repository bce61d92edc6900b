"""C++-backed runners (Paddle Inference, FastDeploy, ONNX Runtime) for exported GLM models."""

import paddle_glm  # noqa: F401,E402  (first: it hides third-party import noise before paddle loads)
