"""One container for every file slimtorch saves: tensors in safetensors, everything else in a JSON header.

A slimtorch file is a safetensors file whose metadata (safetensors' map of strings) is its header::

    format     "slimtorch-<kind>-v<version>"   which reader, and which layout of that kind
    slimtorch  the version of slimtorch that wrote it (files of slimtorch 0.1.0 have none)
    <field>    each field of the kind's description: a ``str`` field as it is, the others as JSON text

A format of several files (a compacted model's folder) keeps the same header as the JSON object of its
description file, beside a safetensors file of weights. Layouts that other tools read (PEFT's adapter
folders, Hugging Face's ``save_pretrained`` folders) keep theirs; their JSON and safetensors files go
through the same readers, with the same bounds and errors.

Each kind of file registers a :class:`Kind`: its version, its fields, a check of the description and of the
tensors' names, shapes and dtypes, and the words of its errors. Readers check the file's header, then
the description, then the tensors as the safetensors header lists them (nothing is loaded before all of
it passes); whatever fails is a :class:`~slimtorch.errors.CheckpointError` that names the file and the fix.
A pickle is refused unread::

    >>> import os, tempfile, torch
    >>> kind = Kind(name="example", version=1, title="example file", fix="save it again with write_file",
    ...             fields=(Field("note", str), Field("sizes", list)))
    >>> path = os.path.join(tempfile.mkdtemp(), "e.safetensors")
    >>> write_file(path, kind, {"note": "hello", "sizes": [2]}, {"w": torch.ones(2)})
    >>> contents = read_file(path, kind)
    >>> contents.description, contents.tensors["w"].tolist()
    ({'note': 'hello', 'sizes': [2]}, [1.0, 1.0])
    >>> second = Kind(name="second", version=1, title="second example file", fix="save it with save_second")
    >>> try:
    ...     read_file(path, second)
    ... except CheckpointError as err:
    ...     print(str(err).split(": ", 1)[1])
    it is a slimtorch example file (format 'slimtorch-example-v1'); save it with save_second
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open

from slimtorch.atomic import atomic_write, check_path
from slimtorch.errors import CheckpointError, ConfigError
from slimtorch.version import VERSION

__all__ = [
    "FORMAT_KEY",
    "MAX_HEADER_BYTES",
    "MAX_TENSORS",
    "WRITER_KEY",
    "Contents",
    "DescriptionError",
    "Field",
    "Kind",
    "TensorInfo",
    "description_text",
    "file_header",
    "inspect_tensors",
    "kinds",
    "read_description",
    "read_file",
    "read_json",
    "read_tensors",
    "register_kind",
    "write_file",
]

FORMAT_KEY, WRITER_KEY = "format", "slimtorch"
#: Bounds on what a file may hold before anything is parsed: the text of a header or description file
#: (a compaction record of a large LLM is a few MB), and the number of tensors (a state dict has thousands).
MAX_HEADER_BYTES = 64 << 20
MAX_TENSORS = 1 << 20
_FORMAT = re.compile(r"slimtorch-([a-z][a-z0-9_]*)-v(\d{1,6})")


class DescriptionError(Exception):
    """Raised by a kind's check: what is wrong with a description (the reader adds the file and the fix)."""


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as the safetensors header lists it (nothing read): shape, and dtype as safetensors names it
    (``"F32"``, ``"BOOL"``, ...)."""

    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class Field:
    """A field of a kind's description: its name and JSON type (``str``, ``dict`` or ``list``)."""

    name: str
    type: type
    required: bool = True


Check = Callable[[Mapping[str, Any], Mapping[str, TensorInfo]], None]


@dataclass(frozen=True, kw_only=True)
class Kind:
    """A kind of file: what its header holds and how its errors read.

    ``title`` names a file of the kind ("slimtorch model file"), ``readable`` what an unreadable one should
    have been ("safetensors model file"), ``described`` its description ("model description"), ``fix`` how
    to make a good one. ``check(description, tensors)`` raises :class:`DescriptionError` (or a
    CheckpointError); ``dtypes`` lists the only tensor dtypes the kind holds (empty: any). ``foreign``
    kinds also read safetensors files that carry no slimtorch header (other tools write them);
    ``header=False`` marks a layout another tool defines (no ``format`` to check)."""

    name: str
    version: int
    title: str
    fix: str
    readable: str = "safetensors file"
    described: str = "description"
    fields: tuple[Field, ...] = ()
    check: Check | None = None
    dtypes: tuple[str, ...] = ()
    foreign: bool = False
    header: bool = True

    @property
    def format(self) -> str:
        return f"slimtorch-{self.name}-v{self.version}"


_KINDS: dict[str, Kind] = {}


def register_kind(kind: Kind) -> Kind:
    """Make ``kind`` known, so that a file of it given to another kind's reader is named by what it is."""
    if not _FORMAT.fullmatch(f"slimtorch-{kind.name}-v{kind.version}"):
        raise ConfigError(f"a kind's name is a lower-case word (a-z, 0-9, _) and its version a positive number, "
                          f"got {kind.name!r} version {kind.version!r}")
    _KINDS[kind.name] = kind
    return kind


