"""Export through ``torch.export`` and ONNX, checked against PyTorch in ONNX Runtime.

Compacted, factorized, LoRA-merged, fp16 and low-bit-weight models export as they are. torch's int8
modules (``dynamic_int8``, ``static_int8``) cannot: their packed weights are opaque to ``torch.export``
and to the ONNX exporter. For int8 in ONNX, export the *float* model and quantize the file with ONNX
Runtime's own kernels (:func:`slimtorch.quant.onnx.quantize_onnx`); :class:`~slimtorch.errors.ExportError`
says so.

    >>> import os, tempfile, torch
    >>> from torch import nn
    >>> from slimtorch.export import export_onnx
    >>> path = os.path.join(tempfile.mkdtemp(), "mlp.onnx")
    >>> result = export_onnx(nn.Sequential(nn.Linear(8, 4), nn.ReLU()), torch.randn(2, 8), path)
    >>> result.max_abs_diff < 1e-5
    True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimtorch.checks import (
    check_finite_inputs,
    check_materialized,
    check_module,
    check_number,
    check_output_file,
    run_model,
)
from slimtorch.errors import ExportError, SlimError
from slimtorch.graph.run import args_kwargs
from slimtorch.io import atomic_write
from slimtorch.quant.api import sqnr
from slimtorch.quant.config import quant_info
from slimtorch.quant.lowbit import LowBitConv2d, LowBitLinear
from slimtorch.quant.onnx import quiet_onnx

__all__ = ["OnnxCheck", "OnnxModule", "export_onnx", "export_program", "onnx_session", "run_onnx"]

_INT8_ALTERNATIVE = (
    "export the float model with export_onnx(float_model, example_inputs, path) and quantize the file with "
    "slimtorch.quant.onnx.quantize_onnx(path, out_path, QuantConfig(method={method!r}){calib}) "
    "(ONNX Runtime int8 kernels)"
)


def _refuse_unexportable(model: nn.Module) -> None:
    info = quant_info(model)
    if info is not None and info.method == "bf16":
        raise ExportError("ONNX Runtime's CPU provider has no bfloat16 conv/matmul kernels; export the float model "
                          "and use slimtorch.quant.onnx.quantize_onnx(path, out_path, QuantConfig(method='fp16')), "
                          "or run bf16 in PyTorch")
    opaque = info is not None and info.method in ("dynamic_int8", "static_int8")
    if info is not None and info.method == "qat_int8":
        raise ExportError("a fake-quantized training model does not export; convert_qat(model) for PyTorch, or "
                          + _INT8_ALTERNATIVE.format(method="static_int8", calib=", calibration=..."))
    if opaque or any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in model.modules()):
        method = info.method if info else "dynamic_int8"
        calib = ", calibration=..." if method == "static_int8" else ""
        raise ExportError("torch.ao int8 layers cannot go through torch.export or ONNX: "
                          + _INT8_ALTERNATIVE.format(method=method, calib=calib))


def export_program(model: nn.Module, example_inputs: Any) -> torch.export.ExportedProgram:
    """``torch.export`` the model in eval mode (non-strict), with a typed error naming the alternative.

    >>> import torch
    >>> from torch import nn
    >>> program = export_program(nn.Linear(4, 2), torch.randn(1, 4))
    >>> program.module()(torch.ones(1, 4)).shape
    torch.Size([1, 2])
    """
    check_module(model, "export_program")
    check_materialized(model, "export_program")
    _refuse_unexportable(model)
    args, kwargs = args_kwargs(example_inputs)
    was_training = model.training
    model.eval()
    try:
        return torch.export.export(model, args, kwargs, strict=False)
    except Exception as err:  # torch.export raises many unrelated types; all mean "cannot export as is"
        raise ExportError(
            f"torch.export failed for {type(model).__name__} ({type(err).__name__}: {str(err)[:300]}); "
            "the model must run without data-dependent Python control flow on the example inputs"
        ) from err
    finally:
        model.train(was_training)


@dataclass(frozen=True)
class OnnxCheck:
    """An exported file and how closely ONNX Runtime reproduces PyTorch on the example inputs."""

    path: str
    size_bytes: int
    max_abs_diff: float
    sqnr_db: float


def onnx_session(path: str | Path, *, threads: int = 1) -> Any:
    """An ONNX Runtime CPU session with ``threads`` intra-op threads (set explicitly, for fair timings)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session: Any, example_inputs: Any) -> list[torch.Tensor]:
    """Run a session on inputs given as for the PyTorch model (tensor, tuple, or dict of keyword inputs)."""
    names = [i.name for i in session.get_inputs()]
    if isinstance(example_inputs, Mapping):
        feed = {k: v for k, v in example_inputs.items() if k in names}
    else:
        args, _ = args_kwargs(example_inputs)
        feed = dict(zip(names, args, strict=False))
    outs = session.run(None, {k: v.detach().cpu().numpy() for k, v in feed.items()})
    return [torch.from_numpy(o) for o in outs]


