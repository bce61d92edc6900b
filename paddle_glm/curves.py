"""`OUTPUT_DIR/training_curves.png`: training loss and learning rate against the step, and each evaluation's loss,
BLEU-4 and ROUGE-L, readable at a glance after a run (drawn from the Trainer's `log_history`)."""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

__all__ = ["curves_from_history", "plot_training_curves", "CURVES_NAME"]

CURVES_NAME = "training_curves.png"
Series = Dict[str, Tuple[List[int], List[float]]]  # name -> (steps, values)
_PANELS = (("loss", "eval_loss"), ("learning_rate",), ("eval_bleu4", "eval_rougeL"))
_TITLES = ("loss", "learning rate", "evaluation (%)")


def curves_from_history(log_history: Sequence[dict]) -> Series:
    """Every plotted quantity as (steps, values), in logging order; absent quantities are left out."""
    series: Series = {}
    for entry in log_history:
        step = entry.get("step")
        for name in (name for panel in _PANELS for name in panel):
            if step is not None and isinstance(entry.get(name), (int, float)):
                steps, values = series.setdefault(name, ([], []))
                steps.append(int(step))
                values.append(float(entry[name]))
    return series


def plot_training_curves(log_history: Sequence[dict], path: str) -> bool:
    """Write the figure to `path`; False (nothing written) when the history holds nothing to plot."""
    series = curves_from_history(log_history)
    if not series:
        return False
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    panels = [panel for panel in _PANELS if any(name in series for name in panel)]
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for axis, panel in zip(axes[0], panels):
        for name in panel:
            if name in series:
                steps, values = series[name]
                few = name.startswith("eval_") or len(steps) < 3  # single points need a marker to show
                axis.plot(steps, values, marker="o" if few else None, markersize=4, label=name)
        axis.set_title(_TITLES[_PANELS.index(panel)])
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True