def kinds() -> dict[str, Kind]:
    """Every registered kind, by name."""
    return dict(_KINDS)


@dataclass(frozen=True)
class Contents:
    """What :func:`read_file` read: the description (decoded fields), the format version (None for a foreign
    file), the slimtorch version that wrote it (None when not recorded) and the tensors."""

    path: Path
    version: int | None
    writer: str | None
    description: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(repr=False)


# -- writing ----------------------------------------------------------------------------------------------


def file_header(kind: Kind, description: Mapping[str, Any]) -> dict[str, str]:
    """The safetensors metadata of a file of ``kind``: format, writer, each field (JSON unless ``str``)."""
    header = {FORMAT_KEY: kind.format, WRITER_KEY: VERSION}
    for f in kind.fields:
        if f.name in description:
            value = description[f.name]
            header[f.name] = value if f.type is str else json.dumps(value)
    return header


def description_text(kind: Kind, description: Mapping[str, Any]) -> str:
    """The JSON of a folder's description file: the header's format and writer, then the fields."""
    return json.dumps({FORMAT_KEY: kind.format, WRITER_KEY: VERSION, **description}, indent=1)


def write_file(path: str | Path, kind: Kind, description: Mapping[str, Any],
               tensors: Mapping[str, torch.Tensor]) -> None:
    """Write ``tensors`` with the header of ``kind`` and ``description`` to one safetensors file, atomically
    (:func:`slimtorch.atomic.atomic_write`). A description JSON cannot hold is a TypeError, raised before
    anything is written."""
    header = file_header(kind, description)
    # safetensors refuses tensors that share or stride their storage: contiguous private copies, on the CPU.
    flat = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    atomic_write(path, lambda tmp: safetensors.torch.save_file(flat, tmp, metadata=header))


# -- reading ----------------------------------------------------------------------------------------------


def _existing(path: str | Path, what: str, fix: str) -> Path:
    path = check_path(path, f"the {what}'s path")
    if path.is_dir():
        raise CheckpointError(f"{str(path)!r} is a folder, not a {what}; {fix}")
    if not path.is_file():
        raise CheckpointError(f"{what} {str(path)!r} does not exist; {fix}")
    return path


def _pickled(path: Path) -> str | None:
    """Why a file safetensors cannot read is a pickle (torch.save writes a zip archive holding one), or None.
    (Asked only after safetensors failed: its first 8 bytes, a header length, may look like these.)"""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return None
    if head == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        return ("it is a pickle, as torch.save writes: slimtorch never unpickles (it can run any code); convert "
                "it to safetensors where the file is trusted")
    return None


def _unreadable(path: Path, kind: Kind, reason: object) -> CheckpointError:
    return CheckpointError(f"{str(path)!r} is not a readable {kind.readable} ({reason}); {kind.fix}")


def _bad(path: Path, kind: Kind, what: str) -> CheckpointError:
    return CheckpointError(f"{str(path)!r} has a missing or corrupt {kind.described}: {what}; the file was edited "
                           f"or is corrupt: {kind.fix}")


def inspect_tensors(path: str | Path, kind: Kind) -> tuple[dict[str, str], dict[str, TensorInfo]]:
    """The metadata and tensor list of a safetensors file, read from its header alone (no tensor is loaded):
    a missing, pickled, corrupt or truncated file, or one beyond the bounds, is a CheckpointError."""
    path = _existing(path, kind.title, kind.fix)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            names = list(f.keys())
            if len(names) > MAX_TENSORS:
                raise CheckpointError(f"{str(path)!r} lists {len(names):,} tensors (at most {MAX_TENSORS:,}): it is "
                                      f"corrupt or not a {kind.title}; {kind.fix}")
            infos = {}
            for name in names:
                piece = f.get_slice(name)
                infos[name] = TensorInfo(tuple(piece.get_shape()), piece.get_dtype())
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise _unreadable(path, kind, _pickled(path) or err) from None
    size = sum(len(k) + len(v) for k, v in metadata.items())
    if size > MAX_HEADER_BYTES:
        raise CheckpointError(f"{str(path)!r} has a header of {size:,} characters (at most {MAX_HEADER_BYTES:,}): it "
                              f"is corrupt or not a {kind.title}; {kind.fix}")
    return metadata, infos


def _load(path: Path, kind: Kind, names: list[str], device: str | torch.device) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            return {name: f.get_tensor(name) for name in names}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:  # (changed since its header was read)
        raise _unreadable(path, kind, err) from None