class OnnxModule(nn.Module):
    """An ONNX file behind the ``nn.Module`` call interface, so :func:`slimtorch.report.report`,
    ``evaluate`` and any loop measure ONNX Runtime exactly as they measure PyTorch (inference only).

    >>> import os, tempfile, torch
    >>> from torch import nn
    >>> path = os.path.join(tempfile.mkdtemp(), "fc.onnx")
    >>> _ = export_onnx(nn.Linear(4, 2), torch.randn(3, 4), path)
    >>> OnnxModule(path)(torch.randn(5, 4)).shape
    torch.Size([5, 2])
    """

    def __init__(self, path: str | Path, *, threads: int = 1) -> None:
        super().__init__()
        self.path, self.session = str(path), onnx_session(path, threads=threads)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor | tuple[torch.Tensor, ...]:
        outs = run_onnx(self.session, kwargs if kwargs else tuple(args))
        return outs[0] if len(outs) == 1 else tuple(outs)


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        return _first_tensor(next(iter(out.values())))
    if isinstance(out, Sequence):
        return _first_tensor(out[0])
    raise ExportError(f"the model returned {type(out).__name__}; export needs tensor outputs")


def _dynamic_batch(example_inputs: Any) -> Any:
    batch = torch.export.Dim("batch", min=1)
    if isinstance(example_inputs, Mapping):
        return {k: {0: batch} for k in example_inputs}
    args, _ = args_kwargs(example_inputs)
    return tuple({0: batch} if isinstance(a, torch.Tensor) else None for a in args)


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | Path,
    *,
    dynamic_batch: bool = True,
    atol: float = 1e-4,
) -> OnnxCheck:
    """Export ``model`` (eval mode) to one ONNX file (weights embedded), written atomically, then run it in
    ONNX Runtime on ``example_inputs`` and compare with PyTorch's first output. A difference above ``atol``
    (relative to the output's scale) raises ExportError and leaves no file behind, as does an output that
    is not finite (the check could not compare). ``path`` must be a file path, not a folder."""
    check_module(model, "export_onnx")
    check_materialized(model, "export_onnx")
    check_number(atol, "atol", low=0.0)
    path = check_output_file(path, "export_onnx")
    _refuse_unexportable(model)
    check_finite_inputs(example_inputs, "export_onnx's example_inputs")
    args, kwargs = args_kwargs(example_inputs)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ref = _first_tensor(run_model(model, example_inputs, "export_onnx")).float()
        if not bool(torch.isfinite(ref).all()):
            raise ExportError(f"{type(model).__name__}'s output on the example inputs holds NaN or infinite values, "
                              "so the export cannot be checked against it; fix the model's weights or inputs")
        shapes = _dynamic_batch(example_inputs) if dynamic_batch else None
        # The exporter's optimizer folds constant subgraphs, which would unpack 4-/1-bit weights into float
        # constants and lose the size; low-bit models are written unoptimized (ONNX Runtime optimizes on load).
        packed = any(isinstance(m, (LowBitLinear, LowBitConv2d)) for m in model.modules())
        with quiet_onnx():
            onnx_program = torch.onnx.export(model, args, kwargs=kwargs or None, dynamo=True, optimize=not packed,
                                             dynamic_shapes=shapes, external_data=False)
    except SlimError:
        raise
    except Exception as err:
        raise ExportError(f"ONNX export failed for {type(model).__name__} ({type(err).__name__}: "
                          f"{str(err)[:300]}); try export_program(model, example_inputs) to see the graph") from err
    finally:
        model.train(was_training)
    return _write_checked(onnx_program, path, example_inputs, ref, atol)


def _write_checked(onnx_program: Any, path: Path, example_inputs: Any, ref: torch.Tensor, atol: float) -> OnnxCheck:
    checked: dict[str, float] = {}

    def write(tmp: str) -> None:
        onnx_program.save(tmp)
        try:
            session = onnx_session(tmp)
        except Exception as err:  # onnxruntime's own exception types are not importable as a stable API
            raise ExportError(f"ONNX Runtime cannot load the exported graph ({str(err)[:300]}); "
                              "export the float model and quantize it with quantize_onnx") from err
        out = run_onnx(session, example_inputs)[0].float()
        checked["diff"] = float((out - ref).abs().max())
        checked["sqnr"] = sqnr(ref, out)
        scale = float(ref.abs().max().clamp(min=1.0))
        if not checked["diff"] <= atol * scale:  # NaN fails too; raising inside atomic_write removes the temp file
            raise ExportError(f"ONNX Runtime differs from PyTorch by {checked['diff']:.3g} (allowed {atol * scale:.3g})"
                              "; the export does not reproduce the model")

    try:
        atomic_write(path, write)
    except OSError as err:
        raise ExportError(f"cannot write {str(path)!r} ({err.strerror or err}); choose a writable path") from None
    return OnnxCheck(str(path), path.stat().st_size, checked["diff"], checked["sqnr"])
