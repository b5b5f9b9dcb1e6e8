from vlmtune.train.plot import plot_loss, smooth


def test_smooth_is_a_centred_moving_average():
    assert smooth([1.0, 2.0, 3.0, 4.0]) == [1.5, 2.0, 3.0, 3.5]
    assert smooth([]) == []


def test_plot_loss_needs_something_logged(tmp_path):
    assert plot_loss([{"train_runtime": 1.0}], str(tmp_path)) is None
    path = plot_loss([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}, {"step": 2, "eval_loss": 1.5}], str(tmp_path))
    assert path == str(tmp_path / "training_loss.png")
