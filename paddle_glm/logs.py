"""Quiet logs by default: progress bars, metrics, where files went, and warnings that ask the user to act.

Our own messages go through `logger` ("paddle_glm"). PaddleNLP's logger is filtered (`configure`): its warnings
and the Trainer's loss and metric lines pass, its chatter does not (nine "Adding <|endoftext|> to the vocabulary"
lines per tokenizer load, the configuration dump, the `--report_to` notice, ...). `--verbose` lets everything
through. Import-time noise of third-party packages (ccache, distutils, `datasets`' PyTorch notice) is hidden by
`hide_import_noise`, which `paddle_glm/__init__.py` runs before paddle is imported.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import warnings

__all__ = ["logger", "configure", "hide_import_noise", "verbose_requested"]

logger = logging.getLogger("paddle_glm")
if not logger.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("[%(asctime)s] %(levelname)s %(message)s", datefmt="%H:%M:%S"))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False

# PaddleNLP lines a quiet run keeps: the Trainer's loss/metric logs and its metric tables.
_KEEP = re.compile(r"^(loss: |(eval|test|train)_\w+: |\*{5} \w+ metrics \*{5}|  \w+ += )")
# PaddleNLP warnings that ask nothing of the user.
_NOISE = re.compile(r"evaluation_strategy reset to|is not supported for|You are using a model of type|"
                    r"No ccache found|Setuptools is replacing distutils")
# Python warnings that ask nothing of the user (import time, export tracing).
_WARNINGS = ("No ccache found", "Setuptools is replacing distutils", r"In static graph mode, \w+_\(\) is the same")


class _Essentials(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            return not _NOISE.search(message)
        return bool(_KEEP.match(message))


def verbose_requested(argv=None) -> bool:
    """`--verbose` on the command line, or PADDLE_GLM_VERBOSE=1 in the environment."""
    argv = sys.argv[1:] if argv is None else argv
    return os.environ.get("PADDLE_GLM_VERBOSE", "") not in ("", "0") or any(
        arg in ("--verbose", "--verbose=true", "--verbose=True") for arg in argv)


def hide_import_noise() -> None:
    """Warnings and log lines third-party packages print when imported, which ask nothing of the user."""
    if verbose_requested():
        return
    for message in _WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    # Paddle's C++ warnings (e.g. "static graph(PIR) not support input out tensor" at every export), read by glog
    # when paddle loads; a value the user set wins.
    os.environ.setdefault("GLOG_minloglevel", "2")
    logging.getLogger("datasets").setLevel(logging.WARNING)  # "PyTorch version ... available."
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # "generated new fontManager"


def configure(argv=None) -> None:
    """Quiet (default) or verbose (`--verbose` in `argv`, default sys.argv) logs for PaddleNLP's logger; called by
    each script before it parses its flags, since the parsers log too."""
    from paddlenlp.utils.log import logger as paddlenlp_logger

    verbose = verbose_requested(argv)
    inner = paddlenlp_logger.logger
    for existing in [f for f in inner.filters if isinstance(f, _Essentials)]:
        inner.removeFilter(existing)
    if verbose:
        warnings.resetwarnings()
        return
    inner.addFilter(_Essentials())
