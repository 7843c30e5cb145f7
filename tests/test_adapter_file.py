"""Adapter files survive kills during save and reject every corruption: atomic writes,
checksums, one error type (AdapterFileError) naming the path for every malformed file."""

import copy
import json
import os
import random
import signal
import stat
import time

import pytest
import torch
from torch import nn

import salt_kernels
from salt_kernels import AdapterFileError, AdapterFileWarning, apply_salt, load_salt, read_salt_config, save_salt
from salt_kernels.model import adapter_file


def _base(seed=0, width=48, depth=3):
    torch.manual_seed(seed)
    return nn.Sequential(*(nn.Linear(width, width) for _ in range(depth)))


def _trained(base, seed):
    """A converted copy of ``base`` with random trained tensors (seeded)."""
    model = apply_salt(copy.deepcopy(base), rank=8, lora_rank=4)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def base():
    return _base()


@pytest.fixture(scope="module")
def converted(base):
    return apply_salt(copy.deepcopy(base), rank=8, lora_rank=4)


# ------------------------------------------------------------------ crash-safe save


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _outcome(path, old, new):
    """'old' / 'new' when path holds exactly that adapter (checksums verified), else 'bad'."""
    try:
        _, tensors = adapter_file.read_adapter(path)
    except (AdapterFileError, FileNotFoundError):
        return "bad"
    return "old" if _same(tensors, old) else "new" if _same(tensors, new) else "bad"


def _kill_trials(path, write_new, old, new, tries, seed, until_bad=False):
    """Fork a process that runs ``write_new()``, SIGKILL it after a random delay within
    the time one write takes, and record what ``path`` holds afterwards; ``path`` is
    reset to the old adapter's bytes before each try."""
    def start_writer():
        pid = os.fork()
        if pid == 0:
            try:
                write_new()
            finally:
                os._exit(0)
        return pid

    def timed_child():
        t0 = time.perf_counter()
        os.waitpid(start_writer(), 0)
        return time.perf_counter() - t0

    old_bytes = open(path, "rb").read()
    span = max(timed_child() for _ in range(3))
    rng = random.Random(seed)
    outcomes = []
    for _ in range(tries):
        with open(path + ".old", "wb") as f:
            f.write(old_bytes)
        os.replace(path + ".old", path)
        pid = start_writer()
        time.sleep(rng.uniform(0, span))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        outcomes.append(_outcome(path, old, new))
        if until_bad and outcomes[-1] == "bad":
            break
    return outcomes


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX) to kill a saving process cheaply")
def test_kill_during_save_leaves_old_or_new(base, tmp_path):
    old_model, new_model = _trained(base, 1), _trained(base, 2)
    path = str(tmp_path / "adapter.safetensors")
    save_salt(old_model, path, include_basis=True)
    _, old = adapter_file.read_adapter(path)
    save_salt(new_model, path, include_basis=True)
    _, new = adapter_file.read_adapter(path)
    save_salt(old_model, path, include_basis=True)
    outcomes = _kill_trials(path, lambda: save_salt(new_model, path, include_basis=True),
                            old, new, tries=50, seed=0)
    assert "bad" not in outcomes, outcomes
    # the kills landed before and after the rename (else the test proves nothing)
    assert outcomes.count("old") >= 1 and outcomes.count("new") >= 1, outcomes


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX) to kill a saving process cheaply")
def test_kill_harness_catches_a_non_atomic_writer(base, tmp_path):
    """The same harness on a writer that writes in place: it must see a broken file
    (so the test above can fail)."""
    old_model, new_model = _trained(base, 1), _trained(base, 2)
    path = str(tmp_path / "adapter.safetensors")
    save_salt(new_model, path, include_basis=True)
    _, new = adapter_file.read_adapter(path)
    new_bytes = open(path, "rb").read()
    save_salt(old_model, path, include_basis=True)
    _, old = adapter_file.read_adapter(path)

    def in_place():
        with open(path, "wb") as f:
            for i in range(0, len(new_bytes), 4096):
                f.write(new_bytes[i:i + 4096])
                f.flush()
                os.fsync(f.fileno())

    outcomes = _kill_trials(path, in_place, old, new, tries=50, seed=0, until_bad=True)
    assert "bad" in outcomes


def test_missing_directory_names_the_path(converted, tmp_path):
    target = tmp_path / "no_such_dir" / "adapter.safetensors"
    with pytest.raises(FileNotFoundError, match="no_such_dir") as err:
        save_salt(converted, target)
    assert str(target) in str(err.value) and ".tmp" not in str(err.value)
    assert not (tmp_path / "no_such_dir").exists()  # not created
    with pytest.raises(IsADirectoryError, match=str(tmp_path)):
        save_salt(converted, tmp_path)


