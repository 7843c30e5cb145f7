"""The adapter file on disk: crash-safe writing and verified reading (safetensors).

An adapter file is the only artefact of a training run, so:

* **Writing is atomic.** The file is written to a temporary file in the target's
  directory, flushed and fsynced, then renamed over the target (``os.replace``, atomic
  on POSIX and Windows) and the directory is fsynced. A crash or kill at any point
  leaves the target holding the complete old file or the complete new one; at worst
  a stray ``.NAME.*.tmp`` file is left beside it. A missing parent directory is an
  error naming the path (it is not created: a typo in a path should not silently
  create directories).
* **Reading is verified.** The metadata holds a SHA-256 digest of every tensor (its
  name, dtype, shape and bytes) and of the other metadata (the conversion config).
  Reading checks them all and names the first bad tensor. Every malformed file —
  empty, truncated, not safetensors, corrupted, not an adapter — raises
  :class:`AdapterFileError` naming the path.

Files written before checksums existed (format version 1) carry none: they load with
an :class:`AdapterFileWarning`; saving them again adds the checksums.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings

import torch

FORMAT_NAME = "salt_kernels.adapter"
# 2: per-tensor and metadata SHA-256 digests (required). 1: no digests (read, with a warning).
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
CHECKSUM_KEY = "salt_checksum"
CONFIG_KEY = "salt_config"


class AdapterFileError(ValueError):
    """An adapter file that cannot be used: empty, truncated, not safetensors, not a
    salt_kernels adapter, corrupted (checksum mismatch) or holding NaN/inf. The message
    names the path (and the first bad tensor, where there is one)."""


class AdapterFileWarning(UserWarning):
    """An adapter file without checksums (written before they existed): loaded unverified."""


# --------------------------------------------------------------------------- digests


def tensor_digest(name: str, t: torch.Tensor) -> str:
    """SHA-256 of a tensor's name, dtype, shape and bytes (a CPU tensor), so that a
    renamed, re-typed or re-shaped tensor fails as surely as a changed byte."""
    h = hashlib.sha256(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
    h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _metadata_digest(metadata: dict) -> str:
    body = {k: v for k, v in metadata.items() if k != CHECKSUM_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------- writing


def check_target(path: str) -> str:
    """The target's directory; a clear error naming the path when it cannot be written."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise FileNotFoundError(
            f"path: cannot save to {path!r}: its directory {parent!r} does not exist (create it first)"
        )
    if os.path.isdir(path):
        raise IsADirectoryError(f"path: cannot save to {path!r}: it is a directory")
    return parent


def _fsync_dir(directory: str) -> None:
    # Makes the rename itself durable. Not possible on every platform (Windows): there
    # os.replace is still atomic, only its durability after power loss is the OS's.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _new_file_mode(path: str) -> int:
    """Keep an existing target's permissions; a new file gets the umask's default (as
    ``open`` would), not mkstemp's private 0o600."""
    try:
        return os.stat(path).st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write(path, write) -> None:
    """Write ``path`` all at once or not at all: ``write(tmp)`` fills a hidden temp file in
    the same directory, which is fsynced, given the target's permissions and renamed over
    ``path``; on any error (also KeyboardInterrupt) the temp file is removed."""
    path = os.fspath(path)
    parent = check_target(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    try:
        os.close(fd)
        write(tmp)
        with open(tmp, "rb+") as f:
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), _new_file_mode(path))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(parent)


