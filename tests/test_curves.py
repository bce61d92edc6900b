"""training_curves.png: the series drawn from the Trainer's log history, and a figure with every panel drawn."""
from __future__ import annotations

import numpy as np

from paddle_glm.curves import curves_from_history, plot_training_curves

HISTORY = [
    {"loss": 5.0, "learning_rate": 1e-3, "step": 10}, {"loss": 4.0, "learning_rate": 8e-4, "step": 20},
    {"eval_loss": 4.5, "eval_bleu4": 3.0, "eval_rougeL": 10.0, "eval_ppl": 90.0, "step": 20},
    {"loss": 3.0, "learning_rate": 6e-4, "step": 30},
    {"eval_loss": 3.5, "eval_bleu4": 20.0, "eval_rougeL": 35.0, "step": 30},
    {"train_runtime": 12.0, "train_loss": 4.0, "step": 30},
]


def test_series_follow_the_log_history():
    series = curves_from_history(HISTORY)
    assert series["loss"] == ([10, 20, 30], [5.0, 4.0, 3.0])
    assert series["learning_rate"] == ([10, 20, 30], [1e-3, 8e-4, 6e-4])
    assert series["eval_bleu4"] == ([20, 30], [3.0, 20.0]) and series["eval_rougeL"] == ([20, 30], [10.0, 35.0])
    assert "eval_ppl" not in series and "train_loss" not in series


def _drawn_fraction(image: np.ndarray) -> float:
    return float((image[..., :3].min(axis=-1) < 0.6).mean())  # dark pixels: lines, text, ticks


def test_png_has_three_drawn_panels(tmp_path):
    import matplotlib.image

    path = tmp_path / "training_curves.png"
    assert plot_training_curves(HISTORY, str(path))
    image = matplotlib.image.imread(str(path))
    height, width = image.shape[:2]
    assert width >= 1200 and height >= 300 and width > 3 * height  # three panels side by side
    for panel in np.array_split(image, 3, axis=1):  # each panel has drawn content, not only a blank frame
        assert _drawn_fraction(panel) > 0.01
    assert not plot_training_curves([{"train_runtime": 1.0, "step": 3}], str(tmp_path / "none.png"))
    assert not (tmp_path / "none.png").exists()


def test_png_leaves_out_panels_without_data(tmp_path):
    import matplotlib.image

    path = tmp_path / "curves.png"
    plot_training_curves([entry for entry in HISTORY if "eval_loss" not in entry], str(path))
    height, width = matplotlib.image.imread(str(path)).shape[:2]
    assert 2 * height <= width < 3 * height  # loss and learning rate only
