"""RoutingMonitor on one CPU process: what is recorded when, what each logger gets, the collapse flag, the heatmap,
and how it runs inside DeltaAttnResCallback or on its own."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from test_callback import DAR, EagerModule, lit_module, make_trainer, train_loader
from test_distributed import pattern_data, tiny_config

from lit_dar import DARConfig, get_dar_config, patch_model
from lit_dar.callback import DeltaAttnResCallback
from lit_dar.monitor import RoutingMonitor
from lit_dar.patch import find_router
from lit_dar.plotting import routing_heatmap, routing_matrix


def test_statistics_are_recorded_on_logging_steps_only(tmp_path: Path) -> None:
    recorded: list[bool] = []

    class Spy(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            recorded.append(find_router(pl_module).record_stats)

    module = lit_module()
    callback = DeltaAttnResCallback(DAR, monitor=RoutingMonitor(log_interval=3, image_interval=0))
    make_trainer(tmp_path, [callback, Spy()], max_steps=7).fit(module, train_loader())
    assert recorded == [False, False, True, False, False, True, False]
    assert find_router(module).record_stats is False and find_router(module).last_weights == []


def test_tensorboard_gets_routing_scalars_and_heatmap(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    callback = DeltaAttnResCallback(DAR, monitor=RoutingMonitor(log_interval=2, image_interval=4))
    make_trainer(tmp_path, [callback], max_steps=8, logger=logger).fit(lit_module(), train_loader())

    events = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    expected = {"dar/sharpness", "dar/sharpness_uniform", "dar/collapsed", "dar/lr", "train_loss", "lr"}
    expected |= {f"dar/{kind}/{layer}.{sub}" for kind in ("max_weight", "entropy", "gate") for layer in (2, 3)
                 for sub in ("attn", "mlp")}
    expected |= {"dar/gate/0.attn", "dar/gate/1.mlp"}
    assert expected <= scalars, expected - scalars
    assert "dar/max_weight/0.attn" not in scalars  # one source: nothing to route
    assert [e.step for e in events.Scalars("dar/sharpness")] == [1, 3, 5, 7]
    images = events.Images("dar/routing")
    assert [e.step for e in images] == [3, 7]
    assert images[0].encoded_image_string.startswith(b"\x89PNG") and images[0].width > 200


def test_any_logger_gets_the_scalars(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path, name="csv", version=0)
    monitor = RoutingMonitor(log_interval=2, image_interval=2)  # no TensorBoard: no image, no error
    callback = DeltaAttnResCallback(DAR, monitor=monitor)
    make_trainer(tmp_path, [callback], max_steps=4, logger=logger).fit(lit_module(), train_loader())
    rows = list(csv.DictReader((tmp_path / "csv" / "version_0" / "metrics.csv").open()))
    sharpness = [float(r["dar/sharpness"]) for r in rows if r.get("dar/sharpness")]
    assert len(sharpness) == 2 and all(0.5 <= s <= 1 for s in sharpness)


def test_deep_delta_learning_logs_its_own_statistics(tmp_path: Path) -> None:
    """DDL has no routing weights: the monitor logs mean β and |v − kᵀs| per sublayer, and no heatmap."""
    logger = CSVLogger(tmp_path, name="csv", version=0)
    callback = DeltaAttnResCallback(DARConfig(mode="ddl"), monitor=RoutingMonitor(log_interval=2, image_interval=2))
    module = lit_module()
    make_trainer(tmp_path, [callback], max_steps=4, logger=logger).fit(module, train_loader())
    assert get_dar_config(module.model).mode == "ddl"
    rows = csv.DictReader((tmp_path / "csv" / "version_0" / "metrics.csv").open())
    rows = [r for r in rows if r.get("dar/beta_mean")]
    assert len(rows) == 2
    for row in rows:
        assert 0 < float(row["dar/beta_mean"]) < 2 and float(row["dar/residual_mean"]) >= 0
        assert row["dar/beta/0.attn"] and row["dar/residual/1.mlp"]
    assert "dar/sharpness" not in rows[0] or not rows[0]["dar/sharpness"]


def test_collapse_to_uniform_warns_and_is_logged(tmp_path: Path) -> None:
    # A routing LR far too small keeps the routing at its uniform init: that is the collapse to catch.
    monitor = RoutingMonitor(log_interval=1, image_interval=0, collapse_window=3)
    callback = DeltaAttnResCallback(DAR, routing_lr=1e-12, monitor=monitor)
    with pytest.warns(UserWarning, match="routing has collapsed to uniform"):
        make_trainer(tmp_path, [callback], max_steps=4).fit(lit_module(), train_loader())
    assert monitor.last_metrics["dar/collapsed"] == 1.0
    assert monitor.last_metrics["dar/sharpness"] == pytest.approx(monitor.last_metrics["dar/sharpness_uniform"])

    # Ungated routing learns from the first step (a scalar gate starts closed: uniform until it opens).
    healthy = RoutingMonitor(log_interval=1, image_interval=0, collapse_window=3)
    callback = DeltaAttnResCallback(DARConfig(num_blocks=2), routing_lr=5e-2, monitor=healthy)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*collapsed.*")
        make_trainer(tmp_path, [callback], max_steps=6).fit(lit_module(warmup_steps=0), train_loader())
    assert healthy.last_metrics["dar/collapsed"] == 0.0


def test_heatmap_figure_rows_are_sublayers_and_masks_unseen_sources(tmp_path: Path) -> None:
    from lit_dar import build_model, enable_routing_stats, routing_statistics

    model = build_model(tiny_config(), DARConfig(mode="delta", null_source=True))
    enable_routing_stats(model)
    model(pattern_data(2, seed=3)[:, :-1])
    stats = routing_statistics(model)
    matrix = routing_matrix(stats)
    assert matrix.shape == (8, 9)  # 8 sublayers; null + x0 + 7 completed sublayer outputs
    assert matrix[0, :2].sum() == pytest.approx(1.0) and matrix[0, 2:].isnan().all()
    assert not matrix[-1].isnan().any()
    figure = routing_heatmap(stats, null_source=True, title="test")
    ax = figure.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()][:3] == ["0.attn", "0.mlp", "1.attn"]
    assert [t.get_text() for t in ax.get_xticklabels()][:3] == ["null", "x0", "1"]
    figure.savefig(tmp_path / "routing.png")
    assert (tmp_path / "routing.png").read_bytes().startswith(b"\x89PNG")


def test_the_callback_runs_a_default_monitor_and_saves_its_state(tmp_path: Path) -> None:
    callback = DeltaAttnResCallback(DAR)
    assert isinstance(callback.monitor, RoutingMonitor) and callback.monitor.log_interval is None
    assert callback.monitor.image_interval == 500 and callback.monitor.collapse_window == 10
    make_trainer(tmp_path, [callback], max_steps=4).fit(lit_module(), train_loader())  # log_every_n_steps=2
    assert "dar/sharpness" in callback.monitor.last_metrics
    assert set(callback.state_dict()) == {"dar_config", "collapse_windows", "collapse_warned"}
    assert len(callback.state_dict()["collapse_windows"]["dar"]) == 2

    quiet = DeltaAttnResCallback(DAR, monitor=False)
    module = lit_module()
    make_trainer(tmp_path, [quiet], max_steps=2).fit(module, train_loader())
    assert quiet.monitor is None and set(quiet.state_dict()) == {"dar_config"}
    assert get_dar_config(module.model) == DAR and find_router(module).record_stats is False


def test_a_second_monitor_beside_the_callbacks_own_is_refused(tmp_path: Path) -> None:
    module = EagerModule()
    with pytest.raises(ValueError, match="has a RoutingMonitor and the DeltaAttnResCallback runs one of its own"):
        make_trainer(tmp_path, [DeltaAttnResCallback(DAR), RoutingMonitor()], max_steps=1).fit(module, train_loader())
    assert get_dar_config(module.model) is None
    make_trainer(tmp_path, [DeltaAttnResCallback(DAR, monitor=False), RoutingMonitor()], max_steps=1).fit(
        module, train_loader()
    )


def test_monitor_on_its_own_logs_a_model_patched_without_the_callback(tmp_path: Path) -> None:
    module = EagerModule()
    patch_model(module.model, DAR)
    monitor = RoutingMonitor(log_interval=2, image_interval=0)
    make_trainer(tmp_path, [monitor], max_steps=4).fit(module, train_loader())
    assert {"dar/sharpness", "dar/gate/0.attn", "dar/max_weight/2.mlp"} <= set(monitor.last_metrics)
    assert "dar/lr" not in monitor.last_metrics  # no routing group: the module built its own optimizer
    assert monitor.state_key == "RoutingMonitor" and len(monitor.state_dict()["collapse_windows"]["dar"]) == 2

    with pytest.raises(ValueError, match="RoutingMonitor found no GPT patched with DAR in EagerModule"):
        make_trainer(tmp_path, [RoutingMonitor()], max_steps=1).fit(EagerModule(), train_loader())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"log_interval": 0}, "log_interval"),
        ({"image_interval": -1}, "image_interval"),
        ({"collapse_threshold": 1.5}, "collapse_threshold"),
        ({"collapse_window": 0}, "collapse_window"),
    ],
)
def test_bad_monitor_options_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RoutingMonitor(**kwargs)
