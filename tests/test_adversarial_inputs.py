"""Adversarial inputs to quantization, export, low-rank, LoRA, reports, distillation, sensitivity, Hugging Face
loading and the command line: each bad input raises its typed error with a message naming the value and the fix,
and leaves the models and the files on disk exactly as they were; each unusual but valid input succeeds with
the right result.

A case runs in a fresh context (:class:`Ctx`: small models, example inputs, a scratch folder and the files the
case needs); a failing case goes through :func:`adversarial.fails_cleanly`, which checks the error class, the
message fragment, and that every model of the context and every file under the scratch folder is unchanged.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import pickle
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from adversarial import assert_same_state, fails_cleanly, model_state
from slimtorch import (
    apply_masks_,
    compact_,
    compute_masks,
    get_masks,
    quantize,
    quantize_,
    report,
    sensitivity_analysis,
)
from slimtorch.cli.main import main
from slimtorch.errors import CheckpointError, ConfigError, ExportError, NoMatchError, SlimWarning, TraceError
from slimtorch.export import export_onnx, export_program, onnx_session, run_onnx
from slimtorch.lora import LoRAConfig, add_lora_, load_lora_, merge_lora_, save_lora
from slimtorch.lowrank import LowRankConfig, factorize_, lowrank_sensitivity, plan_lowrank, ranks_for_tolerance
from slimtorch.models.modelfile import save_model
from slimtorch.models.registry import ModelSpec, build_model
from slimtorch.quant import QuantConfig, convert_qat, sqnr
from slimtorch.quant.onnx import quantize_onnx
from slimtorch.recover.distill import DistillConfig, Distiller, distill_loss
from slimtorch.report import measure_latency

NAN, INF = float("nan"), float("inf")


class CliExit(SystemExit):
    """A command that ended with an error: exit code 2 and exactly one line on stderr (the message)."""

    def __init__(self, code: int, line: str) -> None:
        super().__init__(code)
        self.line = line

    def __str__(self) -> str:
        return self.line


def cli(*argv: object) -> str:
    """Run ``slimtorch ARGV`` in-process; on failure check the promise of docs/cli.md (exit code 2, one line,
    no traceback) and raise :class:`CliExit` with that line; on success return what it printed."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exit_:  # argparse
            code = exit_.code
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    if code == 0:
        return out.getvalue()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err.getvalue(), (code, err.getvalue())
    raise CliExit(code, lines[0])


class Ctx:
    """What one case works on: small eval-mode models, inputs, a scratch folder and prepared files."""

    def __init__(self, tmp: Path, files: dict[str, Path]) -> None:
        torch.manual_seed(0)
        self.tmp, self.files = tmp, files
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
        self.student = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
        self.cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(),
                                 nn.Linear(4 * 4 * 4, 3)).eval()
        self.x, self.img = torch.randn(4, 8), torch.randn(2, 3, 8, 8)
        self.arg: Any = None
        (tmp / "folder").mkdir()
        (tmp / "a_file").write_text("not a folder")

    def models(self) -> list[nn.Module]:
        return [self.mlp, self.student, self.cnn]

    def path(self, name: str) -> Path:
        return self.files[name]


@dataclass(frozen=True)
class Case:
    """``call(ctx)`` must raise ``error`` with ``fragment`` in its message (``error`` None: it must succeed,
    leave the context's models as they were, and ``check(ctx, result)`` must hold). ``needs`` names prepared
    files copied into the case's folder; ``setup(ctx)`` runs before the snapshot (what a user or an attacker
    did beforehand), its result in ``ctx.arg``."""

    id: str
    call: Callable[[Ctx], Any]
    error: type[BaseException] | None
    fragment: str = ""
    needs: tuple[str, ...] = ()
    check: Callable[[Ctx, Any], Any] | None = None
    setup: Callable[[Ctx], Any] | None = None
    changes: bool = False  # a success that changes the context's models on purpose


