"""Every public function of codec, codec.train and codec.update meets a wrong argument type with an error that
names it (TypeError, ValueError, a JwtError, a missing file), never a bare AttributeError / IndexError / KeyError
from inside (the guide: "never a bare AttributeError from the API for a wrong argument type")."""

from __future__ import annotations

import importlib
import inspect
import warnings

import pytest

import codec

#: Errors that say something about the argument; anything else escaping is an internal failure.
NAMED = (TypeError, ValueError, codec.JwtError, OSError)
WRONG = [5, None, object(), "/nonexistent/x.jwt", b"abc"]


def _public_functions():
    for module_name in ("codec", "codec.train", "codec.update"):
        module = importlib.import_module(module_name)
        for name in module.__all__:
            value = getattr(module, name)
            if inspect.isclass(value) and issubclass(value, BaseException) or not callable(value):
                continue
            try:
                signature = inspect.signature(value)
            except (TypeError, ValueError):
                continue
            required = [p for p in signature.parameters.values() if p.default is p.empty
                        and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
            if required:
                yield pytest.param(value, len(required), id=f"{module_name}.{name}")


@pytest.mark.parametrize("function, count", list(_public_functions()))
@pytest.mark.parametrize("wrong", WRONG, ids=["int", "None", "object", "str", "bytes"])
def test_a_wrong_argument_type_is_a_named_error(function, count, wrong, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing a call might write lands in the repository
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            function(*[wrong] * count)
        except NAMED as error:
            assert "\n" not in str(error).strip(), f"{function.__name__}: a one-line error, got {error!s}"
        except Exception as error:  # noqa: BLE001 - the point of the test
            pytest.fail(f"{function.__module__}.{function.__name__}({wrong!r}, ...) raised {type(error).__name__}: "
                        f"{error}")


def test_the_list_covers_the_training_and_update_helpers():
    """The parametrisation is not empty by accident: the helpers that raised AttributeError before are in it."""
    ids = {p.id for p in _public_functions()}
    assert {"codec.train.tensor_rate", "codec.train.to_ordinary", "codec.update.difference",
            "codec.update.check_base", "codec.load_into", "codec.save"} <= ids
