"""``ss.train``, ``ss.report``, ``ss.rebuild`` and ``ss.demo`` are functions and subpackages at once; they must
survive what Ray, joblib and notebooks do with objects: copying and pickling."""

from __future__ import annotations

import copy
import pickle

import cloudpickle
import pytest

import scvi_scale as ss


@pytest.mark.parametrize("name", ["train", "report", "rebuild", "demo"])
def test_entries_copy_and_pickle_as_themselves(name: str) -> None:
    entry = getattr(ss, name)
    assert pickle.loads(pickle.dumps(entry)) is entry
    assert cloudpickle.loads(cloudpickle.dumps(entry)) is entry
    assert copy.copy(entry) is entry or copy.copy(entry).__reduce__() == entry.__reduce__()


def test_missing_dunder_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError):
        ss.train.__no_such_thing__  # noqa: B018
