"""Pre-trained checkpoints: read safely, recognise the usual layouts, check them against the backbone.

:func:`match_checkpoint` is the one place that decides what of a file loads into a backbone. The
pre-flight step runs it on a meta-device model before Ray starts (no model weights materialised;
zip-format ``.pth`` files are memory-mapped), and every worker runs it again when it loads the weights
(:func:`medpeft_ray.models.backbones.load_checkpoint`), so the two cannot disagree.

Layouts recognised: MAE/MRM ``{"model": ...}`` (with its pickled ``argparse.Namespace``),
``{"state_dict": ...}`` and timm's training checkpoints, raw state dicts, ``.safetensors``, keys
under ``module.`` / ``_orig_mod.`` / ``model.`` / ``encoder.`` / ``backbone.`` prefixes (stripped
only when that makes keys match), and whatever the model's own timm filter converts (OpenAI CLIP and
OpenCLIP visual towers, DINOv2, ...), and OpenAI CLIP's TorchScript archives (``ViT-B-16.pt``),
whose tensors are read without loading the TorchScript program. Files are read with
``weights_only=True``: a file that needs any other object unpickled is refused.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import io
import os
import pickle
import re
import sys
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from medpeft_ray.errors import CheckpointError

if TYPE_CHECKING:
    import torch
    from torch import nn

#: Share of the backbone's tensors (outside the head) a checkpoint must provide.
MIN_MATCH = 0.99
#: Wrapper prefixes of saved keys (DDP, torch.compile, Lightning, MAE/MRM encoders, detection backbones).
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.", "encoder.", "backbone.")
#: Entries of a checkpoint dict that hold the weights, preferred in this order when several fit as well.
STATE_KEYS = ("model", "state_dict", "state_dict_ema", "model_ema", "teacher", "student", "module")
#: Modules that may be absent from a pre-trained file besides the classifier: a ViT's ``fc_norm``
#: exists only with average pooling, which MAE pre-training does not use.
HEAD_LIKE_MODULES = ("fc_norm",)
_EXAMPLES = 3


@dataclass
class CheckpointMatch:
    """What of a checkpoint file loads into a backbone."""

    path: Path
    state: dict[str, "torch.Tensor"]  # what loads: matching backbone tensors, head tensors of the model's shape
    backbone_tensors: int  # the backbone's tensors outside the head
    loaded: int  # how many of them the file provides with the right shape
    missing: list[str] = field(default_factory=list)  # backbone tensors the file lacks
    unexpected: list[str] = field(default_factory=list)  # file tensors the model does not have
    mismatched: list[str] = field(default_factory=list)  # of another shape: "key (file AxB, model CxD)"
    layout: str = ""  # where the weights were found, in words

    @property
    def ok(self) -> bool:
        return self.loaded >= MIN_MATCH * self.backbone_tensors


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    # torch's weights-only errors start with a paragraph of advice; the cause follows this marker
    marker = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    line = marker.group(1) if marker else next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return f"{type(exc).__name__}: {line[:300]}" if line else type(exc).__name__


def _looks_like_text(head: bytes) -> bool:
    try:
        decoded = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() or c in "\t\r\n" for c in decoded)


def _looks_like_safetensors(head: bytes) -> bool:
    # 8-byte little-endian header length, then the JSON header
    return len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000


def read_checkpoint(path: str | Path) -> Any:
    """The content of a ``.pth``/``.pt``/``.bin`` or ``.safetensors`` file, read without running pickled code.

    ``torch.load(weights_only=True)`` with ``argparse.Namespace`` allowed (MAE/MRM and timm files
    pickle their arguments); zip-format files are memory-mapped, so nothing is read until used.
    A TorchScript archive (OpenAI CLIP) gives its tensors by module path
    (:func:`read_torchscript_tensors`).

    Raises:
        CheckpointError: the file is missing, empty, not a checkpoint, or needs unsafe unpickling.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes), not a checkpoint")
    with open(path, "rb") as handle:
        head = handle.read(512)
    if path.suffix == ".safetensors" or _looks_like_safetensors(head):
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001  safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(exc)})") from None
    if _looks_like_text(head):
        raise CheckpointError(f"{path}: a text file, not a checkpoint")
    if zipfile.is_zipfile(path) and _is_torchscript(path):
        return read_torchscript_tensors(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            # bytes that are no pickle can look like an unusual pickle protocol; the error says enough
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:  # noqa: BLE001  torch.load fails in many ways on foreign files
        unsafe = re.findall(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if unsafe:
            raise CheckpointError(
                f"{path}: refused: it pickles {', '.join(sorted(set(unsafe)))}, which only an unsafe load "
                "(weights_only=False, arbitrary code) could read; re-save just its state dict where you trust "
                "the file, e.g. torch.save(torch.load(f, weights_only=False)['model'], 'weights.pth')"
            ) from None
        raise CheckpointError(f"{path}: not a PyTorch or safetensors checkpoint ({_first_line(exc)})") from None


# A TorchScript archive (OpenAI CLIP's ``ViT-B-16.pt``) is a zip like ``torch.save``'s, plus the
# program (``code/``, ``constants.pkl``). Its ``data.pkl`` pickles the modules as objects of
# ``__torch__.*`` classes whose state is a dict of attributes; ``torch.load(weights_only=True)``
# refuses such archives and ``torch.jit.load`` would load the program. The reader below unpickles
# only tensors, containers and those attribute dicts, so no code of the file runs.

_STORAGE_DTYPES = {
    "FloatStorage": "float32", "HalfStorage": "float16", "BFloat16Storage": "bfloat16", "DoubleStorage": "float64",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool",
}


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/constants.pkl") or name == "constants.pkl" for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):  # a damaged zip: torch.load's error names the problem
        return False


class _ScriptObject:
    """A TorchScript module or object, as the attributes its archive pickles (none of its code)."""

    def __init__(self) -> None:
        self.attributes: dict = {}

    def __setstate__(self, state: Any) -> None:
        self.attributes = state if isinstance(state, dict) else {}


def read_torchscript_tensors(path: str | Path) -> dict[str, "torch.Tensor"]:
    """The tensors of a TorchScript archive by their module paths (``visual.conv1.weight``, ...).

    What ``torch.jit.load(path).state_dict()`` holds, read without loading TorchScript: only
    tensors, containers and the modules' attribute dicts are unpickled.

    Raises:
        CheckpointError: the archive pickles anything else, or is damaged.
    """
    import torch

    path = Path(path)

    def rebuild(storage: "torch.Tensor", offset: int, size: tuple, stride: tuple, *_: Any) -> "torch.Tensor":
        return storage.as_strided(size, stride, offset)

    def passthrough(value: Any, *_: Any) -> Any:
        return value

    allowed: dict[tuple[str, str], Any] = {
        ("torch._utils", "_rebuild_tensor_v2"): rebuild,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch.jit._pickle", "restore_type_tag"): passthrough,
        **{("torch.jit._pickle", f"build_{kind}list"): list for kind in ("int", "double", "bool", "tensor")},
        **{("torch", name): getattr(torch, dtype) for name, dtype in _STORAGE_DTYPES.items()},
    }

    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        data_pkl = next((n for n in names if n == "data.pkl" or n.endswith("/data.pkl")), None)
        if data_pkl is None:
            raise CheckpointError(f"{path}: a TorchScript archive without data.pkl, not a checkpoint")
        root = data_pkl[: -len("data.pkl")]

        class Unpickler(pickle.Unpickler):
            def find_class(self, module: str, name: str) -> Any:
                if module == "__torch__" or module.startswith("__torch__."):
                    return _ScriptObject
                if (module, name) in allowed:
                    return allowed[(module, name)]
                raise CheckpointError(
                    f"{path}: refused: the TorchScript archive pickles {module}.{name}, which only loading its "
                    "program (torch.jit.load, arbitrary code) could read; re-save its state dict where you trust "
                    "the file, e.g. torch.save(torch.jit.load(f).state_dict(), 'weights.pth')"
                )

            def persistent_load(self, pid: Any) -> "torch.Tensor":
                # ("storage", dtype, key, location, numel): a flat tensor over data/<key>
                dtype, key = pid[1], pid[2]
                raw = bytearray(archive.read(f"{root}data/{key}"))
                return torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)

        try:
            content = Unpickler(io.BytesIO(archive.read(data_pkl))).load()
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001  a damaged archive fails in many ways
            raise CheckpointError(f"{path}: not a readable TorchScript archive ({_first_line(exc)})") from None

    tensors: dict[str, torch.Tensor] = {}

    def collect(obj: Any, prefix: str) -> None:
        attributes = obj.attributes if isinstance(obj, _ScriptObject) else obj if isinstance(obj, dict) else {}
        for name, value in attributes.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}{name}"] = value
            elif isinstance(value, (_ScriptObject, dict)):
                collect(value, f"{prefix}{name}.")

    collect(content, "")
    return tensors


