import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from optimizer.calibration.feeds import (
    InputSpec,
    check_feeds,
    check_npz_feeds,
    generate_feeds,
    load_npz_feeds,
    metadata_shapes,
    model_input_specs,
    parse_shape_overrides,
    resolve_shapes,
    session_input_specs,
)
from optimizer.cli import main
from optimizer.errors import FeedError
from optimizer.verify.runtime import create_session, resolve_provider


def bert_like_model() -> onnx.ModelProto:
    """Three int64 inputs sharing symbolic dims, plus a weight that is also listed as an input."""
    inputs = [
        helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "sequence"])
        for name in ("input_ids", "attention_mask", "token_type_ids")
    ]
    inputs.append(helper.make_tensor_value_info("bias", TensorProto.INT64, [1]))
    nodes = [
        helper.make_node("Add", ["input_ids", "attention_mask"], ["t0"]),
        helper.make_node("Add", ["t0", "token_type_ids"], ["t1"]),
        helper.make_node("Add", ["t1", "bias"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "bert_like",
        inputs,
        [helper.make_tensor_value_info("out", TensorProto.INT64, ["batch", "sequence"])],
        [numpy_helper.from_array(np.array([1], dtype=np.int64), "bias")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


IMAGE = InputSpec("pixels", np.dtype(np.float32), (None, 3, "height", "width"))
IDS = InputSpec("input_ids", np.dtype(np.int64), ("batch", "sequence"))
MASK = InputSpec("attention_mask", np.dtype(np.int64), ("batch", "sequence"))


def test_model_input_specs_skip_initializers_and_keep_dims():
    specs = model_input_specs(bert_like_model())
    assert [spec.name for spec in specs] == ["input_ids", "attention_mask", "token_type_ids"]
    assert all(spec.dtype == np.int64 and spec.shape == ("batch", "sequence") for spec in specs)


def test_session_input_specs_match_model_specs():
    model = bert_like_model()
    session, _ = create_session(model, resolve_provider("cpu"))
    assert session_input_specs(session) == model_input_specs(model)


def test_unnamed_dims_and_unknown_rank():
    value_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3])
    no_shape = helper.make_tensor_value_info("s", TensorProto.FLOAT, None)
    graph = helper.make_graph([], "g", [value_info, no_shape], [])
    specs = model_input_specs(helper.make_model(graph))
    assert specs[0] == InputSpec("x", np.dtype(np.float32), (None, 3))
    assert specs[1].rank_known is False


def test_parse_shape_overrides():
    parsed = parse_shape_overrides(["input_ids=1x128", "x=1,3,224,224", "a=b=2x3", "past=1x0"])
    assert parsed == {"input_ids": (1, 128), "x": (1, 3, 224, 224), "a=b": (2, 3), "past": (1, 0)}


@pytest.mark.parametrize("item", ["x", "x=", "x=1xa", "=1x2", "x=1x-2", "x=1xx2"])
def test_bad_shape_override_names_the_item(item):
    with pytest.raises(FeedError, match=f"bad shape override {item!r}"):
        parse_shape_overrides([item])


def test_duplicate_shape_override():
    with pytest.raises(FeedError, match="given twice"):
        parse_shape_overrides(["x=1", "x=2"])


def test_generated_feeds_are_deterministic():
    first = generate_feeds([IMAGE, IDS], count=3, seed=7)
    second = generate_feeds([IMAGE, IDS], count=3, seed=7)
    other_seed = generate_feeds([IMAGE, IDS], count=3, seed=8)
    assert len(first) == 3
    for a, b in zip(first, second, strict=True):
        assert a.keys() == b.keys()
        assert all(np.array_equal(a[name], b[name]) for name in a)
    assert not np.array_equal(first[0]["pixels"], other_seed[0]["pixels"])
    assert not np.array_equal(first[0]["pixels"], first[1]["pixels"])


def test_default_dims_follow_the_documented_rule():
    specs = [
        IMAGE,
        IDS,
        MASK,
        InputSpec("state", np.dtype(np.float32), ("steps", "batch_size", "hidden", 5)),
    ]
    shapes = resolve_shapes(specs)
    assert shapes == {
        "pixels": (1, 3, 64, 64),  # image-like: a size detectors (stride 32) can run
        "input_ids": (1, 16),
        "attention_mask": (1, 16),
        "state": (16, 1, 8, 5),
    }


def test_override_binds_named_dims_for_other_inputs():
    feeds = generate_feeds([IDS, MASK], count=1, shapes={"attention_mask": (2, 128)})
    assert feeds[0]["input_ids"].shape == (2, 128)
    assert feeds[0]["attention_mask"].shape == (2, 128)


def test_override_for_unknown_input_lists_inputs():
    with pytest.raises(
        FeedError, match="unknown input\\(s\\) tokens; model inputs: input_ids, attention_mask"
    ):
        generate_feeds([IDS, MASK], shapes={"tokens": (1, 4)})


def test_override_must_fit_rank_and_fixed_dims():
    with pytest.raises(FeedError, match="'pixels' has rank 3, model expects rank 4"):
        generate_feeds([IMAGE], shapes={"pixels": (1, 3, 8)})
    with pytest.raises(FeedError, match="'pixels' sets dim 1 to 4, model fixes it to 3"):
        generate_feeds([IMAGE], shapes={"pixels": (1, 4, 8, 8)})


def test_unknown_rank_needs_an_override():
    spec = InputSpec("s", np.dtype(np.float32), (), rank_known=False)
    with pytest.raises(FeedError, match="'s' has no shape in the model; pass a shape override"):
        generate_feeds([spec])
    assert generate_feeds([spec], shapes={"s": (2, 5)})[0]["s"].shape == (2, 5)


def test_value_ranges_per_dtype_and_name():
    specs = [
        IDS,
        MASK,
        InputSpec("token_type_ids", np.dtype(np.int32), ("batch", "sequence")),
        InputSpec("position_ids", np.dtype(np.int64), ("batch", "sequence")),
        InputSpec("flags", np.dtype(np.bool_), (64, 64)),
        InputSpec("x", np.dtype(np.float32), (64, 64)),
        InputSpec("h", np.dtype(np.float16), (2,)),
        InputSpec("gather_index", np.dtype(np.uint8), (256,)),
    ]
    feed = generate_feeds(specs, count=1, shapes={"input_ids": (4, 32)})[0]
    assert {name: feed[name].dtype for name in feed} == {spec.name: spec.dtype for spec in specs}
    assert feed["input_ids"].min() >= 0 and feed["input_ids"].max() < 100
    assert len(np.unique(feed["input_ids"])) > 10
    assert np.all(feed["attention_mask"] == 1)
    assert np.all(feed["token_type_ids"] == 0) and feed["token_type_ids"].shape == (4, 32)
    assert np.array_equal(feed["position_ids"], np.tile(np.arange(32), (4, 1)))
    assert feed["flags"].any() and not feed["flags"].all()
    assert abs(feed["x"].mean()) < 0.1 and abs(feed["x"].std() - 1.0) < 0.1
    assert feed["gather_index"].max() < 100


def test_dtype_without_a_random_rule():
    with pytest.raises(FeedError, match="cannot generate random data for input 'text'"):
        generate_feeds([InputSpec("text", np.dtype(object), (1,))])


def test_npz_folder_in_sorted_order(tmp_path):
    for name, value in [("b", 2), ("a", 1), ("c", 3)]:
        np.savez(tmp_path / f"{name}.npz", x=np.full((1, 2), value, dtype=np.float32))
    (tmp_path / "notes.txt").write_text("ignored")
    feeds = list(load_npz_feeds(tmp_path))
    assert [float(feed["x"][0, 0]) for feed in feeds] == [1.0, 2.0, 3.0]
    assert list(feeds[0]) == ["x"]


def test_npz_folder_errors(tmp_path):
    with pytest.raises(FeedError, match="does not exist or is not a folder"):
        load_npz_feeds(tmp_path / "missing")
    file = tmp_path / "file.npz"
    np.savez(file, x=np.zeros(1))
    with pytest.raises(FeedError, match="not a folder"):
        load_npz_feeds(file)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FeedError, match=r"holds no \.npz files"):
        load_npz_feeds(empty)


def test_bad_npz_file_is_named(tmp_path):
    np.savez(tmp_path / "0.npz", x=np.zeros(1))
    (tmp_path / "1.npz").write_bytes(b"not a zip archive")
    feeds = load_npz_feeds(tmp_path)
    assert next(feeds)["x"].shape == (1,)
    with pytest.raises(FeedError, match=r"1\.npz"):
        next(feeds)


def test_pickled_npz_is_refused(tmp_path):
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(FeedError, match=r"obj\.npz"):
        list(load_npz_feeds(tmp_path))


def test_empty_npz_is_refused(tmp_path):
    np.savez(tmp_path / "nothing.npz")
    with pytest.raises(FeedError, match=r"nothing\.npz' holds no arrays"):
        list(load_npz_feeds(tmp_path))


def good_feed() -> dict[str, np.ndarray]:
    return {
        "pixels": np.zeros((2, 3, 5, 5), np.float32),
        "input_ids": np.zeros((2, 7), np.int64),
    }


def test_check_feeds_accepts_dynamic_dims_and_orders_inputs():
    feed = good_feed()
    reordered = {"input_ids": feed["input_ids"], "pixels": feed["pixels"]}
    checked = check_feeds([IMAGE, IDS], [feed, reordered])
    assert [list(sample) for sample in checked] == [["pixels", "input_ids"]] * 2


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda f: f.pop("input_ids"), "sample 1: missing input\\(s\\) input_ids"),
        (lambda f: f.update(extra=np.zeros(1)), "sample 1: unknown input\\(s\\) extra"),
        (
            lambda f: (f.pop("input_ids"), f.update(pixels=np.zeros((3, 5, 5), np.float32))),
            "sample 1, input 'pixels': rank 3 .* expects rank 4 .*; also missing input\\(s\\) input_ids",
        ),
        (
            lambda f: f.update(pixels=f["pixels"].astype(np.float64)),
            "sample 1, input 'pixels': dtype float64, model expects float32",
        ),
        (
            lambda f: f.update(pixels=np.zeros((3, 5, 5), np.float32)),
            "sample 1, input 'pixels': rank 3 .* expects rank 4",
        ),
        (
            lambda f: f.update(pixels=np.zeros((1, 4, 5, 5), np.float32)),
            "sample 1, input 'pixels': dim 1 is 4, model fixes it to 3",
        ),
        (
            lambda f: f.update(input_ids=[[1, 2]]),
            "sample 1, input 'input_ids': expected a numpy array, got list",
        ),
    ],
)
def test_check_feeds_errors_name_sample_input_and_reason(change, message):
    bad = good_feed()
    change(bad)
    with pytest.raises(FeedError, match=message):
        check_feeds([IMAGE, IDS], [good_feed(), bad])