def _nan_weights(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        next(model.parameters())[0, 0] = NAN
    return model


def _on_fake_cuda() -> nn.Module:
    """A Linear whose weight claims to live on a CUDA device (a fake tensor: no GPU needed)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    model = nn.Linear(8, 4)
    with FakeTensorMode(allow_non_fake_inputs=True):
        weight = torch.empty(4, 8, device="cuda")
    model.weight = nn.Parameter(weight, requires_grad=False)
    return model


def _static(ctx: Ctx, calibration: Any) -> nn.Module:
    return quantize(ctx.mlp, QuantConfig(method="static_int8"), calibration=calibration)


def _close_to_float(ctx: Ctx, q: nn.Module) -> bool:
    with torch.no_grad():
        return sqnr(ctx.mlp(ctx.x), q(ctx.x)) > 20


def _qat(ctx: Ctx) -> nn.Module:
    return quantize(ctx.mlp, QuantConfig(method="qat_int8"), example_inputs=ctx.x)


def _lora(ctx: Ctx) -> nn.Module:
    add_lora_(ctx.mlp, LoRAConfig(target_modules=("0",), r=2))
    return ctx.mlp


def _distiller(ctx: Ctx, features: tuple, example: Any = "x", config: Any = None) -> Distiller:
    x = ctx.x if example == "x" else example
    return Distiller(ctx.mlp, ctx.student, config or DistillConfig(features=features), example_inputs=x)


class _Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm, self.fc = nn.LSTM(8, 6, batch_first=True), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.lstm(x)[0])


def _lstm_hidden_units() -> tuple[nn.Module, nn.Module]:
    """What the LSTM error advises: mask whole hidden units (their rows in every gate, their column of
    weight_hh, the biases) and compact. Returns (compacted, masked copy)."""
    import copy

    from slimtorch import apply_masks_, compact_

    model, x = _Recurrent().eval(), torch.randn(2, 3, 8)
    gone = torch.arange(6) < 2  # hidden units 0 and 1
    rows = ~gone.repeat(4)  # (4 gates * 6,) kept rows
    masks = {"lstm.weight_ih_l0": rows[:, None].expand(24, 8).clone(), "lstm.weight_hh_l0": rows[:, None] & ~gone,
             "lstm.bias_ih_l0": rows, "lstm.bias_hh_l0": rows}
    apply_masks_(model, masks)
    masked = copy.deepcopy(model)
    compact_(model, masks, example_inputs=x)
    return model, masked


def _same_function(compacted: nn.Module, masked: nn.Module) -> bool:
    fresh = torch.randn(3, 5, 8)
    with torch.no_grad():
        torch.testing.assert_close(compacted(fresh), masked(fresh))
    return compacted.lstm.hidden_size == 4 and compacted.fc.in_features == 4


def _edit_config(folder: Path, **changes: Any) -> Path:
    data = json.loads((folder / "config.json").read_text())
    data.update(changes)
    (folder / "config.json").write_text(json.dumps(data))
    return folder


def _plant(folder: Path, *, model_type: str | None = None, arch: str | None = None) -> Path:
    """An attacker's Python file (writes ``marker`` beside the folder when imported) and an auto_map using it."""
    marker = folder.parent / "marker"
    (folder / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n")
    changes: dict[str, Any] = {"auto_map": {"AutoConfig": "evil.C", "AutoModel": "evil.M"}}
    changes.update({k: v for k, v in (("model_type", model_type), ("architectures", [arch] if arch else None)) if v})
    return _edit_config(folder, **changes)


def _pickled(folder: Path) -> Path:
    class Payload:  # unpickling it would create the marker: proof that a loader unpickled the file
        def __reduce__(self):
            return open, (str(folder.parent / "marker"), "w")

    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    return folder


def _hf(ctx: Ctx) -> nn.Module:
    from slimtorch.integrations.hf.folders import load_hf_folder

    return load_hf_folder(ctx.path("bert"))


def _no_marker(ctx: Ctx, model: nn.Module) -> None:
    assert not (ctx.tmp / "marker").exists()
    assert model.encoder.layer[1].attention.self.query.out_features == 16  # the saved, compacted sizes


def _onnx_runs(ctx: Ctx, path: Path, inputs: torch.Tensor) -> None:
    outs = run_onnx(onnx_session(path), inputs)
    assert outs[0].shape == (inputs.shape[0], 4)


def _saved_model(ctx: Ctx, spec: dict[str, Any], name: str = "m.safetensors") -> Path:
    from safetensors.torch import load_file, save_file

    path = ctx.tmp / name
    save_model(path, build_model(ModelSpec(name="DigitsCNN", kwargs={"width": 4})), ModelSpec(name="DigitsCNN"))
    tensors = load_file(str(path))
    save_file(tensors, str(path), metadata={"format": "slimtorch-model-v1", "spec": json.dumps(spec),
                                            "state": "dense"})
    return path


def _three_class_digits(ctx: Ctx) -> Path:
    path = ctx.tmp / "three.safetensors"
    spec = ModelSpec(name="DigitsCNN", kwargs={"width": 4, "num_classes": 3})
    save_model(path, build_model(spec), spec)
    return path


QUANTIZE = [
    Case("quantize: dict config", lambda c: quantize(c.mlp, {"method": "dynamic_int8"}), ConfigError,
         "QuantConfig.from_dict"),
    Case("quantize: list config", lambda c: quantize(c.mlp, ["dynamic_int8"]), ConfigError, "takes a QuantConfig"),
    Case("quantize: method name as config", lambda c: quantize(c.mlp, "dynamic_int8"), ConfigError,
         "takes a QuantConfig"),
    Case("quantize_: dict config", lambda c: quantize_(c.mlp, {"method": "fp16"}), ConfigError, "QuantConfig"),
    Case("quantize: a path instead of a model", lambda c: quantize("model.safetensors", QuantConfig(method="fp16")),
         ConfigError, "torch.nn.Module, got str"),
    Case("quantize: a state dict", lambda c: quantize(c.mlp.state_dict(), QuantConfig(method="fp16")),
         ConfigError, "torch.nn.Module, got OrderedDict"),
    Case("quantize: a model class", lambda c: quantize(nn.Linear, QuantConfig(method="fp16")), ConfigError,
         "the class Linear"),
    Case("quantize_: not a model", lambda c: quantize_(42, QuantConfig(method="fp16")), ConfigError, "got int"),
    Case("quantize: meta model, dynamic int8",
         lambda c: quantize(nn.Linear(8, 4, device="meta"), QuantConfig(method="dynamic_int8")), ConfigError,
         "meta device"),
    Case("quantize_: meta model, int4",
         lambda c: quantize_(nn.Linear(64, 4, device="meta"), QuantConfig(method="int4_weight")), ConfigError,
         "meta device"),
    Case("quantize: int8 of a model on a CUDA device",
         lambda c: quantize(_on_fake_cuda(), QuantConfig(method="dynamic_int8")), ConfigError,
         "model.cpu()"),
    Case("quantize: NaN weight",
         lambda c: quantize(_nan_weights(nn.Sequential(nn.Linear(8, 4))), QuantConfig(method="dynamic_int8")),
         ConfigError, "NaN or infinite values in 'weight'"),
    Case("static int8: calibration of the wrong shape", lambda c: _static(c, [torch.randn(2, 5)]), TraceError,
         "float32[2, 5]"),
    Case("static int8: integer calibration", lambda c: _static(c, [torch.ones(2, 8, dtype=torch.long)]),
         TraceError, "int64[2, 8]"),
    Case("static int8: NaN calibration", lambda c: _static(c, [c.x, torch.full((2, 8), NAN)]), ConfigError,
         "calibration batch 1 hold NaN"),
    Case("static int8: infinite calibration", lambda c: _static(c, [torch.full((2, 8), INF)]), ConfigError,
         "NaN or infinite"),
    Case("static int8: one tensor instead of batches", lambda c: _static(c, c.x), ConfigError,
         "iterable of batches"),
    Case("static int8: a dict instead of batches", lambda c: _static(c, {"x": c.x}), ConfigError,
         "iterable of batches"),
    Case("static int8: batches of strings", lambda c: _static(c, ["abc"]), ConfigError, "batch 0 is str"),
    Case("static int8: an integer", lambda c: _static(c, 3), ConfigError, "got int 3"),
    Case("static int8: empty calibration", lambda c: _static(c, []), ConfigError, "no input batches"),
    Case("static int8: no calibration", lambda c: _static(c, None), ConfigError, "needs calibration"),
    Case("static int8: (x, y, extra) batches", lambda c: _static(c, [(c.x, c.x, c.x)]), ConfigError,
         "holds 3 tensors"),
    Case("static int8: (x, y) batches from a loader", lambda c: _static(c, [(c.x, torch.tensor([0, 1, 2, 3]))]),
         None, check=_close_to_float),
    Case("static int8: [x, y] lists from a DataLoader",
         lambda c: _static(c, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(c.x, torch.arange(4)),
                                                          batch_size=2)), None, check=_close_to_float),
    Case("static int8: quantize_ in place", lambda c: quantize_(c.mlp, QuantConfig(method="static_int8")),
         ConfigError, "cannot change the model in place"),
    Case("qat int8: no example inputs", lambda c: quantize(c.mlp, QuantConfig(method="qat_int8")), ConfigError,
         "example_inputs"),
    Case("qat int8: example inputs of the wrong shape",
         lambda c: quantize(c.mlp, QuantConfig(method="qat_int8"), example_inputs=torch.randn(2, 3)), TraceError,
         "float32[2, 3]"),
    Case("quantize: twice", lambda c: quantize(quantize(c.mlp, QuantConfig(method="fp16")),
                                               QuantConfig(method="dynamic_int8")), ConfigError, "already quantized"),
    Case("convert_qat: a float model", lambda c: convert_qat(c.mlp), ConfigError, "got a float model"),
    Case("quant config: unknown method", lambda c: QuantConfig(method="int3"), ConfigError, "closest real names"),
    Case("quant config: odd group size", lambda c: QuantConfig(method="int4_weight", group_size=3), ConfigError,
         "even integer"),
    Case("quant config: boolean group size", lambda c: QuantConfig(method="int4_weight", group_size=True),
         ConfigError, "group_size"),
    Case("quant config: per_channel as text", lambda c: QuantConfig(method="dynamic_int8", per_channel="yes"),
         ConfigError, "True or False"),
    Case("quant config: op_types as one string", lambda c: QuantConfig(method="fp16", op_types="Linear"),
         ConfigError, "tuple of non-empty strings"),
    Case("quant config: unknown key", lambda c: QuantConfig.from_dict({"method": "fp16", "bits": 3}), ConfigError,
         "allowed keys"),
    Case("quantize: op_names matching nothing",
         lambda c: quantize(c.mlp, QuantConfig(method="dynamic_int8", op_names=("fc9",))), NoMatchError, "fc9"),
    Case("quantize_: group size dividing no row",
         lambda c: quantize_(c.mlp, QuantConfig(method="int4_weight", group_size=32)), ConfigError,
         "not a multiple of group_size=32"),
]

EXPORT = [
    Case("export_onnx: path is a folder", lambda c: export_onnx(c.mlp, c.x, c.tmp / "folder"), ConfigError,
         "is a folder"),
    Case("export_onnx: parent is a file", lambda c: export_onnx(c.mlp, c.x, c.tmp / "a_file" / "m.onnx"),
         ConfigError, "is a file"),
    Case("export_onnx: unwritable place", lambda c: export_onnx(c.mlp, c.x, "/proc/slimtorch/m.onnx"), ConfigError,
         "read-only"),
    Case("export_onnx: not a model", lambda c: export_onnx(c.mlp.state_dict(), c.x, c.tmp / "m.onnx"), ConfigError,
         "torch.nn.Module"),
    Case("export_onnx: meta model", lambda c: export_onnx(nn.Linear(8, 4, device="meta"), c.x, c.tmp / "m.onnx"),
         ConfigError, "meta device"),
    Case("export_onnx: NaN inputs", lambda c: export_onnx(c.mlp, torch.full((2, 8), NAN), c.tmp / "m.onnx"),
         ConfigError, "NaN"),
    Case("export_onnx: NaN weights", lambda c: export_onnx(_nan_weights(nn.Linear(8, 4)), c.x, c.tmp / "m.onnx"),
         ExportError, "cannot be checked"),
    Case("export_onnx: inputs of the wrong shape", lambda c: export_onnx(c.mlp, torch.randn(2, 5), c.tmp / "m.onnx"),
         TraceError, "float32[2, 5]"),
    Case("export_onnx: negative atol", lambda c: export_onnx(c.mlp, c.x, c.tmp / "m.onnx", atol=-1.0), ConfigError,
         "atol"),
    Case("export_onnx: NaN atol", lambda c: export_onnx(c.mlp, c.x, c.tmp / "m.onnx", atol=NAN), ConfigError, "atol"),
    Case("export_onnx: torch.ao int8 model",
         lambda c: export_onnx(quantize(c.mlp, QuantConfig(method="dynamic_int8")), c.x, c.tmp / "m.onnx"),
         ExportError, "quantize_onnx"),
    Case("export_onnx: fake-quantized training model", lambda c: export_onnx(_qat(c), c.x, c.tmp / "m.onnx"),
         ExportError, "convert_qat"),
    Case("export_onnx: missing parent folders are created",
         lambda c: export_onnx(c.mlp, c.x, c.tmp / "new" / "deeper" / "m.onnx"), None,
         check=lambda c, r: _onnx_runs(c, Path(r.path), torch.randn(5, 8))),
    Case("export_onnx: float16 inputs to a float32 model",
         lambda c: export_onnx(c.mlp, c.x.half(), c.tmp / "m.onnx"), TraceError, "float16[4, 8]"),
    Case("export_program: not a model", lambda c: export_program("model", c.x), ConfigError, "torch.nn.Module"),
    Case("quantize_onnx: missing file",
         lambda c: quantize_onnx(c.tmp / "nope.onnx", c.tmp / "q.onnx", QuantConfig(method="dynamic_int8")),
         CheckpointError, "does not exist"),
    Case("quantize_onnx: corrupt file",
         lambda c: quantize_onnx(c.tmp / "a_file", c.tmp / "q.onnx", QuantConfig(method="dynamic_int8")),
         CheckpointError, "not a readable ONNX model"),
    Case("quantize_onnx: truncated file",
         lambda c: quantize_onnx(c.path("truncated"), c.tmp / "q.onnx", QuantConfig(method="dynamic_int8")),
         CheckpointError, "not a readable ONNX model", needs=("truncated",)),
    Case("quantize_onnx: a folder as source",
         lambda c: quantize_onnx(c.tmp / "folder", c.tmp / "q.onnx", QuantConfig(method="dynamic_int8")),
         CheckpointError, "not a file"),
    Case("quantize_onnx: target is a folder",
         lambda c: quantize_onnx(c.path("onnx"), c.tmp / "folder", QuantConfig(method="dynamic_int8")), ConfigError,
         "is a folder", needs=("onnx",)),
    Case("quantize_onnx: dict config",
         lambda c: quantize_onnx(c.path("onnx"), c.tmp / "q.onnx", {"method": "dynamic_int8"}), ConfigError,
         "takes a QuantConfig", needs=("onnx",)),
    Case("quantize_onnx: a PyTorch-only method",
         lambda c: quantize_onnx(c.path("onnx"), c.tmp / "q.onnx", QuantConfig(method="binary_weight")), ConfigError,
         "runs in PyTorch only", needs=("onnx",)),
    Case("quantize_onnx: module names",
         lambda c: quantize_onnx(c.path("onnx"), c.tmp / "q.onnx", QuantConfig(method="fp16", op_names=("0",))),
         ConfigError, "module names do not map", needs=("onnx",)),
    Case("quantize_onnx: static without calibration",
         lambda c: quantize_onnx(c.path("onnx"), c.tmp / "q.onnx", QuantConfig(method="static_int8")), ConfigError,
         "needs calibration", needs=("onnx",)),
    Case("quantize_onnx: calibration of the wrong shape",
         lambda c: quantize_onnx(c.path("onnx"), c.tmp / "q.onnx", QuantConfig(method="static_int8"),
                                 calibration=[torch.randn(2, 5)]), ExportError, "could not quantize", needs=("onnx",)),
    Case("quantize_onnx: NaN calibration",
         lambda c: quantize_onnx(c.path("onnx"), c.tmp / "q.onnx", QuantConfig(method="static_int8"),
                                 calibration=[torch.full((2, 8), NAN)]), ConfigError, "NaN", needs=("onnx",)),
    Case("quantize_onnx: calibration of strings",
         lambda c: quantize_onnx(c.path("onnx"), c.tmp / "q.onnx", QuantConfig(method="static_int8"),
                                 calibration=["x"]), ConfigError, "batch 0 is str", needs=("onnx",)),
    Case("quantize_onnx: (x, y) calibration batches",
         lambda c: quantize_onnx(c.path("onnx"), c.tmp / "q.onnx", QuantConfig(method="static_int8"),
                                 calibration=[(c.x, torch.arange(4))]), None, needs=("onnx",),
         check=lambda c, r: _onnx_runs(c, c.tmp / "q.onnx", c.x)),
]

LOWRANK = [
    Case("low-rank: no rule", lambda c: LowRankConfig(), ConfigError, "exactly one"),
    Case("low-rank: two rules", lambda c: LowRankConfig(rank=2, energy=0.9), ConfigError, "exactly one"),
    Case("low-rank: energy above 1", lambda c: LowRankConfig(energy=1.5), ConfigError, "'energy'"),
    Case("low-rank: NaN energy", lambda c: LowRankConfig(energy=NAN), ConfigError, "'energy'"),
    Case("low-rank: param_ratio 1", lambda c: LowRankConfig(param_ratio=1.0), ConfigError, "'param_ratio'"),
    Case("low-rank: rank 0", lambda c: LowRankConfig(rank=0), ConfigError, "'rank'"),
    Case("low-rank: rank as text", lambda c: LowRankConfig(rank="4"), ConfigError, "'rank'"),
    Case("low-rank: per-layer rank 0", lambda c: factorize_(c.mlp, LowRankConfig(rank=2), ranks={"0": 0}),
         ConfigError, "ranks['0']"),
    Case("low-rank: negative per-layer rank", lambda c: factorize_(c.mlp, LowRankConfig(rank=2), ranks={"0": -1}),
         ConfigError, "ranks['0']"),
    Case("low-rank: per-layer rank as text", lambda c: factorize_(c.mlp, LowRankConfig(rank=2), ranks={"0": "2"}),
         ConfigError, "ranks['0']"),
    Case("low-rank: ranks as a list", lambda c: factorize_(c.mlp, LowRankConfig(rank=2), ranks=[2]), ConfigError,
         "map layer names"),
    Case("low-rank: rank for an unselected layer",
         lambda c: factorize_(c.mlp, LowRankConfig(rank=2), ranks={"fc9": 2}), ConfigError, "does not select"),
    Case("low-rank: not a model", lambda c: factorize_("mlp", LowRankConfig(rank=2)), ConfigError, "torch.nn.Module"),
    Case("low-rank: dict config", lambda c: factorize_(c.mlp, {"rank": 2}), ConfigError, "LowRankConfig.from_dict"),
    Case("low-rank: meta model", lambda c: factorize_(nn.Linear(8, 4, device="meta"), LowRankConfig(rank=2)),
         ConfigError, "meta device"),
    Case("low-rank: NaN weights", lambda c: plan_lowrank(_nan_weights(nn.Sequential(nn.Linear(8, 4))),
                                                         LowRankConfig(rank=2)), ConfigError, "no SVD"),
    Case("low-rank: op_names matching nothing", lambda c: factorize_(c.mlp, LowRankConfig(rank=2, op_names=("x",))),
         NoMatchError, "'x'"),
    Case("low-rank: grouped convolution", lambda c: factorize_(c.cnn, LowRankConfig(rank=2, op_types=("Conv2d",))),
         ConfigError, "groups=1"),
    Case("low-rank: rank above the full rank", lambda c: plan_lowrank(c.mlp, LowRankConfig(rank=10**6)), None,
         check=lambda c, plans: [(p.rank, p.skipped) for p in plans.values()] == [(8, "would not be smaller"),
                                                                                   (4, "would not be smaller")]),
    Case("low-rank sensitivity: inputs of the wrong shape",
         lambda c: lowrank_sensitivity(c.mlp, torch.randn(2, 5), LowRankConfig(rank=2)), TraceError, "float32[2, 5]"),
    Case("low-rank sensitivity: NaN inputs",
         lambda c: lowrank_sensitivity(c.mlp, torch.full((2, 8), NAN), LowRankConfig(rank=2)), ConfigError, "NaN"),
    Case("low-rank sensitivity: energy above 1",
         lambda c: lowrank_sensitivity(c.mlp, c.x, LowRankConfig(rank=2), energies=(0.5, 1.5)), ConfigError,
         "energies"),
    Case("low-rank sensitivity: not a model", lambda c: lowrank_sensitivity(None, c.x, LowRankConfig(rank=2)),
         ConfigError, "torch.nn.Module"),
    Case("low-rank: zero tolerance", lambda c: ranks_for_tolerance({"0": [(1, 0.1)]}, 0.0), ConfigError, "tolerance"),
]

LORA = [
    Case("LoRA: rank 0", lambda c: LoRAConfig(target_modules=("0",), r=0), ConfigError, "'r'"),
    Case("LoRA: fractional rank", lambda c: LoRAConfig(target_modules=("0",), r=2.5), ConfigError, "'r'"),
    Case("LoRA: infinite alpha", lambda c: LoRAConfig(target_modules=("0",), lora_alpha=INF), ConfigError,
         "'lora_alpha'"),
    Case("LoRA: dropout 1", lambda c: LoRAConfig(target_modules=("0",), lora_dropout=1.0), ConfigError,
         "'lora_dropout'"),
    Case("LoRA: targets as one string", lambda c: LoRAConfig(target_modules="0"), ConfigError, "tuple of module"),
    Case("LoRA: no targets", lambda c: LoRAConfig(target_modules=()), ConfigError, "is empty"),
    Case("LoRA: target matching nothing", lambda c: add_lora_(c.mlp, LoRAConfig(target_modules=("query",))),
         NoMatchError, "'query'"),
    Case("LoRA: target is an activation", lambda c: add_lora_(c.mlp, LoRAConfig(target_modules=("1",))),
         ConfigError, "is a ReLU"),
    Case("LoRA: not a model", lambda c: add_lora_(None, LoRAConfig(target_modules=("0",))), ConfigError,
         "torch.nn.Module, got NoneType"),
    Case("LoRA: dict config", lambda c: add_lora_(c.mlp, {"target_modules": ["0"]}), ConfigError,
         "LoRAConfig.from_dict"),
    Case("LoRA: twice on one layer", lambda c: add_lora_(c.mlp, LoRAConfig(target_modules=("0",))), ConfigError,
         "without an adapter yet", setup=_lora),
    Case("LoRA: merge without adapters", lambda c: merge_lora_(c.mlp), ConfigError, "no LoRA adapters"),
    Case("LoRA: save without adapters", lambda c: save_lora(c.mlp, c.tmp / "lora"), ConfigError, "no LoRA adapters"),
    Case("LoRA: save into a file", lambda c: save_lora(c.mlp, c.tmp / "a_file"), ConfigError, "is a file",
         setup=_lora),
    Case("LoRA: load a missing folder", lambda c: load_lora_(c.mlp, c.tmp / "nope"), CheckpointError,
         "not a readable LoRA adapter folder"),
    Case("LoRA: load a corrupt config", lambda c: load_lora_(c.mlp, c.path("lora_corrupt")), CheckpointError,
         "not a readable LoRA adapter", needs=("lora_corrupt",)),
    Case("LoRA: load another model's adapter", lambda c: load_lora_(c.student, c.path("lora")), CheckpointError,
         "wrong shapes", needs=("lora",)),
]

REPORT = [
    Case("report: negative runs", lambda c: report(c.mlp, c.x, runs=-1), ConfigError, "runs must be an integer"),
    Case("report: fractional runs", lambda c: report(c.mlp, c.x, runs=1.5), ConfigError, "runs"),
    Case("report: zero threads", lambda c: report(c.mlp, c.x, runs=1, threads=0), ConfigError, "threads"),
    Case("report: not a model", lambda c: report("mlp", c.x), ConfigError, "torch.nn.Module"),
    Case("report: meta model", lambda c: report(nn.Linear(8, 4, device="meta"), c.x), ConfigError, "meta device"),
    Case("report: inputs of the wrong shape", lambda c: report(c.cnn, torch.randn(2, 1, 8, 8), runs=0), TraceError,
         "float32[2, 1, 8, 8]"),
    Case("report: keyword inputs the model does not take", lambda c: report(c.mlp, {"y": c.x}, runs=0), TraceError,
         "{y: float32[4, 8]}"),
    Case("report: empty batch", lambda c: report(c.mlp, torch.randn(0, 8), runs=1), None,
         check=lambda c, r: (r.batch_size, r.flops, r.state) == (0, 0, "dense")),
    Case("report: NaN inputs are measured like any", lambda c: report(c.mlp, torch.full((4, 8), NAN), runs=0),
         None, check=lambda c, r: r.flops == report(c.mlp, c.x, runs=0).flops == 2 * 4 * (8 * 16 + 16 * 4)),
    Case("report: float64 inputs to a float32 model", lambda c: report(c.mlp, c.x.double(), runs=0), TraceError,
         "float64[4, 8]"),
    Case("measure_latency: zero runs", lambda c: measure_latency(c.mlp, c.x, runs=0), ConfigError, "runs"),
]

DISTILL = [
    Case("distill: temperature 0", lambda c: DistillConfig(temperature=0), ConfigError, "temperature"),
    Case("distill: negative temperature", lambda c: DistillConfig(temperature=-1.0), ConfigError, "temperature"),
    Case("distill: infinite temperature", lambda c: DistillConfig(temperature=INF), ConfigError, "temperature"),
    Case("distill: temperature as text", lambda c: DistillConfig(temperature="4"), ConfigError, "temperature"),
    Case("distill: alpha above 1", lambda c: DistillConfig(alpha=1.5), ConfigError, "alpha"),
    Case("distill: NaN alpha", lambda c: DistillConfig(alpha=NAN), ConfigError, "alpha"),
    Case("distill: NaN feature weight", lambda c: DistillConfig(feature_weight=NAN), ConfigError, "feature_weight"),
    Case("distill: a feature pair of one name", lambda c: DistillConfig(features=(("0",),)), ConfigError,
         "name pairs"),
    Case("distill: unknown key", lambda c: DistillConfig.from_dict({"temp": 4}), ConfigError, "allowed keys"),
    Case("distill: teacher is not a model", lambda c: Distiller(None, c.student), ConfigError, "teacher"),
    Case("distill: dict config", lambda c: Distiller(c.mlp, c.student, {"temperature": 2.0}), ConfigError,
         "DistillConfig.from_dict"),
    Case("distill: unknown student layer", lambda c: _distiller(c, (("9", "0"),)), NoMatchError, "the student"),
    Case("distill: unknown teacher layer (no hook left on the student)", lambda c: _distiller(c, (("0", "9"),)),
         NoMatchError, "the teacher"),
    Case("distill: features without example inputs", lambda c: _distiller(c, (("0", "0"),), example=None),
         ConfigError, "example_inputs"),
    Case("distill: example inputs of the wrong shape (no hooks left)",
         lambda c: _distiller(c, (("0", "0"),), example=torch.randn(2, 3)), TraceError, "float32[2, 3]"),
    Case("distill_loss: temperature 0",
         lambda c: distill_loss(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 1]), temperature=0),
         ConfigError, "temperature"),
]

