"""C++-backed runners (Paddle Inference, FastDeploy, ONNX Runtime) for exported GLM models."""