def write_adapter(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> int:
    """Atomically write ``tensors`` (CPU, contiguous) and ``metadata`` to ``path`` with
    checksums added. Returns the file size in bytes."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    check_target(path)
    metadata = dict(metadata)
    metadata[CHECKSUM_KEY] = json.dumps({
        "algorithm": "sha256",
        "metadata": _metadata_digest(metadata),
        "tensors": {name: tensor_digest(name, t) for name, t in sorted(tensors.items())},
    })
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return os.path.getsize(path)


# --------------------------------------------------------------------------- reading


def _fail(path: str, what: str) -> AdapterFileError:
    return AdapterFileError(f"path: {path!r}: {what}")


def _open(path):
    """safe_open with every failure of the file itself turned into AdapterFileError."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"path: {path!r} does not exist")
    if os.path.isdir(path):
        raise IsADirectoryError(f"path: {path!r} is a directory, expected an adapter file")
    if os.path.getsize(path) == 0:
        raise _fail(path, "the file is empty, expected a salt_kernels adapter file")
    try:
        return path, safe_open(path, framework="pt")
    except Exception as exc:  # SafetensorError, OSError, ...: the bytes are not safetensors
        raise _fail(path, f"not a valid safetensors file (truncated or corrupted?): {exc}") from None


def _checksums(path: str, metadata: dict) -> dict | None:
    """The verified checksum record (or None for a version-1 file without one)."""
    raw = metadata.get(CHECKSUM_KEY)
    if raw is None:
        return None
    try:
        record = json.loads(raw)
        ok = (isinstance(record, dict) and record.get("algorithm") == "sha256"
              and isinstance(record.get("tensors"), dict) and isinstance(record.get("metadata"), str))
    except ValueError:
        ok = False
    if not ok:
        raise _fail(path, f"the {CHECKSUM_KEY!r} metadata is malformed (corrupted?)")
    if record["metadata"] != _metadata_digest(metadata):
        raise _fail(path, "checksum mismatch in the metadata (the conversion config is corrupted)")
    return record


def _parse_config(path: str, metadata: dict, record: dict | None) -> dict:
    if metadata.get("format") != FORMAT_NAME or CONFIG_KEY not in metadata:
        raise _fail(path, "not a salt_kernels adapter file (no salt_config metadata: a safetensors file of something else?)")
    try:
        config = json.loads(metadata[CONFIG_KEY])
    except ValueError as exc:
        raise _fail(path, f"the salt_config metadata is not JSON ({exc})") from None
    version = config.get("version") if isinstance(config, dict) else None
    if version not in READABLE_VERSIONS:
        raise _fail(path, f"adapter format version {version!r} is not supported "
                          f"(this salt_kernels reads versions {READABLE_VERSIONS})")
    if record is None:
        if version >= 2:
            raise _fail(path, f"format version {version} requires checksums and the file has none (corrupted?)")
        warnings.warn(
            f"{path!r}: adapter file without checksums (format version 1); loaded unverified. "
            "Save it again with save_salt to add them.", AdapterFileWarning, stacklevel=3,
        )
    layers = config.get("layers")
    if not isinstance(layers, dict) or not all(
        isinstance(s, dict) and {"type", "rank", "lora_rank", "scaling", "svd"} <= set(s) for s in layers.values()
    ):
        raise _fail(path, "the salt_config metadata has no valid per-layer entries")
    return config


def read_config(path) -> dict:
    """The conversion config of an adapter file (metadata digest verified; tensors not read)."""
    path, handle = _open(path)
    with handle as f:
        metadata = f.metadata() or {}
    return _parse_config(path, metadata, _checksums(path, metadata))


def read_adapter(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config, tensors)`` of an adapter file, every checksum verified, every floating
    tensor finite. Raises :class:`AdapterFileError` naming the path (and tensor)."""
    path, handle = _open(path)
    with handle as f:
        metadata = f.metadata() or {}
        record = _checksums(path, metadata)
        config = _parse_config(path, metadata, record)
        names = sorted(f.keys())
        if record is not None and set(names) != set(record["tensors"]):
            extra = sorted(set(names) ^ set(record["tensors"]))
            raise _fail(path, f"the tensors present differ from the checksummed ones (e.g. {extra[0]!r})")
        tensors = {}
        for name in names:
            try:
                t = f.get_tensor(name)
            except Exception as exc:
                raise _fail(path, f"tensor {name!r} cannot be read ({exc})") from None
            if record is not None and tensor_digest(name, t) != record["tensors"][name]:
                raise _fail(path, f"checksum mismatch in tensor {name!r} (the file is corrupted)")
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise _fail(path, f"tensor {name!r} holds NaN or inf")
            tensors[name] = t
    return config, tensors
