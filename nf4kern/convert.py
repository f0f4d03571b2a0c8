"""Streaming checkpoint conversion to bitsandbytes' 4-bit layout, and quantization-error reports.

`quantize_checkpoint` reads a float safetensors file, or a Hugging Face folder (one
model.safetensors, or shards listed in model.safetensors.index.json), one tensor at a time and
writes the same checkpoint with every eligible weight replaced by the entries bitsandbytes and
transformers save for a 4-bit Linear. For a folder whose config.json transformers can build (on
the meta device: no weights), the eligible weights are those of the modules transformers'
bitsandbytes 4-bit loading turns into Linear4bit, GPT-2's Conv1D ones transposed as it expects;
otherwise they are chosen by name (`Selection`). The entries: `<name>` (packed codes), `<name>.absmax`,
`<name>.quant_map`, [`<name>.nested_absmax`, `<name>.nested_quant_map`] and
`<name>.quant_state.bitsandbytes__<type>`. Memory stays near the size of one tensor: tensors
are copied or quantized into a data file as they are read, and the output file (header + data)
is assembled next to its destination and moved into place with os.replace, so an interrupted
run leaves no partial checkpoint. A folder is built in a temporary folder beside OUT and
renamed into place at the end.

A checkpoint with 4-bit weights and none left to quantize is refused; in a partly quantized one
the 4-bit entries are copied unchanged.

`inspect_checkpoint` quantizes the eligible tensors in memory and reports their error (for one
with NaN or inf, which quantize refuses: how many, and where the first is), and describes the
tensors that are already in bitsandbytes' layout.
"""
from __future__ import annotations

import contextlib
import enum
import errno
import json
import math
import os
import re
import shutil
import struct
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import codebook as cb
from .checkpoint import is_quant_state_key
from .functional import NonFiniteError, dequantize_4bit, quantize_4bit
from .quant_state import QuantState

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

# Without a model to tell module types, the tensors transformers leaves in the load dtype are
# guessed by name: embeddings (not nn.Linear), the output head (lm_head, kept in full precision)
# and norms (1-D, but some models have 2-D norm weights).
DEFAULT_SKIP = r"(^|\.)(lm_head|[^.]*embed[^.]*|wte|wpe|[^.]*norm[^.]*|ln_[^.]*)(\.|$)"

# safetensors dtype name -> bytes per element (sub-byte and unknown types are copied unchecked).
ST_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}
FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
TORCH_TO_ST = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.uint8: "U8"}
STORAGE = {"uint8": torch.uint8, "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")
# Model files in other formats are not copied into a quantized folder.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
_MAX_HEADER = 100 * 1024 * 1024
_COPY_CHUNK = 16 * 1024 * 1024
_STAT_CHUNK = 1 << 22


class ConvertError(Exception):
    """An expected failure (bad input, bad option, unwritable output): reported in one line."""


class NonFiniteWeight(ConvertError):
    """A weight to quantize holds NaN or inf: `count` of them, the first at `index` (of the weight
    as quantized, [out, in] for a Conv1D)."""

    def __init__(self, name: str, count: int, index: tuple[int, ...]):
        self.count, self.index = count, index
        super().__init__(f"cannot quantize {name}: {count} NaN/inf value(s), the first at {list(index)}; "
                         "4-bit blocks cannot hold them")


# -- options --------------------------------------------------------------------------------------