# ------------------------------------------------------------------------------------------------
# Matching against the backbone
# ------------------------------------------------------------------------------------------------


def _tensor_dicts(content: Any) -> list[tuple[str, dict[str, "torch.Tensor"]]]:
    """(where, tensors) of each candidate state dict: the file itself, or one of its top-level entries."""
    import torch

    def tensors(value: Any) -> dict[str, torch.Tensor]:
        if not isinstance(value, dict):
            return {}
        return {str(k): v for k, v in value.items() if isinstance(v, torch.Tensor)}

    found = []
    if tensors(content):
        found.append(("", tensors(content)))
    if isinstance(content, dict):
        named = [k for k in STATE_KEYS if k in content] + [k for k in content if k not in STATE_KEYS]
        found += [(f"{key!r}", tensors(content[key])) for key in named if tensors(content[key])]
    return found


def _prefixes(keys: Iterable[str]) -> list[str]:
    """Leading chains of wrapper prefixes among ``keys`` (``""``, ``module.``, ``module.encoder.``, ...), shortest
    first."""
    found = {""}
    for key in keys:
        prefix = ""
        while (step := next((p for p in WRAPPER_PREFIXES if key.startswith(prefix + p)), None)) is not None:
            prefix += step
            found.add(prefix)
    return sorted(found, key=lambda p: (len(p), p))


