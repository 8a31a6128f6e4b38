"""NNI's quantizers on slimtorch.quant: each trains (or calibrates) an MNIST classifier at few bits and keeps
its accuracy close to fp32 trained as long; what they run on is said (simulated), and NNI's config keys
(NNI 2 and NNI 3 spellings) are read."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

from conftest import DATA_DIR
from slimtorch import apply_masks_, compute_masks, is_masked
from slimtorch.compat.nni import quantization
from slimtorch.compat.nni.compression.quantization import (
    BNNQuantizer,
    DoReFaQuantizer,
    LsqQuantizer,
    PtqQuantizer,
    QATQuantizer,
)
from slimtorch.data import load_digits, load_mnist
from slimtorch.errors import ConfigError, NoMatchError
from slimtorch.prune.loop import Evaluator
from slimtorch.quant import QuantConfig, convert_qat, quant_info, quantize, quantize_
from slimtorch.quant.fakequant import RangeQuantizer
from slimtorch.quant.saving import load_quantized, save_quantized
from slimtorch.quant.targets import plan_quant_layers

FINE_TUNE_EPOCHS = 2


@pytest.fixture(scope="module")
def trained():
    """MNIST (4,000 training images) when the data folder is there, scikit-learn's digits otherwise; an MLP
    with BatchNorm and Hardtanh (binarised activations need centred inputs), trained 3 epochs."""
    data = load_mnist(DATA_DIR, limit=4000) if (DATA_DIR / "mnist_train.npz").is_file() else load_digits()
    torch.manual_seed(0)
    features = data.x_train[0].numel()
    model = nn.Sequential(nn.Flatten(), nn.Linear(features, 256), nn.BatchNorm1d(256), nn.Hardtanh(),
                          nn.Linear(256, 256), nn.BatchNorm1d(256), nn.Hardtanh(), nn.Linear(256, 10))
    evaluator = Evaluator(train_data=data.loader("train", 64, shuffle=True), eval_data=data.loader("test", 500),
                          lr=2e-3)
    evaluator.train_(model, epochs=3)
    fp32 = copy.deepcopy(model)
    evaluator.train_(fp32, epochs=FINE_TUNE_EPOCHS)  # the reference trains as long as the quantizers do
    return model, evaluator, evaluator.evaluate(fp32)


LINEARS = {"op_types": ["Linear"]}

CASES = [  # (quantizer, config list, epochs of quantization-aware training, allowed drop against fp32)
    (QATQuantizer, [{**LINEARS, "quant_types": ["weight", "input"], "quant_bits": 8}], FINE_TUNE_EPOCHS, 0.02),
    (PtqQuantizer, [{**LINEARS, "target_names": ["weight", "_input_"], "quant_dtype": "int8"}], None, 0.02),
    (DoReFaQuantizer, [{**LINEARS, "quant_types": ["weight"], "quant_bits": 4}], FINE_TUNE_EPOCHS, 0.04),
    (LsqQuantizer, [{**LINEARS, "target_names": ["weight", "_input_"], "quant_dtype": "int4",
                     "quant_scheme": "symmetric"}], FINE_TUNE_EPOCHS, 0.03),
    (BNNQuantizer, [{**LINEARS, "quant_types": ["weight", "input"]}], FINE_TUNE_EPOCHS, 0.10),
]


@pytest.mark.parametrize(("cls", "config_list", "epochs", "drop"), CASES, ids=[c[0].__name__ for c in CASES])
def test_quantizer_keeps_accuracy_and_says_it_is_simulated(trained, cls, config_list, epochs, drop):
    base, evaluator, fp32 = trained
    model = copy.deepcopy(base)
    returned, calibration = cls(model, config_list, evaluator).compress(None, epochs)
    info = quant_info(model)
    assert returned is model and info.kernels == "simulated" and info.layers == ("1", "4", "7")
    accuracy = evaluator.evaluate(model)
    assert accuracy >= fp32 - drop, (cls.__name__, accuracy, fp32)
    assert set(calibration) == {"1", "4", "7"}
    bits = calibration["1"]["weight"]["bits"]
    assert bits == {QATQuantizer: 8, PtqQuantizer: 8, DoReFaQuantizer: 4, LsqQuantizer: 4, BNNQuantizer: 1}[cls]


def test_bnn_binarises_weights_and_activations(trained):
    base, evaluator, _ = trained
    model = copy.deepcopy(base)
    BNNQuantizer(model, [{**LINEARS, "quant_types": ["weight", "input"]}], evaluator).compress(2, None)
    layer = model[4]
    seen = {}
    layer.register_forward_hook(lambda m, args, out: seen.update(x=m.input_quantizer(args[0])))
    model.eval()(next(iter(evaluator.eval_data))[0])
    assert set(seen["x"].unique().tolist()) == {-1.0, 1.0}  # activations: +-1
    weight = layer.weight_quantizer(layer.weight)
    magnitude = weight.abs().amax(dim=1, keepdim=True).expand_as(weight)
    torch.testing.assert_close(weight.abs(), magnitude)  # one magnitude per output row
    x = torch.tensor([-2.0, -0.5, 0.5, 2.0], requires_grad=True)
    layer.input_quantizer(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0]  # straight through, cancelled where |x| > 1


def test_bnn_warns_when_the_binarised_activation_is_never_negative():
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    evaluator = Evaluator(train_data=[(torch.randn(8, 4), torch.randint(0, 2, (8,)))], lr=1e-3)
    with pytest.warns(UserWarning, match="never negative"):
        BNNQuantizer(net, [{"op_names": ["2"], "quant_types": ["input"]}], evaluator).compress(1, None)


def test_lsq_learns_its_step_sizes(trained):
    base, evaluator, _ = trained
    model = copy.deepcopy(base)
    quantizer = LsqQuantizer(model, [{**LINEARS, "quant_types": ["weight"], "quant_bits": 4,
                                      "quant_scheme": "symmetric"}], evaluator)
    quantizer.compress(1, None)
    start = float(model[1].weight_quantizer.scale.detach())
    evaluator.train_(model, max_steps=5)
    assert float(model[1].weight_quantizer.scale.detach()) != start  # a parameter the optimizer trains


def test_ptq_calibrates_ranges_then_quantizes_to_the_grid(trained):
    base, evaluator, _ = trained
    model = copy.deepcopy(base)
    PtqQuantizer(model, [{"op_names": ["4"], "quant_types": ["input", "output"], "quant_bits": 4,
                          "quant_dtype": "uint"}], evaluator).compress(3)
    quantizer = model[4].output_quantizer
    assert isinstance(quantizer, RangeQuantizer) and bool(quantizer.observed)
    scale, zero = quantizer.scale_zero_point(quantizer.min_val, quantizer.max_val)
    out = model[4](torch.randn(16, 256))
    levels = torch.round(out / scale) + zero
    torch.testing.assert_close(levels, levels.clamp(0, 15))  # 4-bit unsigned: 16 levels
    assert torch.allclose((out / scale).round() * scale, out, atol=1e-5)


def test_nni2_style_with_the_loops_optimizer(trained):
    """NNI 2: QAT_Quantizer(model, config_list, optimizer, dummy_input); compress() only quantizes, the
    caller's loop trains, and the optimizer has the quantizers' new parameters (LSQ's step sizes)."""
    base, evaluator, _ = trained
    model = copy.deepcopy(base)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, _ = next(iter(evaluator.train_data))
    assert quantization.QAT_Quantizer is QATQuantizer
    assert LsqQuantizer(model, [{**LINEARS, "quant_types": ["weight"], "quant_bits": 8,
                                 "quant_scheme": "per_tensor_symmetric"}], optimizer, x).compress() is model
    scales = {id(m.weight_quantizer.scale) for m in (model[1], model[4], model[7])}
    assert scales <= {id(p) for group in optimizer.param_groups for p in group["params"]}


def test_export_model_saves_what_load_quantized_reads(trained, tmp_path):
    base, evaluator, _ = trained
    model = copy.deepcopy(base)
    cfg = [{**LINEARS, "quant_types": ["weight", "input"], "quant_bits": {"weight": 4, "input": 8},
            "granularity": {"weight": "per_channel"}}]
    quantizer = QATQuantizer(model, cfg, evaluator)
    quantizer.compress(3, None)
    calibration = quantizer.export_model(str(tmp_path / "model.safetensors"), str(tmp_path / "calibration.json"))
    assert len(calibration["1"]["weight"]["scale"]) == 256  # per output channel
    x = next(iter(evaluator.eval_data))[0]
    loaded = load_quantized(copy.deepcopy(base), tmp_path / "model.safetensors", example_inputs=x[:2])
    torch.testing.assert_close(loaded.eval()(x), model.eval()(x))
    assert (tmp_path / "calibration.json").is_file()


@pytest.mark.parametrize(("entry", "match"), [
    ({**LINEARS, "quant_types": ["weight"], "quant_bits": 8, "sparse_ratio": 0.5}, "pruning key"),
    ({**LINEARS, "quant_types": ["bias"]}, "biases stay in float"),
    ({**LINEARS, "quant_types": ["weight"], "quant_bits": 8, "quant_dtype": "int4"}, "says 4 bits"),
    ({**LINEARS, "quant_types": ["input"], "granularity": "per_channel"}, "for weights"),
    ({**LINEARS, "quant_types": ["weight"], "quant_scheme": "per_row"}, "quant_scheme must be"),
    ({**LINEARS, "quant_typo": ["weight"]}, "unknown quantization key"),
    ({"op_types": ["ReLU"], "quant_types": ["weight"]}, "matches no layer"),
    ({"op_types": ["Hardtanh"], "quant_types": ["weight"]}, "Linear and Conv1d/2d/3d layers only"),
    ({"op_names": ["fc9"], "quant_types": ["weight"]}, "matches no module"),
])
def test_bad_config_lists_fail_at_construction_and_leave_the_model_alone(trained, entry, match):
    base, evaluator, _ = trained
    model = copy.deepcopy(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=match):
        QATQuantizer(model, [entry], evaluator)
    assert quant_info(model) is None and type(model[1]) is nn.Linear
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_method_specific_refusals(trained):
    base, evaluator, _ = trained
    with pytest.raises(ConfigError, match="BNN binarises to"):
        BNNQuantizer(copy.deepcopy(base), [{**LINEARS, "quant_types": ["weight"], "quant_bits": 8}],
                     evaluator).compress(1)
    with pytest.raises(ConfigError, match="symmetric"):
        LsqQuantizer(copy.deepcopy(base), [{**LINEARS, "quant_types": ["weight"], "quant_scheme": "affine"}],
                     evaluator).compress(1)
    with pytest.raises(ConfigError, match="max_steps or max_epochs"):
        QATQuantizer(copy.deepcopy(base), [{**LINEARS, "quant_types": ["weight"]}], evaluator).compress()
    with pytest.raises(ConfigError, match="Evaluator"):
        QATQuantizer(copy.deepcopy(base), [{**LINEARS, "quant_types": ["weight"]}], "trainer")


def test_later_entries_override_per_tensor_and_exclude_removes(trained):
    base, _, _ = trained
    cfg = QuantConfig(method="qat_minmax", targets=[
        {**LINEARS, "quant_types": ["weight", "input"], "quant_bits": 8},
        {"op_names": ["7"], "quant_types": ["weight"], "quant_bits": 4},
        {"op_names": ["4"], "exclude": True},
    ])
    plan = plan_quant_layers(base, cfg.targets)
    assert sorted(plan) == ["1", "7"]
    assert plan["7"]["weight"].bits == 4 and plan["7"]["input"].bits == 8
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg


def test_selectors_of_a_quantization_config_name_the_closest_module(trained):
    base, evaluator, _ = trained
    with pytest.raises(NoMatchError, match="closest real names"):
        PtqQuantizer(copy.deepcopy(base), [{"op_names": ["10"], "quant_types": ["weight"]}], evaluator)


def test_pruned_weights_stay_pruned_through_quantization_aware_training(trained):
    base, evaluator, _ = trained
    model = copy.deepcopy(base)
    masks = compute_masks(model, [{"op_types": ["Linear"], "sparse_ratio": 0.5, "granularity": "fine"}],
                          criterion="magnitude")
    apply_masks_(model, masks)
    QATQuantizer(model, [{**LINEARS, "quant_types": ["weight", "input"], "quant_bits": 8}], evaluator).compress(5)
    assert type(model[1]).__name__ == "QuantLinear" and is_masked(model)
    for name in ("1", "4", "7"):
        layer = model.get_submodule(name)
        assert bool((layer.weight[~masks[f"{name}.weight"]] == 0).all())
        assert bool((layer.weight_quantizer(layer.weight)[~masks[f"{name}.weight"]] == 0).all())  # symmetric: 0 is 0


def test_quantize_and_quantize_on_slimtorch_quant_directly(trained):
    base, evaluator, _ = trained
    x = next(iter(evaluator.eval_data))[0]
    cfg = QuantConfig(method="ptq_minmax", op_types=("Linear",))
    with pytest.raises(ConfigError, match="calibration"):
        quantize(base, cfg)
    q = quantize(base, cfg, calibration=[x[:100], x[100:200]])  # pure: base stays float
    assert type(base[1]) is nn.Linear and quant_info(q).describe().startswith("ptq_minmax (w8a8): simulated")
    inplace = copy.deepcopy(base)
    quantize_(inplace, cfg, calibration=[x[:100], x[100:200]])
    torch.testing.assert_close(inplace.eval()(x), q.eval()(x))
    with pytest.raises(ConfigError, match="takes no 'targets'"):
        QuantConfig(method="dynamic_int8", targets=[{**LINEARS, "quant_types": ["weight"]}])
    with pytest.raises(ConfigError, match="not both"):
        QuantConfig(method="lsq", op_types=("Linear",), targets=[{**LINEARS, "quant_types": ["weight"]}])


@pytest.mark.parametrize("method", ["qat_minmax", "ptq_minmax", "dorefa", "bnn", "lsq"])
def test_fake_quantized_models_save_and_load_exactly(trained, tmp_path, method):
    base, evaluator, _ = trained
    x = next(iter(evaluator.eval_data))[0][:64]
    targets = [{**LINEARS, "quant_types": ["weight", "input"]}, {"op_types": ["Hardtanh"], "quant_types": ["output"]}]
    if method == "dorefa":
        targets[1]["op_types"] = ["BatchNorm1d"]  # DoReFa's activations are [0, 1]; a Hardtanh output is not
    q = quantize(base, QuantConfig(method=method, targets=targets), calibration=[x])
    save_quantized(q, tmp_path / "q.safetensors")
    loaded = load_quantized(copy.deepcopy(base), tmp_path / "q.safetensors", example_inputs=x[:2])
    torch.testing.assert_close(loaded.eval()(x), q.eval()(x))
    assert quant_info(loaded) == quant_info(q)


def test_the_real_int8_counterparts_run_on_int8_kernels(trained):
    """The quantizers simulate; static_int8 (calibrated, as PTQ) and qat_int8 converted (trained, as QAT) are
    what real int8 kernels run, on the same model and at about the same accuracy."""
    base, evaluator, fp32 = trained
    calibration = [x for x, _ in itertools.islice(iter(evaluator.train_data), 16)]
    static = quantize(base, QuantConfig(method="static_int8"), calibration=calibration)
    qat = quantize(base, QuantConfig(method="qat_int8"), example_inputs=calibration[0][:2])
    evaluator.train_(qat, epochs=FINE_TUNE_EPOCHS)
    converted = convert_qat(qat)
    for model in (static, converted):
        assert quant_info(model).kernels == "real" and quant_info(model).weight_bits == 8
    assert evaluator.evaluate(static) >= evaluator.evaluate(base) - 0.02
    assert evaluator.evaluate(converted) >= fp32 - 0.02