@dataclass
class QuantOptions:
    blocksize: int = 64
    quant_type: str = "nf4"
    double_quant: bool = True
    quant_storage: str = "uint8"
    compute_dtype: str = "bfloat16"
    skip: str | None = None  # tensors never quantized; None: none with a model, DEFAULT_SKIP by name

    def __post_init__(self):
        if self.blocksize not in cb.BLOCKSIZES:
            raise ConvertError(f"blocksize must be one of {', '.join(map(str, cb.BLOCKSIZES))}, got {self.blocksize}")
        if self.quant_type not in cb.QUANT_TYPES:
            raise ConvertError(f"quant type must be one of {', '.join(cb.QUANT_TYPES)}, got {self.quant_type!r}")
        if self.quant_storage not in STORAGE:
            raise ConvertError(f"quant storage must be one of {', '.join(STORAGE)}, got {self.quant_storage!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ConvertError(f"compute dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {self.compute_dtype!r}")
        try:
            self.skip_re = re.compile(self.skip) if self.skip is not None else None
        except re.error as e:
            raise ConvertError(f"--skip is not a valid regular expression ({e}): {self.skip!r}") from None

    def describe(self) -> str:
        return (
            f"{self.quant_type}, blocksize {self.blocksize}, double quant {'on' if self.double_quant else 'off'}, "
            f"storage {self.quant_storage}"
        )

    def quantization_config(self, skip_modules: list[str] | None) -> dict:
        """config.json's "quantization_config", as transformers' BitsAndBytesConfig saves it."""
        return {
            "_load_in_4bit": True,
            "_load_in_8bit": False,
            "bnb_4bit_compute_dtype": self.compute_dtype,
            "bnb_4bit_quant_storage": self.quant_storage,
            "bnb_4bit_quant_type": self.quant_type,
            "bnb_4bit_use_double_quant": self.double_quant,
            "llm_int8_enable_fp32_cpu_offload": False,
            "llm_int8_has_fp16_weight": False,
            "llm_int8_skip_modules": skip_modules,
            "llm_int8_threshold": 6.0,
            "load_in_4bit": True,
            "load_in_8bit": False,
            "quant_method": "bitsandbytes",
        }


# -- reading safetensors ------------------------------------------------------------------------


@dataclass
class TensorInfo:
    name: str
    dtype: str
    shape: tuple
    begin: int  # absolute offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: Path) -> tuple[list[TensorInfo], dict]:
    """The tensors of a safetensors file (sorted by position) and its metadata, validated."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ConvertError(f"{path} is not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > size - 8 or n > _MAX_HEADER:
            raise ConvertError(f"{path} is not a safetensors file (header length {n} does not fit its {size} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConvertError(f"{path} is not a safetensors file (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise ConvertError(f"{path} is not a safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise ConvertError(f"{path}: corrupt safetensors header (__metadata__ is not an object)")
    data_start, data_size = 8 + n, size - 8 - n
    infos = []
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            ok = isinstance(dtype, str) and all(isinstance(d, int) and d >= 0 for d in shape)
            ok = ok and isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= data_size
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            if isinstance(entry, dict) and isinstance(entry.get("data_offsets"), list) and entry["data_offsets"][-1:] and \
                    isinstance(entry["data_offsets"][-1], int) and entry["data_offsets"][-1] > data_size:
                raise ConvertError(f"{path} is truncated: {name!r} ends at byte {data_start + entry['data_offsets'][-1]}, "
                                   f"the file has {size}")
            raise ConvertError(f"{path}: corrupt safetensors header (bad entry for {name!r})")
        if dtype in ST_ITEMSIZE and end - begin != math.prod(shape) * ST_ITEMSIZE[dtype]:
            raise ConvertError(f"{path}: corrupt safetensors header ({name!r} has {end - begin} bytes for {dtype} {list(shape)})")
        infos.append(TensorInfo(name, dtype, shape, data_start + begin, data_start + end))
    infos.sort(key=lambda i: (i.begin, i.name))
    return infos, metadata


class _Reader:
    """Tensors of one file: floating tensors through safetensors.safe_open, raw byte ranges
    for the tensors that are copied unchanged (any dtype, no conversion, chunked)."""

    def __init__(self, path: Path):
        safetensors = _safetensors()
        self.path = path
        self._error = safetensors.SafetensorError
        try:
            self._handle = safetensors.safe_open(str(path), framework="pt", device="cpu")
            self._handle.__enter__()
        except self._error as e:
            raise ConvertError(f"{path}: not a valid safetensors file ({e})") from None
        self._raw = open(path, "rb")

    def tensor(self, name: str) -> torch.Tensor:
        try:
            return self._handle.get_tensor(name)
        except self._error as e:
            raise ConvertError(f"{self.path}: cannot read {name!r} ({e})") from None

    def chunks(self, info: TensorInfo):
        """The raw bytes of a tensor, in chunks of at most _COPY_CHUNK."""
        self._raw.seek(info.begin)
        left = info.nbytes
        while left:
            chunk = self._raw.read(min(left, _COPY_CHUNK))
            if not chunk:
                raise ConvertError(f"{self.path}: file ends inside {info.name!r}")
            yield chunk
            left -= len(chunk)

    def close(self) -> None:
        self._raw.close()
        self._handle.__exit__(None, None, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _safetensors():
    try:
        import safetensors
    except ImportError:
        raise ConvertError("this command needs the safetensors package (pip install safetensors)") from None
    return safetensors


# -- resolving IN ---------------------------------------------------------------------------------


@dataclass
class Source:
    path: Path
    folder: bool
    shards: list[str]  # file names (folder) or the one file's name
    index: dict | None = None

    def shard_path(self, shard: str) -> Path:
        return self.path / shard if self.folder else self.path


def resolve_input(path: str | os.PathLike) -> Source:
    p = Path(path)
    if not p.exists():
        raise ConvertError(f"{p}: no such file or directory")
    if p.is_file():
        return Source(p, False, [p.name])
    if not p.is_dir():
        raise ConvertError(f"{p} is neither a file nor a folder")
    if (p / INDEX_NAME).is_file():
        try:
            index = json.loads((p / INDEX_NAME).read_text(encoding="utf-8"))
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict) or not weight_map:
                raise TypeError
            shards = list(dict.fromkeys(weight_map.values()))
            if not all(isinstance(s, str) for s in shards):
                raise TypeError
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            raise ConvertError(f"{p / INDEX_NAME} is not a valid safetensors index (no weight_map)") from None
        for shard in shards:
            if Path(shard).name != shard or shard in ("", ".", ".."):
                raise ConvertError(f"{p / INDEX_NAME} names a shard outside the folder: {shard!r}")
            if not (p / shard).is_file():
                raise ConvertError(f"{p / INDEX_NAME} lists shard {shard!r}, which is missing")
        return Source(p, True, shards, index)
    if (p / SINGLE_NAME).is_file():
        return Source(p, True, [SINGLE_NAME])
    raise ConvertError(f"{p} has neither {SINGLE_NAME} nor {INDEX_NAME} (only safetensors checkpoints are supported)")


# -- writing --------------------------------------------------------------------------------------


def _file_in_the_way(dest: Path) -> Path | None:
    """The nearest existing ancestor of dest when it is not a folder (nothing can be below it)."""
    nearest = next((p for p in dest.parents if p.exists()), None)
    return nearest if nearest is not None and not nearest.is_dir() else None


def _reason(e: OSError, dest: Path) -> str:
    """Why dest cannot be written, in words about dest rather than about a temporary file."""
    if e.errno == errno.ENOSPC:
        return "no space left on device"
    if e.errno == errno.ENOTDIR:
        blocker = _file_in_the_way(dest)
        if blocker is not None:
            return f"{blocker} is not a folder"
    if e.errno == errno.ENOENT and dest.parent.is_dir():  # e.g. /proc: the folder exists, creating fails
        return f"nothing can be created in {dest.parent}"
    return e.strerror or str(e)


@contextlib.contextmanager
def _writing(dest: Path):
    """OSErrors while writing dest or its temporaries become 'cannot write dest: reason'."""
    try:
        yield
    except OSError as e:
        raise ConvertError(f"cannot write {dest}: {_reason(e, dest)}") from None


def _check_parent(dest: Path) -> None:
    if dest.parent.is_dir():
        return
    blocker = _file_in_the_way(dest)
    if blocker is not None:
        raise ConvertError(f"cannot write {dest}: {blocker} is not a folder")
    raise ConvertError(f"cannot write {dest}: folder {dest.parent} does not exist")


def check_output_file(dest: Path) -> None:
    """Refuse a destination file whose folder is missing or that exists as something other than a
    regular file (a folder, a device, a pipe): os.replace would put the file in its place."""
    _check_parent(dest)
    if dest.exists() and not dest.is_file():
        raise ConvertError(f"cannot write {dest}: it exists and is not a regular file")


def output_folder(path: str | os.PathLike) -> Path:
    """The folder path, created if missing and checked writable, before any long work that ends
    by writing there."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ConvertError(f"cannot write {folder}: it exists and is not a folder")
    with _writing(folder):
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    return folder


class OutputFile:
    """A temporary file beside dest (`file`, opened w+b) that commit() moves onto dest, so dest is
    either complete or untouched; errors name `shown` (dest unless given), never the temporary."""

    def __init__(self, dest: Path, suffix: str = ".tmp", shown: Path | None = None):
        self.dest, self.shown = dest, shown or dest
        with self.writing():
            fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=suffix, dir=dest.parent)
        self.path = Path(tmp)
        self.file = os.fdopen(fd, "w+b")

    def writing(self):
        return _writing(self.shown)

    def commit(self) -> None:
        with self.writing():
            self.file.flush()
            os.fchmod(self.file.fileno(), 0o666 & ~_umask())  # mkstemp's 0600 -> what open() would give
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.path, self.dest)

    def discard(self) -> None:
        """Remove the temporary unless committed."""
        self.file.close()
        _unlink(self.path)


