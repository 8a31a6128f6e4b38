"""ONNX Runtime as a quantization backend: quantize an exported float ONNX file with ORT's own tools,
so that ORT's int8/int4 kernels run it (the route for int8 models that must leave PyTorch: torch's int8
modules cannot be exported).

    >>> import os, tempfile, torch
    >>> from torch import nn
    >>> from slimtorch.export import export_onnx
    >>> from slimtorch.quant import QuantConfig
    >>> from slimtorch.quant.onnx import quantize_onnx
    >>> float_path, int8_path = (os.path.join(tempfile.mkdtemp(), n) for n in ("f.onnx", "q.onnx"))
    >>> _ = export_onnx(nn.Sequential(nn.Linear(256, 256)), torch.randn(4, 256), float_path)
    >>> quantize_onnx(float_path, int8_path, QuantConfig(method="dynamic_int8"))
    >>> os.path.getsize(int8_path) < os.path.getsize(float_path) / 3
    True
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from slimtorch.checks import check_output_file
from slimtorch.errors import CheckpointError, ConfigError, ExportError, SlimError
from slimtorch.graph.run import args_kwargs
from slimtorch.io import atomic_write
from slimtorch.quant.batches import checked_batches
from slimtorch.quant.config import QuantConfig

__all__ = ["quantize_onnx", "quiet_onnx"]


@contextlib.contextmanager
def quiet_onnx() -> Iterator[None]:
    """The exporter prints progress lines to stdout, ORT's quantizers log advice at WARNING on every call."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


class _Reader:
    """ONNX Runtime's calibration-reader protocol over an iterable of model inputs."""

    def __init__(self, batches: Iterable[Any], names: list[str]) -> None:
        self._it, self._names = iter(batches), names

    def get_next(self) -> dict[str, Any] | None:
        batch = next(self._it, None)
        if batch is None:
            return None
        if isinstance(batch, Mapping):
            return {k: v.numpy() for k, v in batch.items() if k in self._names}
        args, _ = args_kwargs(batch)
        return {n: a.numpy() for n, a in zip(self._names, args, strict=False)}


def quantize_onnx(
    source: str | Path, target: str | Path, config: QuantConfig, *, calibration: Iterable[Any] | None = None
) -> None:
    """Quantize an exported float ONNX file with ONNX Runtime's tools and kernels (all eligible ops):

    ``dynamic_int8`` MatMulInteger/ConvInteger (weights int8, activations per call), ``static_int8`` QDQ
    int8 with ``calibration`` batches, ``int4_weight`` MatMulNBits (block = ``group_size``), ``fp16``.
    """
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"quantize_onnx takes a QuantConfig, got a {type(config).__name__} ({config!r}); pass "
                          "QuantConfig(method='dynamic_int8') (or QuantConfig.from_dict(...))")
    if config.op_types or config.op_names or config.exclude_op_names:
        raise ConfigError("quantize_onnx quantizes every eligible op; module names do not map to ONNX nodes. "
                          "Drop op_types/op_names/exclude_op_names, or quantize in PyTorch with quantize()")
    handlers = {"dynamic_int8": _ort_dynamic, "static_int8": _ort_static, "int4_weight": _ort_int4, "fp16": _ort_fp16}
    if config.method not in handlers:
        raise ConfigError(f"quantize_onnx supports {sorted(handlers)}, not {config.method!r}; "
                          f"{config.method} runs in PyTorch only (quantize(model, config))")
    if config.method == "static_int8" and calibration is None:
        raise ConfigError("static_int8 needs calibration=<iterable of model inputs>")
    names = _input_names(source)
    target = check_output_file(target, "quantize_onnx")
    if calibration is not None:
        calibration = checked_batches(calibration, len(names), "calibration")
    try:
        with quiet_onnx():
            atomic_write(target, lambda tmp: handlers[config.method](str(source), tmp, config, calibration))
    except SlimError:
        raise
    except OSError as err:
        raise ExportError(f"cannot write {str(target)!r} ({err.strerror or err}); choose a writable path") from None
    except Exception as err:  # ONNX Runtime's quantizers raise many types (its own among them)
        first = (str(err).strip().splitlines() or [""])[0][:300]
        raise ExportError(f"ONNX Runtime could not quantize {str(source)!r} with {config.method} "
                          f"({type(err).__name__}: {first}); check the calibration batches against the model's "
                          f"inputs {names}") from err


def _input_names(source: str | Path) -> list[str]:
    """The graph's input names; a missing, corrupt or invalid file is a CheckpointError."""
    import onnx

    path = Path(source)
    if not path.is_file():
        raise CheckpointError(f"ONNX file {str(path)!r} does not exist or is not a file; export the float model "
                              "with export_onnx first")
    try:
        model = onnx.load(str(path), load_external_data=False)
        onnx.checker.check_model(model)
    except Exception as err:  # onnx raises DecodeError, ValidationError, ... for a corrupt file
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"{str(path)!r} is not a readable ONNX model ({type(err).__name__}: {first}); "
                              "re-export it with export_onnx") from None
    initializers = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in initializers]


def _ort_dynamic(source: str, target: str, config: QuantConfig, calibration: Any) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(source, target, per_channel=config.per_channel, weight_type=QuantType.QInt8)


def _ort_static(source: str, target: str, config: QuantConfig, calibration: Iterable[Any]) -> None:
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    names = [i.name for i in onnx.load(source, load_external_data=False).graph.input]
    # U8S8 with reduce_range: ORT's advice for x86 without VNNI, where u8*s8 pairs can saturate int16.
    quantize_static(source, target, _Reader(calibration, names), quant_format=QuantFormat.QDQ, per_channel=True,
                    reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def _ort_int4(source: str, target: str, config: QuantConfig, calibration: Any) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = _gemm_to_matmul(onnx.load(source))
    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=config.group_size, is_symmetric=True)
    quantizer.process()
    quantizer.model.save_model_to_file(target, use_external_data_format=False)


def _ort_fp16(source: str, target: str, config: QuantConfig, calibration: Any) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save(convert_float_to_float16(onnx.load(source), keep_io_types=True), target)


def _gemm_to_matmul(model: Any) -> Any:
    """Rewrite ``Gemm(x, W, b)`` with a constant W as ``MatMul(x, W^T) + b``: ONNX Runtime's 4-bit
    quantizer only handles MatMul, and the exporter writes 2-D Linear layers as Gemm."""
    import onnx
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
        if node.op_type != "Gemm" or not plain or node.input[1] not in inits:
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        if attrs.get("transB", 0):
            weight = weight.T.copy()  # (out, in) -> (in, out): MatMul takes x @ W
        name = f"{node.input[1]}_matmul"
        model.graph.initializer.append(numpy_helper.from_array(weight, name))
        product = node.output[0] + ("_mm" if len(node.input) > 2 else "")
        nodes.append(helper.make_node("MatMul", [node.input[0], name], [product], name=f"{node.name}_matmul"))
        if len(node.input) > 2:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}_add"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {i for n in model.graph.node for i in n.input}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    onnx.checker.check_model(model)
    return model
