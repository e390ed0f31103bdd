"""Glue shared by the node adapters: InputError, core's ValueErrors as errors naming the input
(:func:`core_input_errors`), input checks with clear messages, model folders and safetensors files.
ComfyUI's models, samplers and progress are nodes/comfy_boundary.py's."""
from __future__ import annotations

import json
import math
import os
import re
import unicodedata
from contextlib import contextmanager

import torch

import folder_paths

CATEGORY = "disentangle"
LAMBDA_SCHEDULE = "LAMBDA_SCHEDULE"
INVERSION_TRAJECTORY = "INVERSION_TRAJECTORY"
LAMBDA_SCHEDULE_FOLDER = "lambda_schedules"
PACK_WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights")
MAX_NAME_CHARS = 120          # one file or folder name of a save prefix / save_name
MAX_PREFIX_CHARS = 240        # a whole save prefix, subfolders included
MAX_HEADER_BYTES = 16 << 20   # a safetensors header (JSON) this pack reads; its own files use a few kB


class InputError(ValueError):
    """A node input is not usable; the message names the input."""

    # ComfyUI shows ``module.qualname`` as the error type, and a custom node pack's module is named
    # after its absolute install folder: a fixed name keeps server paths out of the error shown.
    __module__ = "disentangle"


def short(value, limit: int = 60) -> str:
    """repr of a user value, cut to ``limit`` characters (error messages echo input, never a flood)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextmanager
def core_input_errors(input_name: str, *named: str, errors: type[Exception] | tuple[type[Exception], ...] = ValueError):
    """Core's ValueErrors (or ``errors``) raised in the block, as InputErrors naming the input.

    The one place where a node turns the checks of core/ (the maths' preconditions, which exist there
    only) into its own errors: a message that begins with the name of one of the node's inputs
    (``input_name`` or ``named``; core names a parameter as the nodes name the input, "k must be
    between ...") is kept as it is, any other gets ``input_name: `` in front. Wrap calls into core, its
    maths or its check functions, never a call that runs the host's models: a ValueError of ComfyUI's
    would be blamed on the input. InputErrors pass unchanged."""
    try:
        yield
    except InputError:
        raise
    except errors as e:
        message = str(e)
        if not any(re.match(rf"{re.escape(name)}\b", message) for name in (input_name, *named)):
            message = f"{input_name}: {message}"
        raise InputError(message) from e


def check_finite(name: str, value, low: float | None = None, high: float | None = None) -> float:
    """``value`` as a float, finite and within [low, high]: JSON NaN passes ComfyUI's min/max check and a
    linked input skips it. A bound that core checks is left to core (:func:`core_input_errors`)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {short(value)}") from None
    if isinstance(value, bool) or not math.isfinite(number):
        raise InputError(f"{name} must be a finite number, got {short(value)}")
    if (low is not None and number < low) or (high is not None and number > high):
        if high is None:
            raise InputError(f"{name} must be at least {low:g}, got {number:g}")
        if low is None:
            raise InputError(f"{name} must be at most {high:g}, got {number:g}")
        raise InputError(f"{name} must lie in [{low:g}, {high:g}], got {number:g}")
    return number


def check_int(name: str, value, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int within [low, high] (a linked INT skips the widget's min/max). Bounds that stop
    unbounded work stay here, before any work; a bound that core checks is left to core."""
    if isinstance(value, bool) or not isinstance(value, int):
        if not (isinstance(value, float) and math.isfinite(value) and value == int(value)):
            raise InputError(f"{name} must be a whole number, got {short(value)}")
    number = int(value)
    if low is not None and number < low:
        raise InputError(f"{name} must be at least {low}, got {number}")
    if high is not None and number > high:
        raise InputError(f"{name} must be at most {high}, got {number}")
    return number


def check_file_name(name: str, value: str, max_chars: int = MAX_NAME_CHARS) -> str:
    """A plain file name (no folder, no leading dot, no control character), at most ``max_chars`` long."""
    text = value.strip() if isinstance(value, str) else value
    if not isinstance(text, str) or not text:
        raise InputError(f"{name}: give a file name, got {short(value)}")
    if any(unicodedata.category(c).startswith("C") for c in text):
        raise InputError(f"{name}: control characters (NUL, newline, ...) are not allowed in a file name")
    if "/" in text or "\\" in text or text.startswith(".") or text in ("..", "."):
        raise InputError(f"{name}: a plain file name without folders or a leading dot, got {short(value)}")
    if len(text) > max_chars or len(text.encode("utf-8")) > 2 * max_chars:
        raise InputError(f"{name}: at most {max_chars} characters, got {len(text)}")
    return text


def check_save_prefix(name: str, prefix: str) -> str:
    """A save prefix as SaveImage takes it (subfolders allowed), checked before anything is written."""
    if not isinstance(prefix, str) or not prefix.strip():
        raise InputError(f"{name}: give a file name prefix, got {short(prefix)}")
    if any(unicodedata.category(c).startswith("C") for c in prefix):
        raise InputError(f"{name}: control characters (NUL, newline, ...) are not allowed in a file name")
    if len(prefix) > MAX_PREFIX_CHARS:
        raise InputError(f"{name}: at most {MAX_PREFIX_CHARS} characters, got {len(prefix)}")
    parts = [p for p in prefix.replace("\\", "/").split("/") if p]
    if any(len(p) > MAX_NAME_CHARS or len(p.encode("utf-8")) > 2 * MAX_NAME_CHARS for p in parts):
        raise InputError(f"{name}: each folder or file name at most {MAX_NAME_CHARS} characters")
    return prefix


def register_model_folder(name: str, extensions: set[str], extra_paths: tuple[str, ...] = ()) -> None:
    """Register ``models/<name>`` (and ``extra_paths``) with ``folder_paths``; extra_model_paths.yaml may add more."""
    wanted = [os.path.join(folder_paths.models_dir, name), *extra_paths]
    if name not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[name] = ([], set())
    paths, exts = folder_paths.folder_names_and_paths[name]
    paths.extend(p for p in wanted if p not in paths)
    exts.update(extensions)


def free_save_path(folder_name: str, filename_prefix: str, extension: str,
                   input_name: str = "filename_prefix") -> tuple[str, str]:
    """``(path, shown name)`` of the first ``<prefix>_NNNNN.<extension>`` not yet taken in the first folder
    registered as ``folder_name`` (subfolders in the prefix allowed, as SaveImage does): saving never overwrites.
    Errors name the input and the folder as ``models/<folder_name>``, never a server path."""
    check_save_prefix(input_name, filename_prefix)
    folder = folder_paths.get_folder_paths(folder_name)[0]
    try:
        full_folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, folder)
    except Exception:  # ComfyUI's "saving outside the output folder" error, which shows both absolute paths
        raise InputError(f"{input_name} leads outside models/{folder_name}: use a name, optionally with "
                         "subfolders") from None
    with writing(input_name, f"models/{folder_name}"):
        os.makedirs(full_folder, exist_ok=True)
    while True:
        filename = f"{name}_{counter:05}.{extension}"
        path = os.path.join(full_folder, filename)
        if not os.path.exists(path):
            return path, os.path.join(subfolder, filename) if subfolder else filename
        counter += 1


@contextmanager
def writing(input_name: str, shown: str):
    """Turn an OSError while writing ``shown`` into an error naming the input, without the server path."""
    try:
        yield
    except OSError as e:
        raise InputError(f"{input_name}: could not write {shown} ({e.strerror or type(e).__name__})") from None


def shipped_first(folder_name: str, filename: str) -> str:
    """The full path of ``filename`` in ``folder_name``, the pack's own weights/ file first: a user's file of
    the same name in models/ never shadows what the shipped workflows load."""
    shipped = os.path.join(PACK_WEIGHTS, filename)
    if os.path.normpath(filename) == filename and os.sep not in filename and os.path.isfile(shipped) \
            and PACK_WEIGHTS in folder_paths.get_folder_paths(folder_name):
        return shipped
    return folder_paths.get_full_path_or_raise(folder_name, filename)


# --------------------------------------------------------------------------------------------
# safetensors files: the header checked before any tensor is read
# --------------------------------------------------------------------------------------------

SAFETENSORS_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
                        "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


class SafetensorsHeader:
    """A safetensors file's tensor table (name → (dtype, shape)) and metadata, read and checked without
    loading a tensor: the size claimed by the header, every tensor's byte range within the file."""

    def __init__(self, tensors: dict[str, tuple[str, tuple[int, ...]]], metadata: dict[str, str]):
        self.tensors, self.metadata = tensors, metadata

    def shape(self, key: str):
        return self.tensors[key][1] if key in self.tensors else None


def _header_problem(path: str):
    """(SafetensorsHeader, None) or (None, why the file is not a readable safetensors file)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return None, "shorter than a safetensors header"
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER_BYTES:  # the claimed size itself is not shown: it is the file's first bytes
                return None, f"its header would be larger than the {MAX_HEADER_BYTES >> 20} MiB read here"
            if n < 2 or 8 + n > size:
                return None, "its header runs past the end of the file: truncated, or not safetensors"
            raw = f.read(n)
    except OSError as e:
        return None, e.strerror or type(e).__name__
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None, "its header is not valid JSON"
    if not isinstance(header, dict):
        return None, "its header is not a JSON object"
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        return None, "its metadata is not a table of strings"
    data = size - 8 - n
    tensors = {}
    for key, entry in header.items():
        if not isinstance(entry, dict) or entry.get("dtype") not in SAFETENSORS_ITEMSIZE:
            return None, f"tensor {short(key, 40)} has no known dtype"
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            return None, f"tensor {short(key, 40)} has no valid shape"
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data):
            return None, f"tensor {short(key, 40)} lies outside the file: truncated"
        if offsets[1] - offsets[0] != math.prod(shape) * SAFETENSORS_ITEMSIZE[entry["dtype"]]:
            return None, f"tensor {short(key, 40)}'s size does not match its shape"
        tensors[key] = (entry["dtype"], tuple(shape))
    return SafetensorsHeader(tensors, metadata), None


def read_safetensors_header(path: str, shown: str, input_name: str | None = None) -> SafetensorsHeader:
    """The checked header of the file shown to the user as ``shown`` (its name inside its models folder)."""
    header, problem = _header_problem(path)
    if problem is not None:
        raise InputError(f"{input_name + ': ' if input_name else ''}{shown} is not a readable safetensors file ({problem})")
    return header


def load_safetensors(path: str, shown: str, input_name: str | None = None, header: SafetensorsHeader | None = None):
    """(tensors on the CPU, metadata) of a safetensors file whose header passed :func:`read_safetensors_header`."""
    header = header or read_safetensors_header(path, shown, input_name)
    import safetensors
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001  (any reader error: name the file, not its path)
        raise InputError(f"{input_name + ': ' if input_name else ''}{shown} is not a readable safetensors file "
                         f"({type(e).__name__})") from None
    return tensors, header.metadata


def json_metadata(header: SafetensorsHeader, key: str, shown: str, kind=dict, default=None):
    """``header.metadata[key]`` parsed as JSON and of type ``kind`` (a crafted file gets a message naming it)."""
    if key not in header.metadata:
        if default is not None:
            return default
        raise InputError(f"{shown} has no {key!r} entry in its metadata")
    try:
        value = json.loads(header.metadata[key])
    except (ValueError, RecursionError):
        raise InputError(f"{shown}: its {key!r} metadata is not valid JSON") from None
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise InputError(f"{shown}: its {key!r} metadata must be a JSON {getattr(kind, '__name__', kind)}, "
                         f"got {type(value).__name__}")
    return value


def check_conditioning(conditioning, name: str) -> None:
    if not isinstance(conditioning, list) or len(conditioning) == 0:
        raise InputError(f"{name}: the CONDITIONING is empty (connect a CLIP Text Encode output)")
    for entry in conditioning:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and hasattr(entry[0], "shape") and isinstance(entry[1], dict)):
            raise InputError(f"{name}: not a CONDITIONING (expected a list of [tensor, dict] pairs)")


def meta_shapes(build, shown: str) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of the module ``build()`` makes, built on the meta device: nothing is allocated, so a
    crafted config (a width of 10⁶) costs nothing; a config that does not build gets a message naming the file."""
    try:
        with torch.device("meta"):
            module = build()
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, AssertionError, RuntimeError) as e:
        raise InputError(f"{shown}: its config does not describe a model ({type(e).__name__}: {short(str(e), 80)})") from None
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def check_config_fits_file(build, header: SafetensorsHeader, shown: str) -> None:
    """Refuse a file whose config describes a module with more values than the file holds (or that does not
    build): loading it then allocates no more than the file's own size."""
    values = sum(math.prod(shape) for shape in meta_shapes(build, shown).values())
    held = sum(math.prod(shape) for _, shape in header.tensors.values())
    if values > held + (1 << 20):
        raise InputError(f"{shown}: its config describes {values:,} values but the file holds {held:,}")


def check_tensors_match(expected: dict, header: SafetensorsHeader, shown: str, prefix: str = "") -> None:
    """Refuse a file whose tensors (those named ``prefix...``) are not exactly ``expected``'s names and shapes."""
    held = {k[len(prefix):]: shape for k, (_, shape) in header.tensors.items() if k.startswith(prefix)}
    if held != expected:
        wrong = sorted((set(held) ^ set(expected)) | {k for k in set(held) & set(expected) if held[k] != expected[k]})
        raise InputError(f"{shown}: its tensors do not match its config ({', '.join(short(k, 40) for k in wrong[:3])})")