class SafetensorsWriter:
    """Writes one safetensors file in two passes: tensor bytes stream to a temporary data file
    while their offsets are recorded; finish() writes header + data to an OutputFile and commits
    it. abort() (or an exception inside a `with`) removes both temporary files. Write errors name
    `shown` (dest unless given)."""

    def __init__(self, dest: Path, metadata: dict | None = None, shown: Path | None = None):
        self.dest, self.shown = dest, shown or dest
        self.metadata = {**(metadata or {}), "format": "pt"}
        self.header: dict[str, dict] = {}
        self.size = 0
        with _writing(self.shown):
            fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".data.tmp", dir=dest.parent)
        self._data_path = Path(tmp)
        self._data = os.fdopen(fd, "w+b")
        self._final: OutputFile | None = None

    def _record(self, name: str, dtype: str, shape, nbytes: int) -> None:
        if name in self.header:
            raise ConvertError(f"{self.shown}: tensor {name!r} would be written twice")
        self.header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [self.size, self.size + nbytes]}
        self.size += nbytes

    def add_tensor(self, name: str, t: torch.Tensor) -> None:
        t = t.detach().contiguous().cpu()
        data = t.reshape(-1).view(torch.uint8).numpy()
        with _writing(self.shown):
            self._data.write(memoryview(data))
        self._record(name, TORCH_TO_ST[t.dtype], t.shape, data.nbytes)

    def add_copy(self, info: TensorInfo, reader: _Reader) -> None:
        for chunk in reader.chunks(info):
            with _writing(self.shown):
                self._data.write(chunk)
        self._record(info.name, info.dtype, info.shape, info.nbytes)

    def finish(self) -> int:
        """Assemble and move into place; returns the file size."""
        header = {"__metadata__": self.metadata, **self.header}
        blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
        blob += b" " * (-len(blob) % 8)
        self._final = OutputFile(self.dest, shown=self.shown)
        with self._final.writing():
            out = self._final.file
            out.write(struct.pack("<Q", len(blob)))
            out.write(blob)
            self._data.flush()
            self._data.seek(0)
            shutil.copyfileobj(self._data, out, _COPY_CHUNK)
        self._close_data()
        self._final.commit()
        self._final = None
        return 8 + len(blob) + self.size

    def _close_data(self) -> None:
        if not self._data.closed:
            self._data.close()
        _unlink(self._data_path)

    def abort(self) -> None:
        self._close_data()
        if self._final is not None:
            self._final.discard()
            self._final = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


