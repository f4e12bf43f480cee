"""Probe: what onnxruntime runs, and how fast, for a MobileNetV3-style block in static int8, with and
without the quantize pass's integer forms (BatchNorm folded, HardSwish/HardSigmoid as
QLinearAdd + saturating QuantizeLinear + QLinearMul, scalar Mul/Div folded into scales).

A stack of ``--blocks`` blocks: Conv 1x1 -> BatchNorm -> HardSwish (x * Clip(x + 3, 0, 6) / 6, the
form paddle2onnx writes) -> depthwise Conv 3x3 -> squeeze-excitation (GlobalAveragePool, Conv,
Relu, Conv, HardSigmoid, Mul) -> Conv 1x1 -> Add (residual). Prints the op types onnxruntime runs
for each variant and the paired latency ratios to fp32 (``optimizer.verify.benchmark``, interleaved).

    python benchmarks/probe_integer_forms.py [--channels 64] [--size 56] [--blocks 6] [--rounds 60]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import passes  # noqa: E402,F401
from optimizer.pass_base import PassContext  # noqa: E402
from optimizer.pipeline import Pipeline  # noqa: E402
from optimizer.registry import create_pass  # noqa: E402
from optimizer.verify.benchmark import benchmark  # noqa: E402


def _block(rng, index: int, source: str, channels: int) -> tuple[list, list, str]:
    p = f"b{index}_"
    inits = [numpy_helper.from_array(np.asarray(v, np.float32), p + n) for n, v in (
        ("w1", rng.standard_normal((channels, channels, 1, 1)) / np.sqrt(channels)),
        ("bn_s", rng.random(channels) + 0.5), ("bn_b", rng.standard_normal(channels) * 0.1),
        ("bn_m", rng.standard_normal(channels) * 0.1), ("bn_v", rng.random(channels) + 0.5),
        ("dw", rng.standard_normal((channels, 1, 3, 3)) / 3), ("dwb", rng.standard_normal(channels) * 0.1),
        ("se1", rng.standard_normal((channels // 4, channels, 1, 1)) / np.sqrt(channels)),
        ("se2", rng.standard_normal((channels, channels // 4, 1, 1)) / np.sqrt(channels / 4)),
        ("w2", rng.standard_normal((channels, channels, 1, 1)) / np.sqrt(channels)),
        ("three", 3.0), ("zero", 0.0), ("six", 6.0))]  # fmt: skip
    nodes = [
        helper.make_node("Conv", [source, p + "w1"], [p + "c1"]),
        helper.make_node("BatchNormalization", [p + "c1", p + "bn_s", p + "bn_b", p + "bn_m", p + "bn_v"], [p + "bn"]),
        helper.make_node("Add", [p + "bn", p + "three"], [p + "a"]),
        helper.make_node("Clip", [p + "a", p + "zero", p + "six"], [p + "r6"]),
        helper.make_node("Mul", [p + "bn", p + "r6"], [p + "m"]),
        helper.make_node("Div", [p + "m", p + "six"], [p + "hs"]),
        helper.make_node("Conv", [p + "hs", p + "dw", p + "dwb"], [p + "d"], group=channels, pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", [p + "d"], [p + "g"]),
        helper.make_node("Conv", [p + "g", p + "se1"], [p + "s1"]),
        helper.make_node("Relu", [p + "s1"], [p + "s1r"]),
        helper.make_node("Conv", [p + "s1r", p + "se2"], [p + "s2"]),
        helper.make_node("HardSigmoid", [p + "s2"], [p + "gate"], alpha=1 / 6, beta=0.5),
        helper.make_node("Mul", [p + "d", p + "gate"], [p + "se"]),
        helper.make_node("Conv", [p + "se", p + "w2"], [p + "c2"]),
        helper.make_node("Add", [p + "c2", source], [p + "out"]),
    ]
    return nodes, inits, p + "out"


def stack(channels: int, size: int, blocks: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes, inits, source = [], [], "x"
    for index in range(blocks):
        more, weights, source = _block(rng, index, source, channels)
        nodes += more
        inits += weights
    nodes.append(helper.make_node("Identity", [source], ["y"]))
    graph = helper.make_graph(nodes, "mobile_stack",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, size, size])],
                              inits)  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def run_ops(path: Path) -> Counter:
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(path.with_suffix(".ran.onnx"))
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--size", type=int, default=56)
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=60)
    args = parser.parse_args()
    model = stack(args.channels, args.size, args.blocks)
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.standard_normal((1, args.channels, args.size, args.size)).astype(np.float32)} for _ in range(16)]
    folder = Path(tempfile.mkdtemp(prefix="probe-integer-forms-"))
    paths = {"fp32": folder / "fp32.onnx"}
    onnx.save(model, paths["fp32"])
    context = PassContext(calibration=lambda: iter(feeds))
    for name, forms in (("static, float islands", False), ("static, integer forms", True)):
        quantize = create_pass("quantize", mode="static", integer_forms=forms)
        paths[name] = folder / f"{name.replace(', ', '_').replace(' ', '_')}.onnx"
        onnx.save(Pipeline([quantize], context=context).run(model).model, paths[name])
    for name, path in paths.items():
        print(f"{name}: {dict(sorted(run_ops(path).items(), key=lambda item: -item[1]))}")
    timings = benchmark([paths["fp32"], paths["fp32"], *list(paths.values())[1:]], feeds[:1],
                        names=["fp32", "fp32 again (noise floor)", *list(paths)[1:]], threads=2, rounds=args.rounds)
    print(timings.to_markdown())


if __name__ == "__main__":
    main()
