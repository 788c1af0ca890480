"""A restricted unpickler: loads learner state, refuses anything that could run other code.

A pickle names the callables that rebuild it (``module``, ``name``), and a plain
:func:`pickle.loads` imports and calls whatever it is told: ``os.system``, ``builtins.eval``,
``subprocess.Popen``. Checkpoints are signed, but a signature only says who wrote a file, not
that it holds nothing else. :func:`restricted_loads` resolves only what a checkpoint can
legitimately hold:

* classes of River's estimators and their internals (modules under ``river.``, without the
  data-loading ones), and of stream-learner's state modules;
* numpy arrays, dtypes, scalars and random generators (the functions numpy's pickles use);
* a few builtins and standard containers (``dict``, ``list``, ``set``, ``collections.deque``,
  ``datetime``, ``random.Random``, ``copyreg._reconstructor``, ...);
* ``getattr`` only for a non-dunder attribute of an object of those classes (pickled bound
  methods), never of a class, module or array.

Anything else raises :class:`UnpicklingRefused` before it is imported, let alone called.
Renamed classes are mapped through :data:`RENAMED` (old ``(module, name)`` → new) so that
checkpoints written before a class moved still load.

>>> import os, pickle
>>> restricted_loads(pickle.dumps({"weights": [1.0, 2.0]}))
{'weights': [1.0, 2.0]}
>>> class Exploit:
...     def __reduce__(self):
...         return (os.system, ("echo pwned",))
>>> restricted_loads(pickle.dumps(Exploit()))
Traceback (most recent call last):
...
stream_learner.state.unpickle.UnpicklingRefused: refusing to load posix.system: not a class a checkpoint may hold

"""

from __future__ import annotations

import builtins
import collections
import copy
import copyreg
import datetime
import functools
import io
import pickle
import random
from collections.abc import Iterable

__all__ = ["MOVED_MODULES", "RENAMED", "UnpicklingRefused", "RestrictedUnpickler", "restricted_loads"]


class UnpicklingRefused(pickle.UnpicklingError):
    """The pickle names something a checkpoint may not hold; nothing of it was run."""


# Classes that moved: (old module, old name) -> (new module, new name). Add a line when a
# class that checkpoints hold is renamed or moved, so that older checkpoints keep loading.
RENAMED: dict[tuple[str, str], tuple[str, str]] = {}

# Modules that moved into the role subpackages; checkpoints written before the move name
# the old paths. Only the modules whose classes checkpoints may hold are listed.
MOVED_MODULES: dict[str, str] = {
    "stream_learner.drift": "stream_learner.core.drift",
    "stream_learner.evaluation": "stream_learner.core.evaluation",
    "stream_learner.features": "stream_learner.core.features",
    "stream_learner.fusion": "stream_learner.fusion.fusion",
    "stream_learner.labels": "stream_learner.core.labels",
    "stream_learner.learners": "stream_learner.learners.registry",
    "stream_learner.naive_bayes": "stream_learner.learners.naive_bayes",
    "stream_learner.neural": "stream_learner.learners.neural.model",
    "stream_learner.records": "stream_learner.core.records",
    "stream_learner.runner": "stream_learner.core.processor",
}

# stream-learner modules whose classes are learner state (never I/O: sources, sinks, brokers).
STATE_MODULES = (
    "stream_learner.core.drift",
    "stream_learner.core.evaluation",
    "stream_learner.core.features",
    "stream_learner.fusion.fusion",
    "stream_learner.core.labels",
    "stream_learner.learners.registry",
    "stream_learner.learners.naive_bayes",
    "stream_learner.learners.neural.model",
    "stream_learner.core.records",
    "stream_learner.core.processor",
)
# Classes of those modules that talk to Kafka or hold keys: never part of a checkpoint.
_REFUSED_CLASSES = {
    ("stream_learner.fusion.fusion", "Fusion"),
    ("stream_learner.fusion.fusion", "ModelFeed"),
    ("stream_learner.fusion.fusion", "_KafkaPythonReader"),
    ("stream_learner.fusion.fusion", "_ConfluentReader"),
}
# River: every estimator and its internals, but not what reads files or the network.
_RIVER_REFUSED = (
    "river.datasets",
    "river.stream",
    "river.compat",
    "river.api",
    "river.checks",
    "river.evaluate",
)