# -- progress -------------------------------------------------------------------------------------


class Progress:
    """A byte-count progress bar on stderr: tqdm when installed, else a small one of ours.
    Shown only when stderr is a terminal unless `enabled` is given."""

    def __init__(self, total: int, desc: str, enabled: bool | None = None):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.total, self.done, self.desc, self._last, self._tqdm = max(total, 1), 0, desc, 0.0, None
        if not self.enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self._tqdm = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, leave=False)

    def update(self, n: int, label: str = "") -> None:
        self.done += n
        if not self.enabled:
            return
        if self._tqdm is not None:
            self._tqdm.set_postfix_str(label[-40:], refresh=False)
            self._tqdm.update(n)
            return
        now = time.monotonic()
        if now - self._last < 0.1 and self.done < self.total:
            return
        self._last = now
        frac = min(self.done / self.total, 1.0)
        bar = "#" * int(frac * 30)
        sys.stderr.write(f"\r{self.desc} [{bar:<30}] {frac:4.0%} {_human(self.done)}/{_human(self.total)} {label[-40:]:<40}")
        sys.stderr.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        if self._tqdm is not None:
            self._tqdm.close()
        else:
            sys.stderr.write("\r" + " " * 120 + "\r")
            sys.stderr.flush()


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TB"


human_bytes = _human


# -- statistics -----------------------------------------------------------------------------------


def _chunks(w: torch.Tensor, w_hat: torch.Tensor):
    a, b = w.reshape(-1), w_hat.reshape(-1)
    for i in range(0, a.numel(), _STAT_CHUNK):
        yield a[i : i + _STAT_CHUNK].double(), b[i : i + _STAT_CHUNK].double()


def sqnr_db(signal_power: float, noise_power: float) -> float:
    if noise_power == 0:
        return math.inf
    if signal_power == 0:
        return -math.inf
    return 10 * math.log10(signal_power / noise_power)


@dataclass
class ErrorStats:
    sqnr_db: float
    max_abs: float
    mean_abs: float
    rel: float
    outliers: int
    std: float
    hist: tuple | None = None  # (counts, lo, hi) of the error normalised by std


def error_stats(w: torch.Tensor, w_hat: torch.Tensor, outlier_std: float | None = 6.0, bins: int = 0) -> ErrorStats:
    """Error of w_hat against w, accumulated in float64 over chunks (memory: a chunk). A second
    pass counts outliers (|w| > outlier_std * std; None: not counted) and histograms the error."""
    n = w.numel()
    s_w = s_w2 = s_abs_w = s_e2 = s_abs_e = 0.0
    max_e = 0.0
    for a, b in _chunks(w, w_hat):
        e = a - b
        s_w += float(a.sum())
        s_w2 += float(a.square().sum())
        s_abs_w += float(a.abs().sum())
        s_e2 += float(e.square().sum())
        s_abs_e += float(e.abs().sum())
        max_e = max(max_e, float(e.abs().max()))
    mean = s_w / n
    std = math.sqrt(max(s_w2 / n - mean * mean, 0.0))
    outliers = 0 if outlier_std is not None else -1
    counts = None
    hi = max_e / std if std > 0 else max_e
    if bins:
        counts = torch.zeros(bins, dtype=torch.float64)
    for a, b in _chunks(w, w_hat) if outlier_std is not None or bins else ():
        if outlier_std is not None:
            outliers += int((a.abs() > outlier_std * std).sum())
        if counts is not None and hi > 0:
            e = (a - b) / (std if std > 0 else 1.0)
            counts += torch.histc(e, bins=bins, min=-hi, max=hi)
    return ErrorStats(
        sqnr_db=sqnr_db(s_w2 / n, s_e2 / n),
        max_abs=max_e,
        mean_abs=s_abs_e / n,
        rel=s_abs_e / s_abs_w if s_abs_w else (0.0 if s_abs_e == 0 else math.inf),
        outliers=outliers,
        std=std,
        hist=(counts.tolist(), -hi, hi) if counts is not None else None,
    )


# -- tensors that can be quantized ----------------------------------------------------------------


def quantized_names(infos: list[TensorInfo]) -> set[str]:
    """Names already in bitsandbytes' layout (a '<name>.quant_state.bitsandbytes__*' entry)."""
    return {i.name.rsplit(".quant_state.bitsandbytes__", 1)[0] for i in infos if ".quant_state.bitsandbytes__" in i.name}