def _strip(state: dict[str, "torch.Tensor"], prefix: str) -> dict[str, "torch.Tensor"]:
    if not prefix:
        return dict(state)
    out = {k: v for k, v in state.items() if not k.startswith(prefix)}
    out.update({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    return out


def _pretrained_filter(name: str | None) -> Callable[[dict, "nn.Module"], dict] | None:
    """timm's own converter of foreign checkpoint layouts for model ``name`` (``checkpoint_filter_fn``), if any."""
    import timm
    from timm.models import model_entrypoint

    if not name or not timm.is_model(name):
        return None
    module = sys.modules.get(model_entrypoint(name).__module__)
    return getattr(module, "checkpoint_filter_fn", None)


def _resize_pos_embed(state: dict[str, "torch.Tensor"], model: "nn.Module") -> None:
    """A ViT's ``pos_embed`` of another grid is resized (bicubic) to the model's, in place."""
    from timm.layers import resample_abs_pos_embed

    own = getattr(model, "pos_embed", None)
    theirs = state.get("pos_embed")
    if own is None or theirs is None or theirs.shape == own.shape or theirs.ndim != 3:
        return
    if theirs.shape[-1] != own.shape[-1]:  # another width: a different model, reported as a shape mismatch
        return
    state["pos_embed"] = resample_abs_pos_embed(
        theirs, new_size=model.patch_embed.grid_size, num_prefix_tokens=getattr(model, "num_prefix_tokens", 1)
    )


def head_keys(model: "nn.Module") -> set[str]:
    """State-dict keys of the classifier (``get_classifier()``) and head-like modules (``fc_norm``)."""
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    heads = classifier if isinstance(classifier, tuple) else (classifier,)
    ids = {id(m) for m in heads if m is not None}
    names = [name for name, m in model.named_modules() if name and (id(m) in ids or name in HEAD_LIKE_MODULES)]
    return {k for k in model.state_dict() if any(k == n or k.startswith(n + ".") for n in names)}


def _shape(t: "torch.Tensor") -> str:
    return "x".join(str(d) for d in t.shape) or "scalar"


def _layouts(
    content: Any, model: "nn.Module", convert: Callable[[dict, "nn.Module"], dict] | None
) -> Iterable[tuple[str, dict[str, "torch.Tensor"]]]:
    """(description, state dict) of every reading of the file, the most literal first: each candidate
    dict, with each wrapper prefix stripped, as saved and through timm's converter; ``pos_embed`` resized."""
    for where, tensors in _tensor_dicts(content):
        for prefix in _prefixes(tensors):
            stripped = _strip(tensors, prefix)
            readings = [(stripped, "")]
            if convert is not None:
                try:
                    readings.append((convert(dict(stripped), model), f"{convert.__module__}.{convert.__name__}"))
                except Exception:  # noqa: BLE001  a layout the converter does not know: the plain keys still count
                    pass
            for state, converted in readings:
                _resize_pos_embed(state, model)
                parts = [f"entry {where}" if where else "", f"prefix {prefix!r} stripped" if prefix else "", converted]
                yield ", ".join(p for p in parts if p) or "as saved", state


def match_checkpoint(model: "nn.Module", path: str | Path, name: str | None = None) -> CheckpointMatch:
    """Finds the layout of ``path`` that loads best into ``model`` and checks it covers the backbone.

    ``model`` may live on the meta device: only its keys and shapes are used. Head tensors (the
    classifier and ``fc_norm``) do not count and load only where their shape fits; BatchNorm's
    ``num_batches_tracked`` counters do not count either. Of equally good readings of the file,
    the most literal wins (a prefix is stripped only when that makes more keys match).

    Raises:
        CheckpointError: a one-line message naming the file, how many of the backbone's tensors
            it provides and a few missing and unexpected keys, when that is under ``MIN_MATCH``;
            or the file cannot be read (:func:`read_checkpoint`).
    """
    path = Path(path)
    name = name or getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__
    own = model.state_dict()
    heads = head_keys(model)
    backbone = [k for k in own if k not in heads and not k.endswith("num_batches_tracked")]

    def fits(state: dict[str, Any], key: str) -> bool:
        return key in state and key in own and state[key].shape == own[key].shape

    readings = list(_layouts(read_checkpoint(path), model, _pretrained_filter(name)))
    if not readings:
        raise CheckpointError(f"{path}: no tensors in the file, not a checkpoint of model weights")
    # max() keeps the first of equal scores: the most literal reading
    layout, state = max(readings, key=lambda reading: sum(fits(reading[1], k) for k in backbone))
    match = CheckpointMatch(
        path,
        state={k: v for k, v in state.items() if fits(state, k)},
        backbone_tensors=len(backbone),
        loaded=sum(fits(state, k) for k in backbone),
        missing=[k for k in backbone if k not in state],
        unexpected=[k for k in state if k not in own],
        mismatched=[f"{k} (file {_shape(state[k])}, model {_shape(own[k])})"
                    for k in backbone if k in state and not fits(state, k)],
        layout=layout,
    )
    if not match.ok:
        raise CheckpointError(_mismatch_message(match, name))
    return match


def _mismatch_message(match: CheckpointMatch, name: str) -> str:
    def examples(keys: list[str]) -> str:
        return ", ".join(keys[:_EXAMPLES]) + (", ..." if len(keys) > _EXAMPLES else "")

    details = [f"missing e.g. {examples(match.missing)}" if match.missing else "",
               f"shape differs e.g. {examples(match.mismatched)}" if match.mismatched else "",
               f"unexpected e.g. {examples(match.unexpected)}" if match.unexpected else ""]
    return (f"{match.path}: only {match.loaded} of {match.backbone_tensors} backbone tensors of {name} match "
            f"({'; '.join(d for d in details if d)})")


# ------------------------------------------------------------------------------------------------
# Identity: which file a trial started from
# ------------------------------------------------------------------------------------------------

_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of the file's content, computed once per (path, size, modification time) in this process."""
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(4 << 20):
                digest.update(chunk)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


def checkpoint_identity(path: str | Path | None) -> dict[str, str] | None:
    """``{"path", "sha256"}`` of a pre-trained checkpoint (None without one), as the leaderboard records it."""
    if path is None:
        return None
    return {"path": os.fspath(path), "sha256": file_sha256(path)}