def test_save_leaves_no_temporary_and_keeps_permissions(converted, tmp_path):
    path = tmp_path / "a.safetensors"
    save_salt(converted, path)
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask  # as open() would, not 0o600
    os.chmod(path, 0o640)
    save_salt(converted, path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640


def test_save_refuses_non_finite_and_keeps_the_old_file(base, tmp_path):
    model = _trained(base, 1)
    path = tmp_path / "a.safetensors"
    save_salt(model, path)
    before = path.read_bytes()
    with torch.no_grad():
        model[1].sigma[2] = float("nan")
    with pytest.raises(ValueError, match=r"'1\.sigma' holds NaN"):
        save_salt(model, path)
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["a.safetensors"]


# ------------------------------------------------------------------ integrity


def _saved(model, tmp_path, name="a.safetensors"):
    path = tmp_path / name
    save_salt(model, path)
    return path


def test_every_malformed_file_raises_adapter_file_error_naming_it(base, converted, tmp_path):
    good = _saved(_trained(base, 1), tmp_path).read_bytes()
    cases = {
        "empty": b"",
        "truncated": good[: len(good) // 2],
        "text": b"this is not a safetensors file\n" * 10,
        "header only": good[:8],
    }
    for label, data in cases.items():
        path = tmp_path / f"{label.replace(' ', '_')}.safetensors"
        path.write_bytes(data)
        for fn in (lambda p: load_salt(copy.deepcopy(converted), p), read_salt_config):
            with pytest.raises(AdapterFileError, match=str(path)):
                fn(path)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(3)}, str(other))
    with pytest.raises(AdapterFileError, match="not a salt_kernels adapter file"):
        load_salt(copy.deepcopy(converted), other)
    assert issubclass(AdapterFileError, ValueError)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_salt(copy.deepcopy(converted), tmp_path / "missing.safetensors")


def test_corrupted_tensor_is_named(base, converted, tmp_path):
    model = _trained(base, 1)
    path = _saved(model, tmp_path)
    data = bytearray(path.read_bytes())
    # flip the last byte: inside the data of the last tensor in the file's order
    data[-1] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(AdapterFileError, match=r"checksum mismatch in tensor '.+'") as err:
        load_salt(copy.deepcopy(converted), path)
    assert str(path) in str(err.value)


def test_non_finite_tensor_in_a_file_is_refused(base, converted, tmp_path):
    model = _trained(base, 1)
    path = _saved(model, tmp_path)
    config, tensors = adapter_file.read_adapter(path)
    tensors["0.X"][0, 0] = float("inf")
    metadata = {"format": adapter_file.FORMAT_NAME, "salt_config": json.dumps(config)}
    adapter_file.write_adapter(path, tensors, metadata)  # valid checksums, bad values
    with pytest.raises(AdapterFileError, match=r"'0\.X' holds NaN or inf"):
        load_salt(copy.deepcopy(converted), path)


def _rewrite(path, config=None, drop_checksum=False):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if config is not None:
        metadata["salt_config"] = json.dumps(config)
    if drop_checksum:
        del metadata[adapter_file.CHECKSUM_KEY]
    save_file(tensors, str(path), metadata=metadata)


def test_files_without_checksums(base, converted, tmp_path):
    """A version-1 file (written before checksums) loads, with a warning; a version-2
    file whose checksums were removed is refused."""
    model = _trained(base, 1)
    path = _saved(model, tmp_path)
    config = read_salt_config(path)
    config["version"] = 1
    _rewrite(path, config, drop_checksum=True)
    with pytest.warns(AdapterFileWarning, match="without checksums"):
        loaded = load_salt(copy.deepcopy(converted), path)
    assert _same(_trainable(loaded), _trainable(model))
    # saving it again adds the checksums
    save_salt(loaded, path)
    assert read_salt_config(path)["version"] == adapter_file.FORMAT_VERSION

    path2 = _saved(model, tmp_path, "b.safetensors")
    _rewrite(path2, drop_checksum=True)
    with pytest.raises(AdapterFileError, match="requires checksums"):
        load_salt(copy.deepcopy(converted), path2)


def _header_span(data: bytes) -> tuple[int, int]:
    n = int.from_bytes(data[:8], "little")
    return 8, 8 + n


def _corrupt(data: bytes, rng: random.Random) -> bytes:
    kind = rng.choice(["bitflip", "bitflip", "truncate", "header_char", "header_bitflip", "zero_run"])
    buf = bytearray(data)
    if kind == "bitflip":
        i = rng.randrange(len(buf))
        buf[i] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        buf = buf[: rng.randrange(len(buf))]
    elif kind in ("header_char", "header_bitflip"):
        lo, hi = _header_span(data)
        i = rng.randrange(0, hi)  # the length prefix too
        if kind == "header_char":
            buf[i] = ord(rng.choice('0123456789{}[]",:. abcdefXYUV'))
        else:
            buf[i] ^= 1 << rng.randrange(8)
    else:
        i, n = rng.randrange(len(buf)), rng.randint(1, 64)
        buf[i:i + n] = bytes(len(buf[i:i + n]))
    return bytes(buf)


def test_fuzz_corruptions_are_rejected_or_harmless(base, converted, tmp_path):
    model = _trained(base, 1)
    path = _saved(model, tmp_path)
    good = path.read_bytes()
    expected = _trainable(model)
    rng = random.Random(1234)
    rejected = harmless = 0
    for trial in range(240):
        data = _corrupt(good, rng)
        if data == good:
            continue
        bad = tmp_path / "fuzz.safetensors"
        bad.write_bytes(data)
        try:
            loaded = load_salt(copy.deepcopy(converted), bad)
        except AdapterFileError as exc:
            assert str(bad) in str(exc), (trial, exc)
            rejected += 1
            continue
        assert _same(_trainable(loaded), expected), f"trial {trial}: corrupted file loaded different tensors"
        harmless += 1
    assert rejected + harmless >= 200 and rejected >= 190, (rejected, harmless)
