"""Loss curves: the smoothing, and what the written PNG holds."""

from PIL import Image

from vlmtune.train.plot import plot_loss, smooth

TAB_BLUE, TAB_ORANGE = (31, 119, 180), (255, 127, 14)  # matplotlib's default train / eval colours here


def test_smooth_is_a_centred_moving_average():
    assert smooth([1.0, 2.0, 3.0, 4.0]) == [1.5, 2.0, 3.0, 3.5]
    assert smooth([]) == []
    # about 5% of the points on each side: 80 points average over 2 neighbours each way
    assert smooth([0.0] * 40 + [5.0] * 40)[38:42] == [1.0, 2.0, 3.0, 4.0]


def _colours(path) -> set:
    with Image.open(path) as im:
        assert (im.format, im.size) == ("PNG", (800, 450))  # figsize 8 x 4.5 at 100 dpi
        return {px[:3] for px in im.convert("RGB").getdata()}


def test_plot_loss_needs_something_logged(tmp_path):
    assert plot_loss([{"train_runtime": 1.0}], str(tmp_path)) is None
    assert list(tmp_path.iterdir()) == []


def test_plot_loss_draws_train_and_eval_curves(tmp_path):
    history = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}, {"step": 2, "eval_loss": 1.5}]
    path = plot_loss(history, str(tmp_path))
    assert path == str(tmp_path / "training_loss.png")
    assert {TAB_BLUE, TAB_ORANGE} <= _colours(path)


def test_plot_loss_without_eval_has_no_eval_curve(tmp_path):
    path = plot_loss([{"step": s, "loss": 1.0 / s} for s in range(1, 20)], str(tmp_path), name="t.png")
    assert path == str(tmp_path / "t.png")
    colours = _colours(path)
    assert TAB_BLUE in colours and TAB_ORANGE not in colours


def test_plot_loss_eval_only(tmp_path):
    colours = _colours(plot_loss([{"step": 5, "eval_loss": 0.5}], str(tmp_path)))
    assert TAB_ORANGE in colours and TAB_BLUE not in colours
