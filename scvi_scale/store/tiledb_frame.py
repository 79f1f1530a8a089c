"""obs and var tables of a TileDB store: a dense 1-D array with one attribute per column.

Categoricals (with their categories and order), strings with missing values, numbers and bools round-trip
exactly; column kinds are recorded as JSON in the array's metadata. (``tiledb.from_pandas`` fails on string
columns with missing values, hence this codec.)
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd

from scvi_scale.store.errors import InputError


def write_frame(tiledb: Any, uri: str, frame: pd.DataFrame, ctx: Any, what: str, source: str) -> None:
    n = frame.shape[0]
    zstd = tiledb.FilterList([tiledb.ZstdFilter(3)])
    columns, attrs, data = [], [], {}

    def add_strings(attr: str, series: pd.Series, name: str) -> bool:
        na = series.isna().to_numpy()
        values = series.to_numpy(dtype=object)
        if not all(isinstance(v, str) for v in values[~na]):
            raise InputError(f"{source}: {what} column '{name}' mixes strings and other values; convert it to str")
        attrs.append(tiledb.Attr(attr, dtype=str, var=True, filters=zstd))
        data[attr] = np.where(na, "", values).astype(object)
        if na.any():
            attrs.append(tiledb.Attr(f"{attr}_na", dtype=np.uint8, filters=zstd))
            data[f"{attr}_na"] = na.astype(np.uint8)
        return bool(na.any())

    add_strings("index", pd.Series(frame.index.astype(str)), "index")
    for i, name in enumerate(frame.columns):
        attr, series, dtype = f"col_{i}", frame[name], frame[name].dtype
        meta: dict[str, Any] = {"name": str(name), "attr": attr, "dtype": str(dtype)}
        if isinstance(dtype, pd.CategoricalDtype):
            cats = dtype.categories
            meta.update(kind="categorical", categories=cats.tolist(), cat_dtype=str(cats.dtype), ordered=dtype.ordered)
            attrs.append(tiledb.Attr(attr, dtype=np.int32, filters=zstd))
            data[attr] = series.cat.codes.to_numpy().astype(np.int32)
        elif dtype.kind in "biuf" and isinstance(dtype, np.dtype):
            meta["kind"] = "numeric"
            store_dtype = np.uint8 if dtype.kind == "b" else dtype
            attrs.append(tiledb.Attr(attr, dtype=store_dtype, filters=zstd))
            data[attr] = series.to_numpy().astype(store_dtype)
        elif dtype.kind == "O" or isinstance(dtype, pd.StringDtype):
            meta.update(kind="string", has_na=add_strings(attr, series, str(name)))
        else:
            raise InputError(
                f"{source}: {what} column '{name}' has dtype {dtype}, which the TileDB store cannot hold; "
                "convert it to str, a number or a category"
            )
        columns.append(meta)
    dim = tiledb.Dim("row", domain=(0, max(n, 1) - 1), tile=max(min(n, 65_536), 1), dtype=np.int64)
    schema = tiledb.ArraySchema(domain=tiledb.Domain(dim), attrs=attrs, sparse=False)
    tiledb.Array.create(uri, schema, ctx=ctx)
    with tiledb.open(uri, "w", ctx=ctx) as arr:
        if n:
            arr[0:n] = data
        arr.meta["columns"] = json.dumps(columns)
        arr.meta["index_name"] = json.dumps(frame.index.name)
        arr.meta["n_rows"] = n


def read_frame(tiledb: Any, uri: str, ctx: Any) -> pd.DataFrame:
    with tiledb.open(uri, ctx=ctx) as arr:
        columns, n = json.loads(arr.meta["columns"]), int(arr.meta["n_rows"])
        index_name = json.loads(arr.meta["index_name"])
        data = arr[0:n] if n else {a.name: np.zeros(0, dtype=object) for a in arr.schema}
    out = {}
    for meta in columns:
        values = data[meta["attr"]]
        if meta["kind"] == "categorical":
            cats = pd.Index(meta["categories"], dtype=meta["cat_dtype"])
            dtype = pd.CategoricalDtype(cats, ordered=meta["ordered"])
            out[meta["name"]] = pd.Categorical.from_codes(values.astype(np.int64), dtype=dtype)
        elif meta["kind"] == "numeric":
            out[meta["name"]] = values.astype(meta["dtype"])
        else:
            values = values.astype(object)
            if meta["has_na"]:
                values[data[f"{meta['attr']}_na"].astype(bool)] = None if meta["dtype"] != "object" else np.nan
            out[meta["name"]] = pd.array(values, dtype=meta["dtype"])
    index = pd.Index(data["index"].astype(object), name=index_name, dtype=object)
    return pd.DataFrame(out, index=index, columns=pd.Index([m["name"] for m in columns], dtype=object))