def read_tensors(path: str | Path, kind: Kind, *,
                 device: str | torch.device = "cpu") -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The metadata and tensors of a safetensors file of weights whose header is elsewhere (a folder's
    description file, or a layout of another tool), through the checks of :func:`inspect_tensors`."""
    metadata, infos = inspect_tensors(path, kind)
    _check_dtypes(Path(path), kind, infos)
    return metadata, _load(Path(path), kind, list(infos), device)


def _check_dtypes(path: Path, kind: Kind, infos: Mapping[str, TensorInfo]) -> None:
    bad = sorted(name for name, info in infos.items() if kind.dtypes and info.dtype not in kind.dtypes)
    if bad:
        allowed = "/".join(d.lower() for d in kind.dtypes)
        raise CheckpointError(f"{str(path)!r} holds non-{allowed} tensors {bad[:3]}: it is not a {kind.title}; "
                              f"{kind.fix}")


def _check_format(path: Path, kind: Kind, header: Mapping[str, Any], title: str) -> int | None:
    """The version of ``kind`` the header says the file has (None for a foreign file its kind reads)."""
    found = header.get(FORMAT_KEY)
    match = _FORMAT.fullmatch(found) if isinstance(found, str) else None
    if match is None:
        if kind.foreign:
            return None
        raise CheckpointError(f"{str(path)!r} is not a {title} (format {found!r}, expected {kind.format!r}); "
                              f"{kind.fix}")
    name, version = match[1], int(match[2])
    if name != kind.name:
        other = _KINDS[name].title if name in _KINDS else f"slimtorch {name} file"
        raise CheckpointError(f"{str(path)!r} is not a {title}: it is a {other} (format {found!r}); {kind.fix}")
    if version > kind.version:
        writer = header.get(WRITER_KEY) if isinstance(header.get(WRITER_KEY), str) else "version not recorded"
        raise CheckpointError(f"{str(path)!r} was written by a newer slimtorch ({writer}) in format {found!r}; "
                              f"slimtorch {VERSION} reads {kind.name} files up to version {kind.version}: "
                              "upgrade slimtorch (pip install -U slimtorch)")
    if version < 1:
        raise CheckpointError(f"{str(path)!r} has format {found!r}, which no slimtorch wrote; {kind.fix}")
    return version


def _decode(path: Path, kind: Kind, header: Mapping[str, Any], *, text: bool) -> dict[str, Any]:
    """The description's fields with their types checked (in a file's metadata, non-``str`` fields are JSON)."""
    description = {}
    for f in kind.fields:
        if f.name not in header:
            if f.required:
                raise _bad(path, kind, f"{f.name!r} must be a {f.type.__name__}, but it is missing")
            continue
        value = header[f.name]
        if text and f.type is not str:
            try:
                value = json.loads(value)
            except (ValueError, RecursionError) as err:
                raise _bad(path, kind, f"{f.name!r} is not valid JSON ({err})") from None
        if not isinstance(value, f.type):
            raise _bad(path, kind, f"{f.name!r} must be a {f.type.__name__}, got {type(value).__name__}")
        description[f.name] = value
    return description


def _run_check(path: Path, kind: Kind, description: Mapping[str, Any], infos: Mapping[str, TensorInfo]) -> None:
    if kind.check is None:
        return
    try:
        kind.check(description, infos)
    except DescriptionError as err:
        raise _bad(path, kind, str(err)) from None


def read_file(path: str | Path, kind: Kind, *, device: str | torch.device = "cpu") -> Contents:
    """Read a file of ``kind`` written by :func:`write_file`: the file, its tensors' dtypes, its format and
    version, its description and the kind's check all pass before a tensor is loaded."""
    metadata, infos = inspect_tensors(path, kind)
    path = Path(path)
    _check_dtypes(path, kind, infos)
    version = _check_format(path, kind, metadata, kind.title)
    description = _decode(path, kind, metadata, text=True) if version is not None else {}
    _run_check(path, kind, description, infos)
    writer = metadata.get(WRITER_KEY)
    return Contents(path, version, writer, description, _load(path, kind, list(infos), device))


def read_json(path: str | Path, kind: Kind) -> Any:
    """A JSON file of a folder of ``kind`` (bounded in size), parsed; unreadable JSON is a CheckpointError."""
    path = _existing(path, f"{kind.described} file", kind.fix)
    size = path.stat().st_size
    if size > MAX_HEADER_BYTES:
        raise CheckpointError(f"{str(path)!r} is {size:,} bytes (at most {MAX_HEADER_BYTES:,}): it is corrupt or not "
                              f"a {kind.title}'s {kind.described}; {kind.fix}")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as err:  # (UnicodeDecodeError is a ValueError)
        raise CheckpointError(f"{str(path)!r} is unreadable: not valid JSON ({err}); the file is corrupt: "
                              f"{kind.fix}") from None


def read_description(path: str | Path, kind: Kind) -> dict[str, Any]:
    """The description file of a folder of ``kind``, checked: its header's format and version and its fields
    (``header=False``: a JSON object, checked by the kind as a whole)."""
    data = read_json(path, kind)
    path = Path(path)
    if not kind.header:
        if not isinstance(data, dict):
            raise CheckpointError(f"{str(path)!r} is not a JSON object (a JSON {type(data).__name__}); {kind.fix}")
        _run_check(path, kind, data, {})
        return data
    title = f"{kind.format} description"
    if not isinstance(data, dict):
        raise CheckpointError(f"{str(path)!r} is not a {title} (a JSON {type(data).__name__}); {kind.fix}")
    _check_format(path, kind, data, title)
    description = _decode(path, kind, data, text=False)
    _run_check(path, kind, description, {})
    return description