def test_check_feeds_needs_a_sample():
    with pytest.raises(FeedError, match="no feeds"):
        check_feeds([IMAGE], [])


def test_npz_feeds_checked_against_a_model(tmp_path):
    np.savez(
        tmp_path / "0.npz",
        input_ids=np.ones((1, 4), np.int64),
        attention_mask=np.ones((1, 4), np.int64),
    )
    specs = model_input_specs(bert_like_model())
    with pytest.raises(FeedError, match="sample 0: missing input\\(s\\) token_type_ids"):
        check_feeds(specs, load_npz_feeds(tmp_path))


def test_generated_feeds_run_through_onnxruntime():
    model = bert_like_model()
    session, _ = create_session(model, resolve_provider("cpu"))
    feeds = check_feeds(model_input_specs(model), generate_feeds(model_input_specs(model), count=2))
    (out,) = session.run(None, feeds[0])
    np.testing.assert_array_equal(out, feeds[0]["input_ids"] + 2)


def test_errors_in_feed_files_name_the_file(tmp_path, capsys):
    """They said "sample 0"; with a folder of files the user needs the file's name."""
    good = {"input_ids": np.ones((1, 4), np.int64), "attention_mask": np.ones((1, 4), np.int64),
            "token_type_ids": np.zeros((1, 4), np.int64)}
    np.savez(tmp_path / "000.npz", **good)
    np.savez(tmp_path / "001.npz", **{**good, "attention_mask": np.ones((1, 4), np.float32)})
    specs = model_input_specs(bert_like_model())
    with pytest.raises(FeedError, match=r"feed file '.*001\.npz', input 'attention_mask': dtype float32"):
        list(check_npz_feeds(specs, tmp_path))
    model = tmp_path / "bert.onnx"
    onnx.save(bert_like_model(), model)
    assert main(["validate", str(model), str(model), "--data", str(tmp_path)]) == 2
    assert "001.npz" in capsys.readouterr().err


