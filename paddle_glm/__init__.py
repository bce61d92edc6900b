"""paddle-glm: fine-tune, evaluate, export and serve THUDM's GLM family with PaddlePaddle.

Importing the package hides warnings that third-party packages print while being imported (ccache, distutils,
`datasets`' PyTorch notice) and that ask nothing of the user; `--verbose` or PADDLE_GLM_VERBOSE=1 keeps them.
"""
from .logs import hide_import_noise

hide_import_noise()