_ALLOWED = {
    ("builtins", name): getattr(builtins, name)
    for name in (
        "bool",
        "bytearray",
        "bytes",
        "complex",
        "dict",
        "float",
        "frozenset",
        "int",
        "list",
        "object",
        "range",
        "set",
        "slice",
        "str",
        "tuple",
    )
}
_ALLOWED.update(
    {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("collections", "defaultdict"): collections.defaultdict,
        ("collections", "deque"): collections.deque,
        ("collections", "Counter"): collections.Counter,
        ("copyreg", "_reconstructor"): copyreg._reconstructor,
        (
            "copy",
            "deepcopy",
        ): copy.deepcopy,  # River pickles defaultdict factories as partial(deepcopy, x)
        ("functools", "partial"): functools.partial,
        ("random", "Random"): random.Random,
        ("datetime", "date"): datetime.date,
        ("datetime", "datetime"): datetime.datetime,
        ("datetime", "time"): datetime.time,
        ("datetime", "timedelta"): datetime.timedelta,
        ("datetime", "timezone"): datetime.timezone,
    }
)
# numpy's own reconstruction functions (both the numpy 1 and numpy 2 module names).
_NUMPY_FUNCTIONS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy.random._pickle", "__bit_generator_ctor"),
    ("numpy.random._pickle", "__generator_ctor"),
    ("numpy.random._pickle", "__randomstate_ctor"),
    ("numpy.random.bit_generator", "__pyx_unpickle_SeedSequence"),
}
_NUMPY_CLASSES = (
    "numpy",
    "numpy.dtypes",
    "numpy.random._generator",
    "numpy.random._mt19937",
    "numpy.random._pcg64",
    "numpy.random._philox",
    "numpy.random._sfc64",
    "numpy.random.bit_generator",
    "numpy.random.mtrand",
)


def _within(module: str, packages: Iterable[str]) -> bool:
    return any(module == package or module.startswith(package + ".") for package in packages)


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals listed in this module's docstring.

    ``trusted_modules`` adds modules whose classes may be loaded too (the module of a user's
    ``module:factory`` learner, say).
    """

    def __init__(self, file, *, trusted_modules: Iterable[str] = ()):
        super().__init__(file)
        self.trusted_modules = tuple(trusted_modules)

    def find_class(self, module: str, name: str):
        module, name = RENAMED.get((module, name), (module, name))
        module = MOVED_MODULES.get(module, module)
        if (module, name) == ("builtins", "getattr"):
            return self._getattr
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if (module, name) in _NUMPY_FUNCTIONS:
            return super().find_class(module, name)
        refused = UnpicklingRefused(
            f"refusing to load {module}.{name}: not a class a checkpoint may hold"
        )
        if "." in name or name.startswith("__") or not self._class_module(module):
            raise refused
        if (module, name) in _REFUSED_CLASSES:
            raise refused
        found = super().find_class(module, name)
        # A class, defined where it claims (not, say, os.system imported into a river module).
        if not isinstance(found, type) or not self._class_module(
            getattr(found, "__module__", "") or ""
        ):
            raise refused
        if found.__module__ == "numpy" and not _numpy_value_class(found):
            raise refused  # numpy.memmap would open (and create) any file
        return found

    def _class_module(self, module: str) -> bool:
        if module in _NUMPY_CLASSES:
            return True
        if _within(module, ("river",)):
            return not _within(module, _RIVER_REFUSED)
        return _within(module, STATE_MODULES) or _within(module, self.trusted_modules)

    def _getattr(self, obj, name, *default):
        # Bound methods pickle as getattr(obj, "method"): allow that for learner objects only.
        cls = type(obj)
        if (
            not isinstance(name, str)
            or name.startswith("__")
            or isinstance(obj, type)
            or cls.__module__ in _NUMPY_CLASSES
            or not self._class_module(cls.__module__)
        ):
            raise UnpicklingRefused(
                f"refusing getattr({cls.__module__}.{cls.__qualname__}, {name!r}) in a checkpoint"
            )
        return getattr(obj, name, *default)


def _numpy_value_class(cls: type) -> bool:
    import numpy

    return cls in (numpy.ndarray, numpy.dtype) or issubclass(cls, numpy.generic)


def restricted_loads(data, *, trusted_modules: Iterable[str] = ()):
    """:func:`pickle.loads` through :class:`RestrictedUnpickler`."""
    return RestrictedUnpickler(io.BytesIO(data), trusted_modules=trusted_modules).load()


def module_of_factory(spec: str) -> str | None:
    """The module of a ``module:factory`` learner spec (its classes are trusted), else None."""
    if ":" in spec and not spec.endswith(".npz"):
        return spec.partition(":")[0]
    return None