SENSITIVITY = [
    Case("sensitivity: no metric", lambda c: sensitivity_analysis(c.mlp, None), ConfigError, "metric must be"),
    Case("sensitivity: NaN metric", lambda c: sensitivity_analysis(c.mlp, lambda m: NAN), ConfigError,
         "finite number"),
    Case("sensitivity: metric returns text", lambda c: sensitivity_analysis(c.mlp, lambda m: "high"), ConfigError,
         "'high'"),
    Case("sensitivity: metric returns a vector", lambda c: sensitivity_analysis(c.mlp, lambda m: m(c.x)),
         ConfigError, "must return a number"),
    Case("sensitivity: sparsity 1", lambda c: sensitivity_analysis(c.mlp, lambda m: 1.0, sparsities=[1.0]),
         ConfigError, "sparsities"),
    Case("sensitivity: no sparsities", lambda c: sensitivity_analysis(c.mlp, lambda m: 1.0, sparsities=[]),
         ConfigError, "sparsities"),
    Case("sensitivity: sparsities as text", lambda c: sensitivity_analysis(c.mlp, lambda m: 1.0, sparsities="0.5"),
         ConfigError, "sparsities"),
    Case("sensitivity: not a model", lambda c: sensitivity_analysis(c.mlp.state_dict(), lambda m: 1.0), ConfigError,
         "torch.nn.Module"),
    Case("sensitivity: unknown criterion", lambda c: sensitivity_analysis(c.mlp, lambda m: 1.0, criterion="l7"),
         ConfigError, "unknown criterion"),
    Case("sensitivity: a config list matching nothing",
         lambda c: sensitivity_analysis(c.mlp, lambda m: 1.0, config_list=[{"op_names": ["fc9"], "sparsity": 0.5}]),
         NoMatchError, "fc9"),
    Case("prune: LSTM hidden units from a config list",
         lambda c: compute_masks(nn.Sequential(nn.LSTM(8, 6)), [{"op_types": ["LSTM"], "sparse_ratio": 0.5}]),
         NoMatchError, "does not prune recurrent hidden units"),
    Case("prune: LSTM hidden units masked as that error advises", lambda c: _lstm_hidden_units(), None,
         check=lambda c, r: _same_function(*r)),
]

