"""scvi-scale: scVI (Lopez et al. 2018) trained out of core, faithful to scvi-tools.

The Python API, as ``import scvi_scale as ss``: ``ss.open_store``, ``ss.convert``, ``ss.append``,
``ss.prepare``, ``ss.train``, ``ss.resume``, ``ss.load_run``, ``ss.embed``, ``ss.embed_to_store``,
``ss.read_embedding``, ``ss.evaluate``, ``ss.plot_losses``, ``ss.plot_embedding``, ``ss.import_scvi_tools``,
``ss.export_scvi_tools``, ``ss.Config`` / ``ss.load_config``, ``ss.report``, ``ss.rebuild`` and the analyses
(``ss.normalized_expression``, ``ss.differential_expression``, ``ss.posterior_predictive_sample``). They live in
:mod:`scvi_scale.api` and the modules named in ``_EXPORTS`` below, and are imported on first use, so that
``import scvi_scale`` stays cheap (no torch, no Ray, no TileDB) and a missing optional module only fails the
name that needs it.

Four names are both an API function and a subpackage or module of their own: ``train`` (``scvi_scale/train/``),
``report``, ``rebuild`` and ``demo``. ``scvi_scale.train`` is then an :class:`_ApiEntry`: calling it calls the
function, and its attributes are the subpackage's, so ``scvi_scale.train.loop`` and ``import
scvi_scale.train.loop as loop`` keep working.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_API = "scvi_scale.api"
_API_NAMES = (
    "Evaluation", "Run", "append", "convert", "embed", "embed_to_store", "evaluate", "export_scvi_tools",
    "import_scvi_tools", "load_run", "open_counts", "open_store", "plot_embedding", "plot_losses", "prepare",
    "prepare_summary", "read_embedding", "resume",
)  # fmt: skip
# public name -> (module, attribute), imported when first asked for
_EXPORTS: dict[str, tuple[str, str]] = {
    **{name: (_API, name) for name in _API_NAMES},
    "Config": ("scvi_scale.config", "Config"),
    "ConfigError": ("scvi_scale.config", "ConfigError"),
    "load_config": ("scvi_scale.config", "load_config"),
    "InputError": ("scvi_scale.store.errors", "InputError"),
    "TrainingInterrupted": ("scvi_scale.train.loop", "TrainingInterrupted"),
    "build_report": ("scvi_scale.report.build", "build_report"),
    "normalized_expression": ("scvi_scale.analysis", "normalized_expression"),
    "differential_expression": ("scvi_scale.analysis", "differential_expression"),
    "posterior_predictive_sample": ("scvi_scale.analysis", "posterior_predictive_sample"),
}
# API functions whose name is also a subpackage or module of scvi_scale
_SHADOWED: dict[str, tuple[str, str]] = {
    "train": (_API, "train"),
    "demo": (_API, "demo"),
    "report": ("scvi_scale.report.build", "build_report"),
    "rebuild": ("scvi_scale.rebuild", "rebuild"),
}

__all__ = sorted([*_EXPORTS, *_SHADOWED, "__version__"])


def _resolve(public: str, module: str, attr: str) -> Any:
    try:
        found = importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name is None or not (module == err.name or module.startswith(err.name + ".")):
            raise  # a dependency of the module is missing: its own message names it
        raise AttributeError(f"scvi_scale.{public} needs {module}, which this install of scvi-scale lacks") from err
    return getattr(found, attr)


class _ApiEntry:
    """An API function that shares its name with a subpackage: called, it is the function; else the subpackage."""

    def __init__(self, name: str, module: str, attr: str) -> None:
        object.__setattr__(self, "_entry", (name, module, attr))

    def _function(self) -> Any:
        return _resolve(*self._entry)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._function()(*args, **kwargs)

    @property
    def __doc__(self) -> str | None:  # type: ignore[override]
        return self._function().__doc__

    @property
    def __wrapped__(self) -> Any:  # inspect.signature, help() and IPython's `?` follow it to the function
        return self._function()

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self._function())

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or "_entry" not in self.__dict__:  # copy/pickle probing a bare instance
            raise AttributeError(name)
        return getattr(importlib.import_module(f"scvi_scale.{self._entry[0]}"), name)

    def __reduce__(self) -> tuple[Any, tuple[str]]:  # pickled by name: the package's own entry on unpickling
        return _api_entry, (self._entry[0],)

    def __setattr__(self, name: str, value: Any) -> None:  # monkeypatching scvi_scale.train.X patches the subpackage
        setattr(importlib.import_module(f"scvi_scale.{self._entry[0]}"), name, value)

    def __dir__(self) -> list[str]:
        return dir(importlib.import_module(f"scvi_scale.{self._entry[0]}"))

    def __repr__(self) -> str:
        name, module, attr = self._entry
        return f"<function scvi_scale.{name} ({module}.{attr}); also the subpackage scvi_scale.{name}>"


def _api_entry(name: str) -> _ApiEntry:
    return globals()[name]


class _Package(types.ModuleType):
    """This package's module type: the import system binds a subpackage to its parent with ``setattr``, which
    would replace ``scvi_scale.train`` (the function) by ``scvi_scale/train/`` (the loop) once it is imported."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            return  # the _ApiEntry stays, and reaches the submodule through sys.modules
        super().__setattr__(name, value)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = _resolve(name, *_EXPORTS[name])
        globals()[name] = value  # found once; later lookups do not come here
        return value
    raise AttributeError(f"module 'scvi_scale' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*__all__, *(name for name in globals() if name.startswith("__"))})


for _name, (_module, _attr) in _SHADOWED.items():
    globals()[_name] = _ApiEntry(_name, _module, _attr)
del _name, _module, _attr
sys.modules[__name__].__class__ = _Package

if TYPE_CHECKING:  # what editors and type checkers see
    from scvi_scale.api import (  # noqa: F401
        Evaluation,
        Run,
        append,
        convert,
        demo,
        embed,
        embed_to_store,
        evaluate,
        export_scvi_tools,
        import_scvi_tools,
        load_run,
        open_counts,
        open_store,
        plot_embedding,
        plot_losses,
        prepare,
        read_embedding,
        resume,
        train,
    )
    from scvi_scale.config import Config, ConfigError, load_config  # noqa: F401
    from scvi_scale.store.errors import InputError  # noqa: F401
    from scvi_scale.train.loop import TrainingInterrupted  # noqa: F401