def stride_32_model(imgsz: str | None = None) -> onnx.ModelProto:
    """A detector-like body: five stride-2 pools, then 32x upsampling added back to the input; it
    runs only when height and width are multiples of 32 (8x8 fails, like YOLOv8 and PP-OCR det)."""
    pool = {"kernel_shape": [2, 2], "strides": [2, 2]}
    nodes = [helper.make_node("MaxPool", [f"p{i}"], [f"p{i + 1}"], **pool) for i in range(5)]
    nodes[0].input[0] = "images"
    scales = numpy_helper.from_array(np.array([1, 1, 32, 32], np.float32), "scales")
    nodes += [helper.make_node("Resize", ["p5", "", "scales"], ["up"], mode="nearest"),
              helper.make_node("Add", ["images", "up"], ["y"])]
    image = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, "height", "width"])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, "height", "width"])
    model = helper.make_model(helper.make_graph(nodes, "g", [image], [out], [scales]),
                              opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    if imgsz is not None:
        onnx.helper.set_model_props(model, {"imgsz": imgsz})
    return model


def test_generated_images_have_sizes_a_detector_can_run(tmp_path, capsys):
    """An [N, 3, H, W] input with dynamic H, W was fed 8x8; 64x64 by default, the metadata's imgsz when
    the exporter wrote one, and a failure on generated sizes names them and the --shape flag."""
    model = tmp_path / "det.onnx"
    onnx.save(stride_32_model(), model)
    assert main(["validate", str(model), str(model), "--samples", "1"]) == 0
    onnx.save(stride_32_model(imgsz="[96, 160]"), model)
    specs = model_input_specs(onnx.load(model))
    assert metadata_shapes(onnx.load(model), specs) == {"images": (1, 3, 96, 160)}
    assert main(["validate", str(model), str(model), "--samples", "1", "--json"]) == 0
    capsys.readouterr()
    assert main(["validate", str(model), str(model), "--shape", "images=1x3x8x8"]) == 2
    error = capsys.readouterr().err
    assert "the inputs were generated (images=1x3x8x8)" in error and "--shape images=" in error


def test_a_negative_dimension_is_dynamic_as_onnxruntime_reads_it(tmp_path):
    """paddle2onnx writes -1 for a dynamic size (PP-OCR's direction classifier takes [-1, 3, ?, ?]);
    it was refused as bad input. It is dynamic: generated feeds get the default size, and runs pass."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 3, 8])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    assert model_input_specs(model)[0].shape == (None, 3, 8)
    assert generate_feeds(model_input_specs(model), count=1)[0]["x"].shape == (1, 3, 8)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    assert main(["validate", str(path), str(path), "--samples", "1", "--exact"]) == 0
