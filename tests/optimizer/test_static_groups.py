"""The compute nodes a static model runs on 8-bit activations, first layers first; the wider ranges
auto mode tries first."""

from __future__ import annotations

from optimizer.registry import create_pass
from optimizer.verify.static_groups import static_groups
from tests.helpers.quantize_checks import heavy_tail_model, quantize
from tests.helpers.samples import seeded_feeds


def test_static_groups_are_the_compute_nodes_reading_quantized_activations_in_graph_order():
    model = heavy_tail_model()
    calibration = seeded_feeds(model, count=8, seed=3)
    whole, _ = quantize(model, calibration=calibration, mode="static")
    assert static_groups(whole.model) == ["conv1", "conv2"]
    backed_off, _ = quantize(model, calibration=calibration, mode="static", int8_weight_only_nodes=("conv1",))
    assert static_groups(backed_off.model) == ["conv2"]
    weights, _ = quantize(model, mode="weights")
    assert static_groups(weights.model) == []
    assert static_groups(model) == []


def test_wider_ranges_are_offered_only_for_percentile_calibration():
    assert create_pass("quantize", mode="static").unclipped_options() == {"percentile": 100.0}
    assert create_pass("quantize", mode="static", calibration_method="minmax").unclipped_options() == {}
    assert create_pass("quantize", mode="static", percentile=100.0).unclipped_options() == {}
    assert create_pass("cleanup").unclipped_options() == {}
