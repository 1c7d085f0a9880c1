"""Training metrics: which keys head a run's report and its curves, and the curves' step axis."""

import pytest

from trainer.metrics import MetricsLogger, curves_figure, headline_keys


def test_headline_keys_are_rewards_else_loss_and_validation():
    assert headline_keys(["lr", "reward/total", "loss", "reward/clip_v", "reward/total"]) == ["reward/total",
                                                                                            "reward/clip_v"]
    assert headline_keys(["lr", "val/loss", "loss", "grad_norm", "val/rouge_l"]) == ["val/loss", "loss", "val/rouge_l"]
    assert headline_keys(["lr", "grad_norm"]) == []


@pytest.mark.parametrize("steps", [3, 7, 250])
def test_curves_have_whole_step_ticks(steps):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [{"step": s, "reward/total": 0.1 * s, "loss": 1.0 / s} for s in range(1, steps + 1)]
    fig = curves_figure(rows, ["reward/total", "loss"])
    try:
        fig.canvas.draw()
        for ax in fig.axes:
            ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
            assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), ticks
    finally:
        plt.close(fig)


def test_plot_of_a_supervised_run_draws_loss_and_validation(tmp_path):
    pytest.importorskip("matplotlib")
    logger = MetricsLogger(tmp_path, tensorboard=False)
    for step in (1, 2, 3):
        logger.log(step, {"loss": 1.0 / step, "val/loss": 1.5 / step, "lr": 1e-4})
    out = logger.plot()
    assert out is not None and out.is_file() and out.stat().st_size > 0