def is_candidate(info: TensorInfo) -> bool:
    """A 2-D floating '.weight' with data: what a Linear's weight looks like."""
    return info.name.endswith(".weight") and info.dtype in FLOAT_DTYPES and len(info.shape) == 2 and info.numel > 0


# -- which weights are quantized ------------------------------------------------------------------


class Action(enum.Enum):
    COPY = "copy"  # not a weight that is quantized: copied unchanged
    QUANTIZE = "quantize"
    TRANSPOSE = "transpose"  # a Conv1D weight, stored [in, out]: quantized as [out, in], like a Linear's
    HELD_BACK = "held back"  # would be quantized, but the skip pattern matches its name
    NOT_IN_MODEL = "not in model"  # a 2-D weight the model built from config.json has no parameter (of its shape) for

    @property
    def quantizes(self) -> bool:
        return self in (Action.QUANTIZE, Action.TRANSPOSE)

    def weight(self, reader: "_Reader", info: TensorInfo) -> torch.Tensor:
        """The weight to quantize, in Linear orientation [out, in]."""
        w = reader.tensor(info.name)
        return w.t() if self is Action.TRANSPOSE else w


@dataclass
class ModelRule:
    """What transformers' bitsandbytes 4-bit loading (transformers 5) does with a model class,
    read off a weightless instance of it: which modules become Linear4bit."""

    name: str  # the model class
    prefix: str  # base_model_prefix: a checkpoint may carry it or not
    params: dict[str, tuple]  # parameter name -> shape, tied ones under each of their names
    linear: dict[str, bool]  # module -> its weight is stored [in, out] (Conv1D), for the modules converted
    not_converted: list[str]  # transformers' default skips: output embeddings, tied weights, last parameter

    def param_of(self, key: str, shape: tuple) -> str | None:
        """The model's parameter for a checkpoint tensor: same name, with or without the base-model
        prefix, and same shape (else config.json does not describe this checkpoint)."""
        names = [key]
        if self.prefix:
            names += [f"{self.prefix}.{key}", key.removeprefix(f"{self.prefix}.")]
        return next((n for n in names if self.params.get(n) == shape), None)


def _matches_module(name: str, patterns) -> bool:
    """transformers' test for modules_to_not_convert: a pattern (a regex) matching from the start
    of the name up to a '.' or its end, or the name ending with the pattern."""
    return any(re.match(rf"(?:{p})(?:(?<=\.)|(?=\.|$))", name) or name.endswith(p) for p in patterns)


def _rule_of(model: nn.Module, conv1d: type) -> ModelRule:
    """transformers converts each module that is exactly nn.Linear, or a Conv1D, unless it is the
    output embedding, holds a tied weight or the last parameter (its defaults when the config lists
    no llm_int8_skip_modules), or is in _keep_in_fp32_modules."""
    params = dict(model.named_parameters(remove_duplicate=False))
    names_of: dict[int, list[str]] = {}
    for name, p in params.items():
        names_of.setdefault(id(p), []).append(name)
    tied = [n for names in names_of.values() if len(names) > 1 for n in names]
    last = [name for name, _ in model.named_parameters()][-1:]
    output = model.get_output_embeddings()
    output_names = [name for name, m in model.named_modules() if output is not None and m is output]
    not_converted = sorted({n.removesuffix(".weight") for n in tied + last} | set(output_names))
    keep = not_converted + list(getattr(model, "_keep_in_fp32_modules", None) or ())
    linear = {
        name: isinstance(m, conv1d)
        for name, m in model.named_modules()
        if (type(m) is nn.Linear or isinstance(m, conv1d)) and not _matches_module(name, keep)
    }
    prefix = getattr(model, "base_model_prefix", "") or ""
    shapes = {name: tuple(p.shape) for name, p in params.items()}
    return ModelRule(type(model).__name__, prefix, shapes, linear, not_converted)


@contextlib.contextmanager
def _quiet(transformers):
    """Config and model construction log warnings (token ids, defaults) irrelevant here."""
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers.logging.set_verbosity(level)