def _hf_case(id_: str, prepare: Callable[[Path], Any], error: type[BaseException] | None, fragment: str = "",
             check: Callable[[Ctx, Any], Any] | None = None) -> Case:
    """A load of the saved tiny BERT after ``prepare(folder)`` (what an attacker or a bad copy did to it)."""
    return Case(id_, _hf, error, fragment, needs=("bert",), check=check, setup=lambda c: prepare(c.path("bert")))


def _half_weights(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    save_file({k: v.half() for k, v in tensors.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _load_hf(path: Any) -> nn.Module:
    from slimtorch.integrations.hf.folders import load_hf_folder

    return load_hf_folder(path)


def _save_hf(model: Any, path: Path) -> None:
    from slimtorch.integrations.hf.folders import save_hf_folder

    save_hf_folder(model, path)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


HF = [
    _hf_case("HF: planted .py with an auto_map never runs", _plant, None, check=_no_marker),
    _hf_case("HF: model type only the folder's code defines", lambda f: _plant(f, model_type="evil"), CheckpointError,
             "never runs code"),
    _hf_case("HF: architecture only the folder's code defines", lambda f: _plant(f, arch="EvilModel"),
             CheckpointError, "no model class of transformers"),
    _hf_case("HF: pickled weights only", _pickled, CheckpointError, "never unpickles"),
    _hf_case("HF: no config.json", lambda f: (f / "config.json").unlink(), CheckpointError, "no config.json"),
    _hf_case("HF: config.json is not JSON", lambda f: (f / "config.json").write_text("{"), CheckpointError,
             "unreadable"),
    _hf_case("HF: config.json is a list", lambda f: (f / "config.json").write_text("[1]"), CheckpointError,
             "not a JSON object"),
    _hf_case("HF: absurd hidden size", lambda f: _edit_config(f, hidden_size=2**40), CheckpointError,
             "hidden_size=1099511627776, out of range"),
    _hf_case("HF: absurd layer count", lambda f: _edit_config(f, num_hidden_layers=10**6), CheckpointError,
             "num_hidden_layers=1000000"),
    _hf_case("HF: sizes too large together", lambda f: _edit_config(f, hidden_size=2**16, intermediate_size=2**22),
             CheckpointError, "parameters"),
    _hf_case("HF: edited compaction record",
             lambda f: _edit_config(f, slimtorch_blocks={"encoder.layer.1.attention": {"units": 99}}),
             CheckpointError, "slimtorch_blocks"),
    _hf_case("HF: truncated weights", lambda f: _truncate(f / "model.safetensors"), CheckpointError, "unreadable"),
    _hf_case("HF: no weights at all", lambda f: (f / "model.safetensors").unlink(), CheckpointError,
             "holds no model.safetensors"),
]

CLI = [
    Case("cli report: cifar10 without its files", lambda c: cli("report", "mnistnet", "--dataset", "cifar10"),
         CliExit, "pass --data-dir"),
    Case("cli report: a dataset of another shape", lambda c: cli("report", "mnistnet", "--dataset", "digits",
                                                                  "--runs", 0), CliExit, "digits samples of shape"),
    Case("cli report: a dataset of another channel count",
         lambda c: cli("report", "resnet18", "--dataset", "digits", "--runs", 0), CliExit, "(1, 8, 8)"),
    Case("cli report: fewer classes than the dataset",
         lambda c: cli("report", c.arg, "--dataset", "digits", "--runs", 0), CliExit,
         "scores 3 classes but digits has 10", setup=_three_class_digits),
    Case("cli report: unknown dataset", lambda c: cli("report", "mnistnet", "--dataset", "imagenet"), CliExit,
         "invalid choice: 'imagenet'"),
    Case("cli report: negative runs", lambda c: cli("report", "mnistnet", "--runs", -1), CliExit, ">= 0"),
    Case("cli report: absurd input shape", lambda c: cli("report", "mnistnet", "--input-shape", "1,100000,100000"),
         CliExit, "values per sample"),
    Case("cli report: zero in the input shape", lambda c: cli("report", "mnistnet", "--input-shape", "0,1"), CliExit,
         "must be positive"),
    Case("cli report: input shape as words", lambda c: cli("report", "mnistnet", "--input-shape", "big"), CliExit,
         "bad shape 'big'"),
    Case("cli report: a model taking two inputs", lambda c: cli("report", "raft_small", "--input-shape", "3,32,32",
                                                                "--runs", 0), CliExit, "feeds the model one tensor"),
    Case("cli report: missing masks file", lambda c: cli("report", "mnistnet", "--masks", c.tmp / "m.safetensors"),
         CliExit, "does not exist"),
    Case("cli report: corrupt masks file", lambda c: cli("report", "mnistnet", "--masks", c.tmp / "a_file"),
         CliExit, "not a readable safetensors mask file"),
    Case("cli report: corrupt model file", lambda c: cli("report", c.tmp / "a_file", "--runs", 0), CliExit,
         "not a readable safetensors model file"),
    Case("cli report: pickled model file", lambda c: cli("report", c.tmp / "model.pt"), CliExit, "never loads pickles"),
    Case("cli report: model file with absurd arguments", lambda c: cli("report", c.arg, "--runs", 0), CliExit,
         "bad model spec", setup=lambda c: _saved_model(c, {"name": "DigitsCNN", "kwargs": {"width": 2**40}})),
    Case("cli report: model file that would download weights", lambda c: cli("report", c.arg, "--runs", 0), CliExit,
         "never downloads", setup=lambda c: _saved_model(c, {"name": "resnet18", "source": "torchvision",
                                                              "kwargs": {"weights": "DEFAULT"}})),
    Case("cli report: output folder is a file", lambda c: cli("report", "mnistnet", "--runs", 0, "--out",
                                                              c.tmp / "a_file"), CliExit, "a_file"),
    Case("cli report: unknown format", lambda c: cli("report", "mnistnet", "--format", "xml"), CliExit,
         "invalid choice: 'xml'"),
    Case("cli report: zero batch size", lambda c: cli("report", "mnistnet", "--batch-size", 0), CliExit, ">= 1"),
    Case("cli report: zero threads", lambda c: cli("report", "mnistnet", "--threads", 0), CliExit, ">= 1"),
    Case("cli report: unknown model", lambda c: cli("report", "Resnet99"), CliExit, "unknown model 'Resnet99'"),
    Case("cli report: unknown prefix", lambda c: cli("report", "hub:resnet18"), CliExit, "the only prefix"),
    Case("cli: no quantize command", lambda c: cli("quantize", "mnistnet"), CliExit, "invalid choice: 'quantize'"),
    Case("cli: no export command", lambda c: cli("export", "mnistnet"), CliExit, "invalid choice: 'export'"),
    Case("cli demo: zero epochs", lambda c: cli("demo", "--epochs", 0), CliExit, ">= 1"),
    Case("cli demo: negative fine-tuning epochs", lambda c: cli("demo", "--finetune-epochs", -1), CliExit, ">= 1"),
    Case("cli demo: seed as a word", lambda c: cli("demo", "--seed", "abc"), CliExit, "invalid int value"),
    Case("cli demo: zero threads", lambda c: cli("demo", "--threads", 0), CliExit, ">= 1"),
    Case("cli table61: no data folder", lambda c: cli("table61"), CliExit, "--data-dir"),
    Case("cli table61: a folder without the data", lambda c: cli("table61", "--data-dir", c.tmp / "folder",
                                                                 "--limit", 8), CliExit, "cifar10_jpeg.npz"),
    Case("cli table61: sparsity above 1", lambda c: cli("table61", "--data-dir", c.tmp, "--sparsities", 1.5), CliExit,
         "sparsities must be fractions"),
    Case("cli table61: NaN sparsity", lambda c: cli("table61", "--data-dir", c.tmp, "--sparsities", "nan"), CliExit,
         "sparsities must be fractions"),
    Case("cli table61: unknown recipe", lambda c: cli("table61", "--data-dir", c.tmp, "--recipes", "fast"), CliExit,
         "invalid choice: 'fast'"),
    Case("cli table61: zero limit", lambda c: cli("table61", "--data-dir", c.tmp, "--limit", 0), CliExit, ">= 1"),
    Case("cli table61: zero epochs", lambda c: cli("table61", "--data-dir", c.tmp, "--epochs", 0), CliExit, ">= 1"),
]

def _masked(ctx: Ctx) -> None:
    """Half the single weights of the MLP's first layer masked (a pruned model, before compaction)."""
    apply_masks_(ctx.mlp, compute_masks(ctx.mlp, [{"op_names": ["0"], "sparse_ratio": 0.5}], criterion="magnitude"))


def _runs_with_zeros(ctx: Ctx, q: nn.Module, masked: bool) -> bool:
    """The quantized copy runs, keeps the pruned weights at zero, and keeps the masks where the layer is still
    a float layer that training could move."""
    with torch.no_grad():
        q(ctx.x)
    first = q.get_submodule("0")
    weight = first.weight() if callable(first.weight) else first.weight
    zeros = int((weight.dequantize() if weight.is_quantized else weight).eq(0).sum())
    return zeros >= 64 and (("0.weight" in get_masks(q)) == masked)


def _in_place(model: nn.Module, method: str) -> nn.Module:
    copied = copy.deepcopy(model)
    quantize_(copied, QuantConfig(method=method))
    return copied


def _merged_masked(ctx: Ctx) -> bool:
    """Merging an adapter into a masked layer warns that the layer is dense again, and computes what the adapted
    model computes."""
    add_lora_(ctx.mlp, LoRAConfig(target_modules=("0",), r=2))
    with torch.no_grad():
        ctx.mlp[0].lora_B["default"].weight.normal_()
        adapted = ctx.mlp(ctx.x)
    with pytest.warns(SlimWarning, match="no longer sparse"):
        merge_lora_(ctx.mlp)
    with torch.no_grad():
        torch.testing.assert_close(ctx.mlp(ctx.x), adapted)
    return not get_masks(ctx.mlp)


AFTER_PRUNING = [
    Case("quantize: dynamic int8 of a masked model", lambda c: quantize(c.mlp, QuantConfig(method="dynamic_int8")),
         None, check=lambda c, q: _runs_with_zeros(c, q, masked=False), setup=_masked),
    Case("quantize_: dynamic int8 of a masked model in place", lambda c: _in_place(c.mlp, "dynamic_int8"), None,
         check=lambda c, q: _runs_with_zeros(c, q, masked=False), setup=_masked),
    Case("quantize: int4 training of a masked model keeps its masks",
         lambda c: quantize(c.mlp, QuantConfig(method="qat_int4_weight", group_size=8)), None,
         check=lambda c, q: _runs_with_zeros(c, q, masked=True), setup=_masked),
    Case("quantize: int8 training of a masked model keeps its masks",
         lambda c: quantize(c.mlp, QuantConfig(method="qat_int8"), example_inputs=c.x), None,
         check=lambda c, q: _runs_with_zeros(c, q, masked=True), setup=_masked),
    Case("quantize: fp16 of a masked model keeps its masks", lambda c: quantize(c.mlp, QuantConfig(method="fp16")),
         None, check=lambda c, q: "0.weight" in get_masks(q), setup=_masked),
    Case("compact_: an int8 model", lambda c: compact_(quantize(c.mlp, QuantConfig(method="dynamic_int8")), {},
                                                       example_inputs=c.x), ConfigError, "quantized (dynamic_int8)"),
    Case("LoRA: merged into a masked layer", _merged_masked, None, check=lambda c, unmasked: unmasked, setup=_masked,
         changes=True),
]

HF_MORE = [
    _hf_case("HF: a NaN layer-norm epsilon", lambda f: _edit_config(f, layer_norm_eps=float("nan")), CheckpointError,
             "layer_norm_eps=nan"),
    _hf_case("HF: a quantization config", lambda f: _edit_config(
        f, quantization_config={"quant_method": "bitsandbytes", "load_in_8bit": True}), CheckpointError,
             "asks transformers to quantize the model while loading"),
    _hf_case("HF: an attention kernel that is not installed", lambda f: _edit_config(
        f, attn_implementation="flash_attention_2", _attn_implementation="flash_attention_2"), CheckpointError,
             "FlashAttention2"),
    _hf_case("HF: an unknown activation", lambda f: _edit_config(f, hidden_act="os.system"), CheckpointError,
             "KeyError: 'os.system'"),
    _hf_case("HF: an unknown dtype", lambda f: _edit_config(f, torch_dtype="float13", dtype="float13"),
             CheckpointError, "float13"),
    _hf_case("HF: heads that do not divide the width", lambda f: _edit_config(f, num_attention_heads=5),
             CheckpointError, "not a multiple of the number of attention heads"),
    _hf_case("HF: weights in float16, config in float32", lambda f: _half_weights(f), None,
             check=lambda c, m: next(m.parameters()).dtype == torch.float32),
    Case("HF: load_compacted of None", lambda c: _load_hf(None), ConfigError, "must be a path"),
    Case("HF: save_compacted of a name", lambda c: _save_hf("bert", c.tmp / "out"), ConfigError,
         "torch.nn.Module, got str"),
]

CASES = (QUANTIZE + AFTER_PRUNING + EXPORT + LOWRANK + LORA + REPORT + DISTILL + SENSITIVITY + HF + HF_MORE + CLI)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict[str, Path]:
    """Files some cases need, made once: a float ONNX export (and a truncated copy), a LoRA adapter and a
    corrupt one, and a head-pruned tiny BERT saved with save_hf_folder. Each case gets its own copies."""
    root = tmp_path_factory.mktemp("prepared")
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    export_onnx(mlp, torch.randn(4, 8), root / "onnx")
    (root / "truncated").write_bytes((root / "onnx").read_bytes()[:200])
    add_lora_(mlp, LoRAConfig(target_modules=("0",), r=2))
    save_lora(mlp, root / "lora")
    shutil.copytree(root / "lora", root / "lora_corrupt")
    (root / "lora_corrupt" / "adapter_config.json").write_text("{not json")
    return {p.name: p for p in root.iterdir()}


def _bert(folder: Path) -> None:
    from transformers import BertConfig, BertModel

    from slimtorch.integrations.hf.compaction import compact_hf_, unit_masks
    from slimtorch.integrations.hf.folders import save_hf_folder

    torch.manual_seed(0)
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                vocab_size=64, max_position_embeddings=32)).eval()
    compact_hf_(bert, unit_masks(bert, {"encoder.layer.1.attention": [0, 2]}))
    save_hf_folder(bert, folder)


@pytest.fixture
def ctx(tmp_path, prepared, request) -> Ctx:
    case: Case = request.param
    files = {}
    for name in case.needs:
        target = tmp_path / name
        if name == "bert":
            _bert(target)
        elif prepared[name].is_dir():
            shutil.copytree(prepared[name], target)
        else:
            shutil.copy(prepared[name], target)
        files[name] = target
    (tmp_path / "model.pt").write_bytes(b"\x80\x04not really a pickle")
    return Ctx(tmp_path, files)


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch.ao observers, zero-element inits: not under test
@pytest.mark.parametrize(("case", "ctx"), [(c, c) for c in CASES], ids=[c.id for c in CASES], indirect=["ctx"])
def test_adversarial_input(case: Case, ctx: Ctx) -> None:
    if case.setup is not None:
        ctx.arg = case.setup(ctx)
    if case.error is None:
        before = [model_state(m) for m in ctx.models()]
        result = case.call(ctx)
        for state, model in zip(before, ctx.models(), strict=True):  # the successes here are pure but one
            if not case.changes:
                assert_same_state(state, model_state(model))
        if case.check is not None:
            verdict = case.check(ctx, result)
            assert verdict is None or verdict is True, f"{case.id}: the result is wrong"
        return
    fails_cleanly(lambda: case.call(ctx), case.error, case.fragment, models=ctx.models(), paths=[ctx.tmp])


def test_the_table_covers_enough_cases():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(CASES) >= 70
    assert sum(c.error is None for c in CASES) >= 5  # unusual but valid inputs succeed