def model_rule(folder: Path) -> tuple[ModelRule | None, str]:
    """The rule for the model folder/config.json describes (its first architecture transformers
    knows, else AutoModel), built on the meta device; or None and why not."""
    try:
        import transformers
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None, "transformers is not installed"
    try:
        with _quiet(transformers), torch.device("meta"):
            # Never a model's own code (auto_map): no prompt, nothing run; such a model is not known.
            config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=False)
            known = [getattr(transformers, a, None) for a in getattr(config, "architectures", None) or ()]
            classes = [c for c in known if isinstance(c, type) and issubclass(c, transformers.PreTrainedModel)]
            model = classes[0](config) if classes else transformers.AutoModel.from_config(config, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - any failure of config parsing or a model's constructor: fall back to names
        first_line = next(iter(str(e).splitlines()), "")
        return None, f"transformers cannot build the model of {folder / CONFIG_NAME} ({type(e).__name__}: {first_line})"
    return _rule_of(model, Conv1D), ""


@dataclass
class Selection:
    """Which tensors are quantized. With a model rule: the weights of the modules transformers
    loads as Linear4bit, less those `skip` matches. Without (`why_by_name` says why): every
    floating 2-D '*.weight' whose name `skip` does not match."""

    skip: re.Pattern | None
    model: ModelRule | None = None
    why_by_name: str = ""
    config_unused: bool = False  # by name although a config.json is there: the output may not load right

    def choose(self, info: TensorInfo, already: set[str]) -> tuple[Action, str]:
        """What to do with a tensor, and its module (the model's name for it when there is a model)."""
        if info.name in already or is_quant_state_key(info.name) or not is_candidate(info):
            return Action.COPY, ""
        if self.model is None:
            module = info.name.removesuffix(".weight")
            return (Action.HELD_BACK if self.skip.search(info.name) else Action.QUANTIZE), module
        param = self.model.param_of(info.name, info.shape)
        if param is None:
            return Action.NOT_IN_MODEL, info.name.removesuffix(".weight")
        module = param.removesuffix(".weight")
        if module not in self.model.linear:
            return Action.COPY, module
        if self.skip is not None and self.skip.search(info.name):
            return Action.HELD_BACK, module
        return (Action.TRANSPOSE if self.model.linear[module] else Action.QUANTIZE), module

    def describe(self) -> str:
        skip = f", nor names matching --skip {self.skip.pattern!r}" if self.skip is not None else ""
        if self.model is not None:
            return (f"those transformers loads as Linear4bit in {self.model.name} (from config.json): nn.Linear, and "
                    f"Conv1D transposed; not output embeddings, tied weights or _keep_in_fp32_modules{skip}")
        rule = ("names matching --skip" if self.skip.pattern != DEFAULT_SKIP else
                "embeddings, lm_head, norms")
        return (f"by name ({self.why_by_name}): floating 2-D '*.weight' except {rule}; "
                "Conv1D and other non-Linear 2-D weights are not recognised")


def select(source: Source, opts: QuantOptions) -> Selection:
    """The selection for a source: by module type when it is a folder whose config.json builds."""
    by_name = opts.skip_re or re.compile(DEFAULT_SKIP)
    if not source.folder:
        if (source.path.parent / CONFIG_NAME).is_file():
            return Selection(by_name, why_by_name="IN is a file: give its folder to use the config.json beside it",
                             config_unused=True)
        return Selection(by_name, why_by_name="no config.json")
    if not (source.path / CONFIG_NAME).is_file():
        return Selection(by_name, why_by_name="no config.json")
    rule, why = model_rule(source.path)
    if rule is None:
        return Selection(by_name, why_by_name=why, config_unused=True)
    return Selection(opts.skip_re, rule)


# -- quantizing -----------------------------------------------------------------------------------


def quantize_entries(name: str, w: torch.Tensor, opts: QuantOptions) -> tuple[dict[str, torch.Tensor], QuantState, torch.Tensor]:
    """{key: tensor} with bitsandbytes' keys for the 4-bit weight `name`, its state and packed data."""
    try:
        packed, state = quantize_4bit(w, opts.blocksize, opts.quant_type, opts.double_quant, STORAGE[opts.quant_storage])
    except NonFiniteError as e:  # the API's hint (allow_nonfinite) means nothing on the command line
        raise NonFiniteWeight(name, e.count, e.index) from None
    except ValueError as e:
        raise ConvertError(f"cannot quantize {name}: {e}") from None
    entries = {name: packed}
    entries.update({f"{name}.{k}": v for k, v in state.as_dict(packed=True).items()})
    return entries, state, packed


@dataclass
class TensorReport:
    name: str
    shape: tuple
    dtype: str
    stats: ErrorStats | None  # None when not finite
    stored_bytes: int  # all entries written for it
    transposed: bool = False  # a Conv1D weight, quantized as [out, in] (shape is that)
    nonfinite: tuple[int, tuple[int, ...]] | None = None  # inspect: NaN/inf (count, first index in shape): not quantized


@dataclass
class Summary:
    source: Source
    out: Path
    selection: Selection
    bytes_in: int = 0
    bytes_out: int = 0
    copied: int = 0
    quantized: list[TensorReport] = field(default_factory=list)
    skipped_modules: list[str] = field(default_factory=list)  # held back by the skip pattern
    not_in_model: list[str] = field(default_factory=list)  # 2-D weights the model has no place for
    config_written: bool = False
    other_files: list[str] = field(default_factory=list)
    ignored_files: list[str] = field(default_factory=list)


def _quantize_file(src: Path, dest: Path, opts: QuantOptions, progress: Progress, summary: Summary,
                   shown: Path) -> dict[str, int]:
    """Quantize one safetensors file into dest (`shown` in errors); returns {tensor name: bytes}
    of what was written."""
    infos, metadata = read_header(src)
    already = quantized_names(infos)
    with _Reader(src) as reader, SafetensorsWriter(dest, metadata, shown) as writer:
        for info in infos:
            action, module = summary.selection.choose(info, already)
            if action.quantizes:
                w = action.weight(reader, info)
                entries, state, packed = quantize_entries(info.name, w, opts)
                stats = error_stats(w, dequantize_4bit(packed, state), outlier_std=None)
                for key, t in entries.items():
                    writer.add_tensor(key, t)
                stored = sum(t.numel() * t.element_size() for t in entries.values())
                summary.quantized.append(TensorReport(info.name, tuple(w.shape), info.dtype, stats, stored,
                                                      action is Action.TRANSPOSE))
                del w, entries, packed, state
            else:
                if action is Action.HELD_BACK:
                    summary.skipped_modules.append(module)
                elif action is Action.NOT_IN_MODEL:
                    summary.not_in_model.append(info.name)
                writer.add_copy(info, reader)
                summary.copied += 1
            progress.update(info.nbytes, info.name)
        names = {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in writer.header.items()}
        summary.bytes_in += src.stat().st_size
        summary.bytes_out += writer.finish()
    return names


def quantize_checkpoint(src: str | os.PathLike, out: str | os.PathLike, opts: QuantOptions, progress: bool | None = None) -> Summary:
    source = resolve_input(src)
    out = Path(out)
    if source.folder:
        return _quantize_folder(source, out, opts, progress)
    if out.is_dir():
        out = out / source.path.name
    check_output_file(out)
    if out.exists() and out.resolve() == source.path.resolve():
        raise ConvertError(f"OUT is the input file {source.path}: choose another path")
    infos, _ = read_header(source.path)
    summary = Summary(source, out, select(source, opts))
    _refuse_if_quantized(source, {source.path.name: infos}, summary.selection)
    bar = Progress(sum(i.nbytes for i in infos), "quantize", progress)
    try:
        _quantize_file(source.path, out, opts, bar, summary, out)
    finally:
        bar.close()
    return summary


def _refuse_if_quantized(source: Source, headers: dict[str, list[TensorInfo]], selection: Selection) -> None:
    """Weights in bitsandbytes' layout and none left to quantize: OUT would be a copy, so the
    checkpoint is refused, as a folder whose config.json says it is quantized. With some left, they
    are quantized and the 4-bit ones copied."""
    already = {shard: quantized_names(infos) for shard, infos in headers.items()}
    if not any(already.values()):
        return
    if any(selection.choose(i, already[shard])[0].quantizes for shard, infos in headers.items() for i in infos):
        return
    count = sum(map(len, already.values()))
    raise ConvertError(f"{source.path} is already quantized ({count} weights in bitsandbytes' 4-bit layout, "
                       "none left to quantize)")


def _check_output_folder(out: Path) -> None:
    _check_parent(out)
    if out.exists():
        if not out.is_dir():
            raise ConvertError(f"cannot write {out}: it exists and is not a folder")
        if any(out.iterdir()):
            raise ConvertError(f"output folder {out} exists and is not empty")


def _read_config(source: Source) -> dict | None:
    """config.json of a folder, refused when it says the checkpoint is quantized already."""
    if not (source.path / CONFIG_NAME).is_file():
        return None
    try:
        config = json.loads((source.path / CONFIG_NAME).read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise TypeError
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError):
        raise ConvertError(f"{source.path / CONFIG_NAME} is not a valid JSON config") from None
    if "quantization_config" in config:
        method = config["quantization_config"].get("quant_method") if isinstance(config["quantization_config"], dict) else None
        raise ConvertError(f"{source.path} is already quantized (config.json has a quantization_config, quant_method {method!r})")
    return config


def _quantize_folder(source: Source, out: Path, opts: QuantOptions, progress: bool | None) -> Summary:
    _check_output_folder(out)
    config = _read_config(source)
    headers = {shard: read_header(source.shard_path(shard))[0] for shard in source.shards}
    if source.index is not None:
        names = {shard: {i.name for i in infos} for shard, infos in headers.items()}
        for key, shard in source.index["weight_map"].items():
            if key not in names[shard]:
                raise ConvertError(f"{source.path / INDEX_NAME} maps {key!r} to {shard}, which does not hold it")
    summary = Summary(source, out, select(source, opts))
    _refuse_if_quantized(source, headers, summary.selection)
    with _writing(out):
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    bar = Progress(sum(i.nbytes for infos in headers.values() for i in infos), "quantize", progress)
    try:
        weight_map, total = {}, 0
        for shard in source.shards:
            written = _quantize_file(source.shard_path(shard), work / shard, opts, bar, summary, out / shard)
            weight_map.update({k: shard for k in written})
            total += sum(written.values())
        with _writing(out):
            _finish_folder(source, work, out, opts, config, summary, weight_map, total)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        bar.close()
    return summary


def _finish_folder(source: Source, work: Path, out: Path, opts: QuantOptions, config: dict | None, summary: Summary,
                   weight_map: dict[str, str], total: int) -> None:
    """Index, config and the other files into the work folder, then the work folder onto out."""
    if source.index is not None:
        index = {k: v for k, v in source.index.items() if k != "weight_map"}
        index["metadata"] = {**(index.get("metadata") or {}), "total_size": total}
        index["weight_map"] = dict(sorted(weight_map.items()))
        (work / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    if config is not None:
        config["quantization_config"] = opts.quantization_config(_skip_modules(summary))
        (work / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        summary.config_written = True
    for f in sorted(source.path.iterdir()):
        if f.name in (INDEX_NAME, CONFIG_NAME) or f.name in source.shards:
            continue
        if f.is_file() and not f.name.lower().endswith(WEIGHT_SUFFIXES):
            shutil.copyfile(f, work / f.name)
            summary.other_files.append(f.name)
        else:
            summary.ignored_files.append(f.name + ("/" if f.is_dir() else ""))
    os.chmod(work, 0o777 & ~_umask())  # mkdtemp's 0700 -> what mkdir would give
    if out.exists():
        out.rmdir()  # empty, checked before
    os.rename(work, out)


def _skip_modules(summary: Summary) -> list[str] | None:
    """llm_int8_skip_modules: null (transformers' defaults) unless the skip pattern held back
    weights transformers would quantize; then a list, which replaces transformers' defaults, so
    it holds them too. By name, the defaults are unknown: every module left unquantized, and
    "lm_head" in case it is tied (absent here)."""
    model = summary.selection.model
    if model is not None:
        return sorted(set(model.not_converted) | set(summary.skipped_modules)) if summary.skipped_modules else None
    default = re.compile(DEFAULT_SKIP)
    if all(default.search(m + ".weight") for m in summary.skipped_modules):
        return None
    return sorted(set(summary.skipped_modules) | {"lm_head"})


# -- inspecting -----------------------------------------------------------------------------------


@dataclass
class QuantizedInfo:
    name: str
    shape: tuple | None
    quant_type: str | None
    blocksize: int | None
    nested: bool | None
    storage: str
    bits_per_param: float | None
    problem: str | None = None


@dataclass
class InspectReport:
    source: Source
    selection: Selection
    errors: list[TensorReport] = field(default_factory=list)
    quantized: list[QuantizedInfo] = field(default_factory=list)
    not_eligible: int = 0


def inspect_checkpoint(path: str | os.PathLike, opts: QuantOptions, bins: int = 0, progress: bool | None = None) -> InspectReport:
    source = resolve_input(path)
    headers = {shard: read_header(source.shard_path(shard))[0] for shard in source.shards}
    report = InspectReport(source, select(source, opts))
    total = sum(i.nbytes for infos in headers.values() for i in infos if is_candidate(i))
    bar = Progress(total, "inspect", progress)
    try:
        for shard, infos in headers.items():
            already = quantized_names(infos)
            by_name = {i.name: i for i in infos}
            with _Reader(source.shard_path(shard)) as reader:
                for name in sorted(already):
                    report.quantized.append(_describe_quantized(name, by_name, reader))
                for info in infos:
                    action, _ = report.selection.choose(info, already)
                    if action.quantizes:
                        report.errors.append(_inspect_tensor(info, action, reader, opts, bins))
                        bar.update(info.nbytes, info.name)
                    elif info.name not in already and not is_quant_state_key(info.name):
                        report.not_eligible += 1
                        if is_candidate(info):
                            bar.update(info.nbytes, info.name)
    finally:
        bar.close()
    return report


def _inspect_tensor(info: TensorInfo, action: Action, reader: _Reader, opts: QuantOptions, bins: int) -> TensorReport:
    """The quantization error of one weight; a weight with NaN or inf is reported as such instead
    (quantize refuses it), so that one bad tensor does not hide the others."""
    w = action.weight(reader, info)
    transposed = action is Action.TRANSPOSE
    try:
        _, state, packed = quantize_entries(info.name, w, opts)
    except NonFiniteWeight as e:
        return TensorReport(info.name, tuple(w.shape), info.dtype, None, 0, transposed, nonfinite=(e.count, e.index))
    stats = error_stats(w, dequantize_4bit(packed, state), bins=bins)
    stored = packed.numel() * packed.element_size() + sum(
        t.numel() * t.element_size() for t in state.as_dict(packed=True).values() if isinstance(t, torch.Tensor)
    )
    return TensorReport(info.name, tuple(w.shape), info.dtype, stats, stored, transposed)


def _describe_quantized(name: str, by_name: dict[str, TensorInfo], reader: _Reader) -> QuantizedInfo:
    keys = [k for k in by_name if k.startswith(name + ".") and is_quant_state_key(k)]
    weight = by_name.get(name)
    storage = {"U8": "uint8", "F16": "float16", "BF16": "bfloat16", "F32": "float32"}.get(weight.dtype if weight else "", "?")
    try:
        if weight is None:
            raise ValueError("the packed weight entry is missing")
        state = QuantState.from_dict({k: reader.tensor(k) for k in keys})
        if weight.nbytes != -(-state.numel // 2):
            raise ValueError(f"packed data holds {weight.nbytes} bytes, the state describes {state.numel} elements")
    except ValueError as e:
        return QuantizedInfo(name, None, None, None, None, storage, None, problem=str(e))
    stored = weight.nbytes + sum(by_name[k].nbytes for k in keys)
    return QuantizedInfo(name, tuple(state.shape), state.quant_type, state.blocksize, state.nested, storage, 8 * stored / state.numel)
