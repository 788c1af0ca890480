"""stream-learner's own learner: a small fastText-like neural text classifier in numpy.

Hashed features (the :class:`~stream_learner.core.features.TextFeaturizer` bucket ids) → an
embedding bag (the weighted mean or sum of rows of an embedding table) → an optional hidden
layer with dropout → a softmax over the classes seen so far.

* ``learn_one`` costs what the record costs: it reads and updates only the embedding rows of
  the record's buckets (sparse SGD, AdaGrad, or lazy Adam), never the whole table.
* ``learn_many`` / ``predict_many`` / ``predict_proba_many`` process a batch with a few
  vectorized calls (numpy, and scipy.sparse for the bags and the per-bucket gradient sums).
  They take a pandas DataFrame (River's interface), a list of feature dicts, or, fastest, a
  :class:`~stream_learner.core.features.BucketBatch` straight from
  :meth:`TextFeaturizer.buckets_many <stream_learner.core.features.TextFeaturizer.buckets_many>`
  (see the example below). A batch step sums the per-record gradients at the batch's starting
  parameters, so it is *close to* but not equal to the same records learned one at a time.
* A label never seen before may arrive at any time: the output layer gains a row, everything
  already learned is kept.
* :func:`save` / :func:`load` write and read a versioned, checksummed ``.npz`` file (no
  pickle) — see :mod:`stream_learner.learners.neural.format`. :func:`fuse` averages learners weighted
  by the records each has seen (federated averaging).
* Everything random comes from ``seed``: two runs over one stream give identical parameters.

``x`` is a dict ``{feature: weight}``. Integer features are bucket ids (taken modulo
``n_buckets``); other feature names (River's datasets use strings) are hashed with the stable
CRC-32 hash, so the learner also works on ordinary River feature dicts.

>>> model = NeuralClassifier(n_buckets=2**10, dim=8, seed=1)
>>> for _ in range(20):
...     model.learn_one({1: 1, 2: 1}, "spam")
...     model.learn_one({3: 1, 4: 1}, "ham")
>>> model.predict_one({1: 1})
'spam'
>>> sorted(model.predict_proba_one({3: 1, 4: 1}).items(), key=lambda kv: -kv[1])[0][0]
'ham'
>>> model.learn_one({5: 1}, "eggs")    # a new class: the output layer grows
>>> model.classes
['spam', 'ham', 'eggs']

Mini-batches of raw texts, the fast way: the featurizer hashes the whole batch at once and
the learner reads its bucket ids directly (``learn_many`` reuses ``predict_many``'s forward
pass on the same batch):

>>> featurizer = TextFeaturizer(n_buckets=2**10)
>>> model = NeuralClassifier(n_buckets=2**10, dim=8, seed=1)
>>> texts, labels = ["free money now", "lunch at noon?"] * 8, ["spam", "ham"] * 8
>>> for _ in range(5):
...     batch = featurizer.buckets_many(texts)
...     predicted = model.predict_many(batch)
...     model.learn_many(batch, labels)
>>> model.predict_many(featurizer.buckets_many(["money now", "lunch?"]))
['spam', 'ham']

The registered learner is a River pipeline over raw text:

>>> from stream_learner.learners.registry import make_learner
>>> pipeline = make_learner("neural", n_buckets=2**12)
>>> pipeline.learn_one("what a lovely day", "pos")
>>> pipeline.predict_one("lovely")
'pos'

"""

from __future__ import annotations

import inspect
import itertools
import math
import numbers
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np
from river import base, compose

from stream_learner.core.features import BucketBatch, TextFeaturizer, stable_bucket

__all__ = ["NeuralClassifier", "fuse", "neural_step"]

_OPTIMIZERS = ("sgd", "adagrad", "adam")
_ACTIVATIONS = ("relu", "tanh")
_BAGS = ("mean", "sum")
_ADAM_BETA1 = 0.9
_ADAM_BETA2 = 0.999
_EPS = 1e-8


class NeuralClassifier(base.MiniBatchClassifier):
    """Embedding-bag text classifier with sparse per-record updates.

    Parameters
    ----------
    n_buckets
        Rows of the embedding table (use the featurizer's ``n_buckets``).
    dim
        Width of the embedding rows.
    hidden
        Units of the hidden layer; 0 for none (the bag feeds the softmax directly, as in
        fastText).
    activation
        ``"relu"`` or ``"tanh"`` for the hidden layer.
    dropout
        Fraction of hidden units dropped while learning (inverted dropout); needs ``hidden``.
    bag
        ``"mean"``: the weighted mean of the rows (weights divided by the sum of their
        absolute values); ``"sum"``: the weighted sum.
    optimizer
        ``"sgd"``, ``"adagrad"`` or ``"adam"`` (lazy Adam on the embedding table: only the
        rows of the record's features are decayed and updated).
    lr
        Learning rate.
    lr_decay
        Schedule: the rate after ``t`` updates is ``lr / (1 + lr_decay * t)``.
    l2
        L2 penalty, applied to the parameters an update touches.
    init_scale
        Embedding rows start uniform in ``[-init_scale, init_scale]``; the output layer
        starts at zero.
    accumulator_init
        AdaGrad's squared-gradient sums start at this value (it bounds the first steps and
        replaces the usual epsilon); Adam's epsilon.
    dtype
        ``"float32"`` or ``"float64"``: the parameters and the arithmetic of an update.
    wide
        Add a linear ("wide") term over the same hashed features to the logits: per-class
        weights on each bucket (a table ``n_buckets`` × classes, sparse per-record updates by
        the same optimizer), fed the record's feature weights L2-normalized. It lets a few
        decisive words of a long text count, where the embedding bag's mean dilutes them
        (wide-and-deep; fastText's linear softmax over n-grams).
    wide_lr
        Learning rate of the wide term; None: ``lr``.
    seed
        Seeds the initialization and the dropout masks.

    """

    def __init__(
        self,
        n_buckets: int = 2**18,
        dim: int = 32,
        hidden: int = 0,
        activation: str = "relu",
        dropout: float = 0.0,
        bag: str = "mean",
        optimizer: str = "adagrad",
        lr: float = 0.2,
        lr_decay: float = 0.0,
        l2: float = 0.0,
        init_scale: float = 0.05,
        accumulator_init: float = 1e-6,
        dtype: str = "float32",
        wide: bool = False,
        wide_lr: float | None = None,
        seed: int = 0,
    ):
        self.n_buckets = n_buckets
        self.dim = dim
        self.hidden = hidden
        self.activation = activation
        self.dropout = dropout
        self.bag = bag
        self.optimizer = optimizer
        self.lr = lr
        self.lr_decay = lr_decay
        self.l2 = l2
        self.init_scale = init_scale
        self.accumulator_init = accumulator_init
        self.dtype = dtype
        self.wide = wide
        self.wide_lr = wide_lr
        self.seed = seed

    # --- River plumbing -------------------------------------------------------------------

    @property
    def _multiclass(self):
        return True

    @property
    def _is_stochastic(self):
        return True

    @classmethod
    def _unit_test_params(cls):
        yield {"n_buckets": 2**10, "dim": 8}
        yield {"n_buckets": 2**10, "dim": 8, "hidden": 8, "dropout": 0.2, "optimizer": "adam"}
        yield {
            "n_buckets": 2**10,
            "dim": 4,
            "optimizer": "sgd",
            "bag": "sum",
            "l2": 1e-4,
            "hidden": 4,
            "activation": "tanh",
            "dtype": "float64",
        }
        yield {"n_buckets": 2**10, "dim": 8, "wide": True}
        yield {
            "n_buckets": 2**10,
            "dim": 4,
            "wide": True,
            "optimizer": "adam",
            "lr": 0.01,
            "hidden": 4,
        }

    @classmethod
    def _unit_test_skips(cls):
        # A batch step sums gradients taken at the batch's starting parameters: close to, but
        # by design not equal to, learning the same records one at a time.
        return {"check_learn_many_matches_learn_one"}

    def __getstate__(self):
        state = self.__dict__.copy()
        # Derived data: the predict → learn forward-pass cache, and views of the tables (a
        # pickled view would come back as a copy).
        state["_last"] = None
        state["_last_many"] = None
        state["_views"] = None
        state.pop("_buffers", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        # Learners pickled before a parameter existed (wide, wide_lr) have its default: the
        # behaviour they had then.
        for name, param in inspect.signature(type(self).__init__).parameters.items():
            if name != "self" and name not in state:
                setattr(self, name, param.default)

    # --- read-only views of the learned state -----------------------------------------------

    @property
    def classes(self) -> list:
        """Labels seen so far, in order of first appearance (the output layer's rows)."""
        return list(getattr(self, "_classes", ()))

    @property
    def n_seen(self) -> int:
        """Records learned (one at a time or in batches): this learner's weight in fusion."""
        return getattr(self, "_n_seen", 0)

    @property
    def n_updates(self) -> int:
        """Optimizer steps taken (one per ``learn_one``, one per ``learn_many`` batch) since
        the learner was created or :meth:`reset_optimizer` was called."""
        return getattr(self, "_t", 0)

    @property
    def embeddings(self) -> np.ndarray | None:
        """The embedding table (``n_buckets`` × ``dim``), read-only; None before learning."""
        return _readonly(getattr(self, "_params", {}).get("emb"))

    def parameters(self) -> dict[str, np.ndarray]:
        """Read-only views of the parameter arrays (they follow the learner as it learns).

        ``emb`` is the embedding table; ``out`` the output layer, one row per class, whose last
        column is the bias; ``w1`` the hidden layer (last column: bias) when there is one;
        ``wide`` the linear term (``n_buckets`` × classes) of a wide-and-deep learner.
        """
        return {name: _readonly(a) for name, a in getattr(self, "_params", {}).items()}

    # --- state: plain data with a schema version (the file format and checkpoints use it) -----

    STATE_SCHEMA = "stream-learner/neural"
    STATE_VERSION = 1

    def state_dict(self) -> dict:
        """Everything this learner is, as plain data: its parameters (``params``), and once it
        has learned, its classes, counters, random-generator state, parameter arrays
        (``arrays``) and optimizer state (``slots``: per parameter, the optimizer's arrays).

        The arrays are the learner's own (no copies): write them out, or copy them, before
        the learner learns again. :meth:`from_state` rebuilds an identical learner.

        >>> model = NeuralClassifier(n_buckets=16, dim=2)
        >>> model.learn_one({1: 1}, "a")
        >>> state = model.state_dict()
        >>> state["schema"], state["version"], state["classes"], sorted(state["arrays"])
        ('stream-learner/neural', 1, ['a'], ['emb', 'out'])
        >>> NeuralClassifier.from_state(state).predict_proba_one({1: 1}) == model.predict_proba_one({1: 1})
        True
        """
        state = {"schema": self.STATE_SCHEMA, "version": self.STATE_VERSION, "params": self._get_params()}
        if not hasattr(self, "_params"):
            return state
        state.update(
            classes=list(self._classes),
            n_seen=int(self._n_seen),
            t=int(self._t),
            rng=self._rng.bit_generator.state,
            arrays=dict(self._params),
            slots={name: list(slots) for name, slots in self._slots.items()},
        )
        return state

    @classmethod
    def from_state(cls, state: dict) -> NeuralClassifier:
        """The learner :meth:`state_dict` described; raises
        :class:`~stream_learner.state.schema.StateError` (a ValueError) on a state of another
        schema, a newer version, or arrays that do not fit the parameters. The arrays are
        copied (to the learner's dtype)."""
        from stream_learner.state.schema import StateError, check_schema

        check_schema(state, cls.STATE_SCHEMA, (cls.STATE_VERSION,))
        try:
            learner = cls(**state["params"])
            learner._check_config()
            if "arrays" in state:
                learner._restore(state)
        except StateError:
            raise
        except (KeyError, TypeError, ValueError) as error:
            raise StateError(f"neural learner state does not fit: {type(error).__name__}: {error}") from None
        return learner

    def _restore(self, state: dict) -> None:
        from stream_learner.state.schema import StateError

        dtype = np.dtype(self.dtype)
        classes = list(state["classes"])
        if len(set(classes)) != len(classes):
            raise StateError("neural learner state lists a class twice")
        width = self.hidden or self.dim
        shapes = {"emb": (self.n_buckets, self.dim), "out": (len(classes), width + 1)}
        if self.hidden:
            shapes["w1"] = (self.hidden, self.dim + 1)
        if self.wide:
            shapes["wide"] = (self.n_buckets, len(classes))
        arrays, slots = state["arrays"], state["slots"]
        if set(arrays) != set(shapes) or set(slots) != set(shapes):
            raise StateError(f"parameters {sorted(arrays)} do not fit the learner (expected {sorted(shapes)})")
        params = {name: np.array(arrays[name], dtype=dtype) for name in shapes}
        restored = {name: [np.array(s, dtype=dtype) for s in slots[name]] for name in shapes}
        for name, shape in shapes.items():
            if params[name].shape != shape or any(s.shape != shape for s in restored[name]):
                raise StateError(f"parameter {name} has shape {params[name].shape}, not {shape}")
            if len(restored[name]) != len(self._new_slots(params[name][:0])):
                raise StateError(f"optimizer state of {name} does not fit {self.optimizer}")
        rng = np.random.default_rng()
        rng.bit_generator.state = state["rng"]
        self._params = params
        self._slots = restored
        self._classes = classes
        self._class_index = {c: i for i, c in enumerate(classes)}
        self._n_seen = int(state["n_seen"])
        self._t = int(state["t"])
        self._rng = rng
        self._last = self._last_many = None
        self._views = None

    # --- set-up ------------------------------------------------------------------------------

    def _check_config(self):
        if self.optimizer not in _OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {_OPTIMIZERS}, not {self.optimizer!r}")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {_ACTIVATIONS}, not {self.activation!r}")
        if self.bag not in _BAGS:
            raise ValueError(f"bag must be one of {_BAGS}, not {self.bag!r}")
        for name, low in (("n_buckets", 1), ("dim", 1), ("hidden", 0)):
            value = getattr(self, name)
            if not (isinstance(value, numbers.Integral) and value >= low):
                raise ValueError(f"{name} must be an integer >= {low}, not {value!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), not {self.dropout!r}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', not {self.dtype!r}")
        if not self.accumulator_init > 0:
            raise ValueError(f"accumulator_init must be > 0, not {self.accumulator_init!r}")
        if self.wide_lr is not None and not self.wide_lr > 0:
            raise ValueError(f"wide_lr must be > 0 or None, not {self.wide_lr!r}")

    def _ensure_init(self):
        if hasattr(self, "_params"):
            return
        self._check_config()
        dtype = np.dtype(self.dtype)
        rng = np.random.default_rng(self.seed)
        scale = self.init_scale
        emb = rng.random((self.n_buckets, self.dim), dtype=dtype)
        emb *= 2 * scale
        emb -= scale
        params = {"emb": emb}
        width = self.dim
        if self.hidden:
            bound = math.sqrt(6.0 / (self.dim + self.hidden))  # Glorot uniform
            w1 = np.zeros((self.hidden, self.dim + 1), dtype=dtype)
            w1[:, :-1] = rng.uniform(-bound, bound, (self.hidden, self.dim))
            params["w1"] = w1
            width = self.hidden
        params["out"] = np.zeros((0, width + 1), dtype=dtype)
        if self.wide:
            # One column per class, added as classes arrive; rows read and written per record.
            params["wide"] = np.zeros((self.n_buckets, 0), dtype=dtype)
        self._params = params
        self._slots = {name: self._new_slots(a) for name, a in params.items()}
        self._classes = []
        self._class_index = {}
        self._n_seen = 0
        self._t = 0
        self._rng = rng  # goes on after the initialization: dropout masks
        self._last = self._last_many = None
        self._views = None

    def _new_slots(self, array):
        if self.optimizer == "adagrad":
            return [np.full_like(array, self.accumulator_init)]
        if self.optimizer == "adam":
            return [np.zeros_like(array), np.zeros_like(array)]
        return []

    def _add_class(self, label):
        params, slots = self._params, self._slots
        out = params["out"]
        params["out"] = np.vstack([out, np.zeros((1, out.shape[1]), dtype=out.dtype)])
        fresh = self._new_slots(params["out"][:1])
        slots["out"] = [np.vstack([s, f]) for s, f in zip(slots["out"], fresh, strict=True)]
        if "wide" in params:
            wide = params["wide"]
            column = np.zeros((wide.shape[0], 1), dtype=wide.dtype)
            params["wide"] = np.hstack([wide, column])
            fresh = self._new_slots(column)
            slots["wide"] = [np.hstack([s, f]) for s, f in zip(slots["wide"], fresh, strict=True)]
        self._class_index[label] = len(self._classes)
        self._classes.append(label)
        self._last = None
        return len(self._classes) - 1

    # --- one record ------------------------------------------------------------------------------

    def _encode(self, x):
        """``x`` → (distinct bucket ids, weights, embedding rows); weights normalized for a mean.

        ``x`` is a dict ``{feature: weight}`` or a sequence of bucket ids with repeats (what
        :meth:`TextFeaturizer.buckets` returns: each occurrence weighs 1).
        """
        if not isinstance(x, dict):
            return self._encode_buckets(x)
        n = len(x)
        params = self._params
        keys = rows = None
        if n and type(next(iter(x))) is int:
            try:
                # uint64 refuses negative ids (the slow path wraps them); take refuses too large.
                keys = np.fromiter(x, dtype=np.uint64, count=n).view(np.intp)
                rows = params["emb"].take(keys, 0)
            except (OverflowError, IndexError):
                keys = None
        try:
            weights = np.fromiter(x.values(), dtype=self.dtype, count=n)
            total = sum(map(abs, x.values()))
        except (TypeError, ValueError) as error:
            raise ValueError(f"feature weights must be numbers: {error}") from None
        if not math.isfinite(total):
            # One NaN or infinity would spread through the table: refuse it, change nothing.
            raise ValueError("feature weights must be finite numbers")
        if self.bag != "mean":
            total = 1.0
        if keys is None:
            # Hashing or wrapping around may send two features to one bucket: merge them, as
            # the sparse update needs each row once. Sorting makes the order of x irrelevant.
            hashed = np.fromiter((_bucket_of(k, self.n_buckets) for k in x), np.int64, count=n)
            keys, inverse = np.unique(hashed, return_inverse=True)
            weights = np.bincount(inverse, weights=weights, minlength=keys.size).astype(self.dtype)
            rows = params["emb"].take(keys, 0)
        if total and total != 1.0:
            weights *= 1.0 / total
        return keys, weights, rows

    def _encode_buckets(self, x):
        n = len(x)
        try:
            ids = np.fromiter(x, dtype=np.int64, count=n)
        except (TypeError, ValueError, OverflowError) as error:
            raise ValueError(f"x must be a dict or a sequence of integer bucket ids: {error}") from None
        if n and (ids.min() < 0 or ids.max() >= self.n_buckets):
            ids %= self.n_buckets
        # Distinct ids and their counts; cheaper than np.unique on a few dozen ids.
        ids.sort()
        repeated = ids[1:] == ids[:-1]
        if repeated.any():
            first = np.ones(n, dtype=bool)
            np.logical_not(repeated, out=first[1:])
            starts = np.flatnonzero(first)
            keys = ids[starts]
            weights = np.diff(starts, append=n).astype(self.dtype)
        else:
            keys = ids
            weights = np.ones(n, dtype=self.dtype)
        if self.bag == "mean" and n:
            weights *= 1.0 / n
        return keys, weights, self._params["emb"].take(keys, 0)

    def _forward(self, weights, rows, train: bool, keys=None):
        """(bag with a trailing 1, hidden pre-activation, dropout mask, hidden output with a
        trailing 1, class probabilities as a list, and for a wide learner (its feature
        weights, its rows of the wide table))."""
        dim = self.dim
        bag = np.empty(dim + 1, dtype=rows.dtype)
        bag[dim] = 1.0
        np.matmul(weights, rows, out=bag[:dim])
        pre = mask = None
        h = bag
        if self.hidden:
            pre = self._params["w1"] @ bag
            h = np.empty(self.hidden + 1, dtype=rows.dtype)
            h[-1] = 1.0
            if self.activation == "relu":
                np.maximum(pre, 0.0, out=h[:-1])
            else:
                np.tanh(pre, out=h[:-1])
            if train and self.dropout:
                keep = 1.0 - self.dropout
                mask = (self._rng.random(self.hidden) < keep) / keep
                h[:-1] *= mask
        logits = self._params["out"] @ h
        if "wide" not in self._params:
            return bag, pre, mask, h, _softmax(logits), None
        wide_weights = _l2_normalized(weights)
        wide_rows = self._params["wide"].take(keys, 0)
        logits += wide_weights @ wide_rows
        return bag, pre, mask, h, _softmax(logits), (wide_weights, wide_rows)

    def _backward(self, weights, forward, target: int) -> dict[str, np.ndarray]:
        """Gradients of one record's cross-entropy (``emb``: only the record's rows)."""
        params = self._params
        bag, pre, mask, h, proba, wide = forward
        g = list(proba)
        g[target] -= 1.0
        g = np.array(g, dtype=h.dtype)
        out = params["out"]
        g_h = g @ out[:, :-1]
        grads = {"out": g[:, None] * h}
        if self.hidden:
            if self.activation == "relu":
                g_pre = g_h * (pre > 0)
            else:
                g_pre = g_h * (1.0 - h[:-1] ** 2) if mask is None else g_h * (1.0 - np.tanh(pre) ** 2)
            if mask is not None:
                g_pre *= mask
            grads["w1"] = g_pre[:, None] * bag
            g_h = g_pre @ params["w1"][:, :-1]
        grads["emb"] = weights[:, None] * g_h
        if wide is not None:
            grads["wide"] = np.multiply.outer(wide[0], g)
        return grads

    def _rate(self) -> float:
        return self.lr / (1.0 + self.lr_decay * self._t) if self.lr_decay else self.lr

    def _wide_rate(self, lr: float) -> float:
        return lr if self.wide_lr is None else lr * (self.wide_lr / self.lr)

    def _apply(self, name, grad, lr, keys=None, rows=None):
        """One optimizer step on parameter ``name``, or on its rows ``keys`` (distinct) whose
        current values are ``rows``."""
        param = self._params[name]
        slots = self._slots[name]
        current = param if keys is None else rows
        if self.l2:
            grad = grad + self.l2 * current
        optimizer = self.optimizer
        if optimizer == "adagrad":
            if keys is None:
                acc = slots[0]
                acc += grad * grad
            else:
                acc = slots[0].take(keys, 0)
                acc += grad * grad
                _put_rows(slots[0], keys, acc)
            step = (lr * grad) / np.sqrt(acc)
        elif optimizer == "adam":
            t = self._t
            lr = lr * math.sqrt(1.0 - _ADAM_BETA2**t) / (1.0 - _ADAM_BETA1**t)
            if keys is None:
                m, v = slots
                m *= _ADAM_BETA1
                m += (1.0 - _ADAM_BETA1) * grad
                v *= _ADAM_BETA2
                v += (1.0 - _ADAM_BETA2) * (grad * grad)
            else:
                m = _ADAM_BETA1 * slots[0].take(keys, 0) + (1.0 - _ADAM_BETA1) * grad
                v = _ADAM_BETA2 * slots[1].take(keys, 0) + (1.0 - _ADAM_BETA2) * (grad * grad)
                _put_rows(slots[0], keys, m)
                _put_rows(slots[1], keys, v)
            step = (lr * m) / (np.sqrt(v) + self.accumulator_init)
        else:
            step = lr * grad
        if keys is None:
            param -= step
        else:
            _put_rows(param, keys, current - step)

    def learn_one(self, x, y):
        """Learn one record: ``x`` a dict ``{bucket id or feature: weight}``, or a sequence of
        bucket ids (:meth:`TextFeaturizer.buckets`, faster: no dict to build)."""
        self._ensure_init()
        last = self._last
        self._last = None
        if last is not None and last[0] == self._t and _same_input(last[1], x):
            keys, weights, rows, forward = last[2:]
            if self.dropout and self.hidden:
                forward = None
        else:
            keys, weights, rows = self._encode(x)  # raises on bad input, before any change
            forward = None
        target = self._class_index.get(y)
        if target is None:
            target = self._add_class(y)
            forward = None
        if forward is None:
            forward = self._forward(weights, rows, train=True, keys=keys)
        self._t += 1
        if self.optimizer == "adagrad" and not (self.hidden or self.l2 or self.lr_decay):
            self._learn_linear_adagrad(keys, weights, rows, forward[0], forward[4], target)
            if forward[5] is not None:
                self._learn_wide_adagrad(keys, *forward[5], forward[4], target)
        else:
            grads = self._backward(weights, forward, target)
            lr = self._rate()
            self._apply("out", grads["out"], lr)
            if self.hidden:
                self._apply("w1", grads["w1"], lr)
            self._apply("emb", grads["emb"], lr, keys, rows)
            if "wide" in grads:
                self._apply("wide", grads["wide"], self._wide_rate(lr), keys, forward[5][1])
        self._n_seen += 1

    def _learn_wide_adagrad(self, keys, wide_weights, wide_rows, proba, target):
        # The wide term's AdaGrad step, written out like _learn_linear_adagrad's.
        g = list(proba)
        g[target] -= 1.0
        grad = np.multiply.outer(wide_weights, np.array(g, dtype=wide_rows.dtype))
        table, acc_table = self._params["wide"], self._slots["wide"][0]
        acc = acc_table.take(keys, 0)
        acc += grad * grad
        _put_rows(acc_table, keys, acc)
        grad /= np.sqrt(acc)
        grad *= self._wide_rate(self.lr)
        wide_rows -= grad
        _put_rows(table, keys, wide_rows)

    def _learn_linear_adagrad(self, keys, weights, rows, bag, proba, target):
        # The default configuration, written out: the same arithmetic as _backward + _apply
        # with fewer numpy calls, since per-call overhead is most of a record's cost.
        lr = self.lr
        params, slots = self._params, self._slots
        out = params["out"]
        g = list(proba)
        g[target] -= 1.0
        g = np.array(g, dtype=out.dtype)
        g_bag = g @ out
        g_out = np.multiply.outer(g, bag)
        acc = slots["out"][0]
        acc += g_out * g_out
        g_out /= np.sqrt(acc)
        g_out *= lr
        out -= g_out
        table_rows, acc_rows = self._row_views()
        g_emb = np.multiply.outer(weights, g_bag[:-1])
        acc = slots["emb"][0].take(keys, 0)
        acc += g_emb * g_emb
        acc_rows.put(keys, acc.view(acc_rows.dtype))
        g_emb /= np.sqrt(acc)
        g_emb *= lr
        rows -= g_emb
        table_rows.put(keys, rows.view(table_rows.dtype))

    def _row_views(self):
        """The embedding table and its AdaGrad sums seen as 1-D arrays of whole rows:
        ``put`` on them writes rows faster than fancy-index assignment."""
        emb, acc = self._params["emb"], self._slots["emb"][0]
        views = self._views
        if views is None or views[0] is not emb or views[1] is not acc:
            row = np.dtype((np.void, emb.shape[1] * emb.itemsize))
            views = self._views = (emb, acc, emb.view(row).ravel(), acc.view(row).ravel())
        return views[2], views[3]

    def predict_proba_one(self, x):
        if not getattr(self, "_classes", None):
            return {}
        return dict(zip(self._classes, self._proba(x), strict=True))

    def _proba(self, x) -> list[float]:
        keys, weights, rows = self._encode(x)
        forward = self._forward(weights, rows, train=False, keys=keys)
        # learn_one(x) right after predicting x reuses this forward pass (same x, no update since).
        self._last = (self._t, _cache_key(x), keys, weights, rows, forward)
        return forward[4]

    def predict_one(self, x, **kwargs):
        if not getattr(self, "_classes", None):
            return None
        proba = self._proba(x)
        return self._classes[max(range(len(proba)), key=proba.__getitem__)]

    # --- mini-batches --------------------------------------------------------------------------

    def _encode_many(self, X) -> _Encoded:
        """A batch (a :class:`BucketBatch`, or a list of feature dicts or bucket-id sequences)
        → its entries grouped by record and by bucket; raises on bad input."""
        if isinstance(X, BucketBatch):
            ids, offsets, weights = X.ids, X.offsets, X.weights
            try:
                ids = np.asarray(ids, dtype=np.int64)
                offsets = np.asarray(offsets, dtype=np.intp)
                if weights is not None:
                    weights = np.asarray(weights, dtype=np.float64)
            except (TypeError, ValueError, OverflowError) as error:
                raise ValueError(f"a BucketBatch holds integer ids and offsets, numeric weights: {error}") from None
            if (
                ids.ndim != 1
                or offsets.ndim != 1
                or offsets.size < 1
                or offsets[0] != 0
                or offsets[-1] != ids.size
                or (offsets.size > 1 and (np.diff(offsets) < 0).any())
                or (weights is not None and weights.shape != ids.shape)
            ):
                raise ValueError("a BucketBatch's offsets must rise from 0 to len(ids); weights match ids")
        else:
            ids, offsets, weights = self._csr_of(X)
        return self._group(ids, offsets, weights)

    def _csr_of(self, rows_of_x: list):
        """Feature dicts or bucket-id sequences → (ids, offsets, weights or None)."""
        n = len(rows_of_x)
        offsets = np.zeros(n + 1, dtype=np.intp)
        np.cumsum(np.fromiter(map(len, rows_of_x), dtype=np.intp, count=n), out=offsets[1:])
        total = int(offsets[-1])
        try:
            ids = np.fromiter(itertools.chain.from_iterable(rows_of_x), np.int64, count=total)
        except (TypeError, ValueError, OverflowError):
            ids = np.fromiter(
                (_bucket_of(k, self.n_buckets) for x in rows_of_x for k in x), np.int64, count=total
            )
        if not all(isinstance(x, dict) for x in rows_of_x):
            return ids, offsets, None
        try:
            weights = np.fromiter(
                itertools.chain.from_iterable(x.values() for x in rows_of_x), np.float64, count=total
            )
        except (TypeError, ValueError) as error:
            raise ValueError(f"feature weights must be numbers: {error}") from None
        return ids, offsets, weights

    def _group(self, ids: np.ndarray, offsets: np.ndarray, weights) -> _Encoded:
        from scipy import sparse

        n = offsets.size - 1
        lengths = np.diff(offsets)
        if ids.size and (ids.min() < 0 or ids.max() >= self.n_buckets):
            ids = ids % self.n_buckets
        dtype = np.dtype(self.dtype)
        if weights is not None:
            if not np.isfinite(weights).all():
                raise ValueError("feature weights must be finite numbers")
            if self.bag == "mean" and ids.size:
                record_of = np.repeat(np.arange(n), lengths)
                sums = np.bincount(record_of, weights=np.abs(weights), minlength=n)
                sums[sums == 0] = 1.0
                weights = weights / sums[record_of]
            data = weights.astype(dtype)
        elif self.bag == "mean":
            data = np.repeat((1.0 / np.maximum(lengths, 1)).astype(dtype), lengths)
        else:
            data = np.ones(ids.size, dtype=dtype)
        distinct, inverse = _distinct(ids, self.n_buckets)
        # Records × distinct buckets: bags are one sparse product, and the embedding gradient
        # (summed per bucket) another, with its transpose.
        matrix = sparse.csr_matrix(
            (data, inverse, offsets.astype(np.int32)), shape=(n, distinct.size)
        )
        wide_scale = _row_l2_scale(matrix) if self.wide else None
        return _Encoded(distinct=distinct, matrix=matrix, wide_scale=wide_scale)

    def _forward_many(self, encoded: _Encoded, train: bool):
        params = self._params
        n = encoded.matrix.shape[0]
        dtype = params["emb"].dtype
        # Into a buffer kept between batches: a fresh array this large costs page faults.
        table_rows = params["emb"].take(
            encoded.distinct, 0, out=self._buffer("rows", encoded.distinct.size), mode="clip"
        )
        bags = np.empty((n, self.dim + 1), dtype=dtype)
        bags[:, -1] = 1.0
        bags[:, :-1] = encoded.matrix @ table_rows
        pre = mask = None
        h = bags
        if self.hidden:
            pre = bags @ params["w1"].T
            h = np.ones((n, self.hidden + 1), dtype=dtype)
            h[:, :-1] = np.maximum(pre, 0.0) if self.activation == "relu" else np.tanh(pre)
            if train and self.dropout:
                keep = 1.0 - self.dropout
                mask = (self._rng.random((n, self.hidden)) < keep) / keep
                h[:, :-1] *= mask
        logits = (h @ params["out"].T).astype(np.float64)
        wide_rows = None
        if "wide" in params:
            wide_rows = params["wide"].take(encoded.distinct, 0)
            logits += encoded.wide_scale[:, None] * (encoded.matrix @ wide_rows)
        logits -= logits.max(axis=1, keepdims=True)
        proba = np.exp(logits)
        proba /= proba.sum(axis=1, keepdims=True)
        return table_rows, bags, pre, mask, h, wide_rows, proba

    def _batch_of(self, X):
        """``X`` as the learner reads it: a BucketBatch, or a list of rows."""
        return X if isinstance(X, BucketBatch) else _rows_of(X)

    def _predict_proba_array(self, X) -> np.ndarray:
        batch = self._batch_of(X)
        encoded = self._encode_many(batch)
        forward = self._forward_many(encoded, train=False)
        # learn_many on the same batch right after reuses the encoding and the forward pass.
        self._last_many = (self._t, _batch_key(batch), encoded, forward)
        return forward[-1]

    def predict_proba_many(self, X):
        """Class probabilities of a batch: a DataFrame, one column per class. ``X`` as for
        :meth:`learn_many`."""
        import pandas as pd

        index = X.index if _is_dataframe(X) else None
        if not getattr(self, "_classes", None):
            return pd.DataFrame(index=index)
        return pd.DataFrame(self._predict_proba_array(X), columns=self.classes, index=index)

    def predict_proba_rows(self, X) -> list[dict]:
        """Class probabilities of a batch in one forward pass, one ``{label: probability}``
        dict per record (what :meth:`predict_proba_one` gives); ``X`` as for :meth:`learn_many`.
        The stream processor's mini-batch mode reads these."""
        batch = self._batch_of(X)
        if not getattr(self, "_classes", None):
            return [{} for _ in range(len(batch))]
        classes = self._classes
        return [dict(zip(classes, row, strict=True)) for row in self._predict_proba_array(batch).tolist()]

    def predict_many(self, X):
        """Labels of a batch: a pandas Series for a DataFrame, otherwise a list. ``X`` as for
        :meth:`learn_many`."""
        batch = self._batch_of(X)
        if not getattr(self, "_classes", None):
            labels = [None] * len(batch)
        else:
            classes = self._classes
            proba = self._predict_proba_array(batch)
            labels = [classes[i] for i in proba.argmax(axis=1).tolist()]
        if _is_dataframe(X):
            import pandas as pd

            return pd.Series(labels, index=X.index, dtype=object)
        return labels

    def learn_many(self, X, y):
        """Learn a batch in one step; ``y`` the labels. ``X`` is a DataFrame (River's
        interface), a list of feature dicts or of bucket-id sequences, or, fastest, a
        :class:`~stream_learner.core.features.BucketBatch` as
        :meth:`TextFeaturizer.buckets_many <stream_learner.core.features.TextFeaturizer.buckets_many>`
        makes it from raw texts::

            batch = featurizer.buckets_many(texts)
            predicted = model.predict_many(batch)   # learn_many reuses this forward pass
            model.learn_many(batch, labels)

        One optimizer step on the sum of the records' gradients, all taken at the batch's
        starting parameters (standard mini-batch training). The result is close to, not equal
        to, ``learn_one`` over the same records: no record sees the updates of the records
        before it in its batch, and AdaGrad / Adam count one step per batch. On ``vader``
        batches of 256 score about two points below per-record learning when both are scored
        on the same batches (benchmarks/results/neural.md).
        """
        labels = list(y)
        batch = self._batch_of(X)
        n = len(batch)
        if n != len(labels):
            raise ValueError(f"{n} rows of features but {len(labels)} labels")
        if not labels:
            return
        self._ensure_init()
        self._last = None
        last, self._last_many = getattr(self, "_last_many", None), None
        forward = None
        if last is not None and last[0] == self._t and _same_batch(last[1], batch):
            encoded = last[2]
            if not (self.hidden and self.dropout):
                forward = last[3]
        else:
            encoded = self._encode_many(batch)  # raises on bad input, before any change
        index = self._class_index
        targets = list(map(index.get, labels))
        if None in targets:  # new labels: the output layer grows
            targets = [index[label] if label in index else self._add_class(label) for label in labels]
        targets = np.array(targets, dtype=np.intp)
        if forward is None or forward[-1].shape[1] != len(self._classes):
            forward = self._forward_many(encoded, train=True)
        table_rows, bags, pre, mask, h, wide_rows, proba = forward
        params = self._params
        g = proba.astype(h.dtype)
        g[np.arange(n), targets] -= 1.0
        g_h = g @ params["out"][:, :-1]
        grads = {"out": g.T @ h}
        if self.hidden:
            if self.activation == "relu":
                g_pre = g_h * (pre > 0)
            else:
                g_pre = g_h * (1.0 - np.tanh(pre) ** 2)
            if mask is not None:
                g_pre *= mask
            grads["w1"] = g_pre.T @ bags
            g_h = g_pre @ params["w1"][:, :-1]
        self._t += 1
        lr = self._rate()
        for name, grad in grads.items():
            self._apply(name, grad, lr)
        if wide_rows is not None and encoded.distinct.size:
            grad = np.asarray(
                encoded.matrix.T @ (encoded.wide_scale[:, None] * g), dtype=wide_rows.dtype
            )
            self._apply("wide", grad, self._wide_rate(lr), encoded.distinct, wide_rows)
        if encoded.distinct.size:
            # Embedding rows: each entry's weight times its record's bag gradient, summed per
            # bucket (the transposed sparse product).
            grad = np.asarray(encoded.matrix.T @ g_h, dtype=table_rows.dtype)
            self._update_rows(encoded.distinct, grad, table_rows, lr)
        self._n_seen += n

    def _update_rows(self, keys, grad, rows, lr) -> None:
        """The optimizer step on the embedding rows ``keys`` (distinct; current values
        ``rows``); AdaGrad's written out in place (``grad`` and ``rows`` are scratch)."""
        if self.optimizer != "adagrad":
            self._apply("emb", grad, lr, keys, rows)
            return
        if self.l2:
            grad += self.l2 * rows
        table_rows, acc_rows = self._row_views()
        # mode="clip": the keys are in range, and "raise" would copy through a temporary.
        acc = self._slots["emb"][0].take(keys, 0, out=self._buffer("acc", keys.size), mode="clip")
        scratch = np.multiply(grad, grad, out=self._buffer("scratch", keys.size))
        acc += scratch
        acc_rows.put(keys, acc.view(acc_rows.dtype))
        np.sqrt(acc, out=scratch)
        np.divide(grad, scratch, out=grad)
        grad *= lr
        rows -= grad
        table_rows.put(keys, rows.view(table_rows.dtype))

    def _buffer(self, name: str, rows: int) -> np.ndarray:
        """``rows`` × ``dim`` scratch rows, reused from batch to batch (derived state: not
        pickled). Large temporaries are what the mini-batch path spends most on otherwise."""
        buffers = getattr(self, "_buffers", None)
        if buffers is None:
            buffers = self._buffers = {}
        buffer = buffers.get(name)
        if buffer is None or buffer.shape[0] < rows:
            size = max(rows, 1024) if buffer is None else max(rows, 2 * buffer.shape[0])
            buffer = buffers[name] = np.empty((size, self.dim), dtype=self._params["emb"].dtype)
        return buffer[:rows]

    def reset_optimizer(self) -> None:
        """Start the optimizer afresh, keeping every parameter: for fine-tuning on a new domain.

        AdaGrad's squared-gradient sums (and Adam's moments) built on the old data make the
        steps small; reset, the learner adapts to the new data as fast as a cold one while
        starting from what it knows. The step count (for ``lr_decay`` and Adam) restarts too.
        """
        if not hasattr(self, "_params"):
            return
        self._slots = {name: self._new_slots(a) for name, a in self._params.items()}
        self._t = 0
        self._last = self._last_many = None

    # --- pretrained rows -----------------------------------------------------------------------

    def set_embedding_rows(self, keys, vectors, *, accumulator: float | None = None) -> None:
        """Overwrite rows of the embedding table (pretrained initialization).

        The optimizer statistics of those rows start afresh; with AdaGrad, ``accumulator``
        (instead of ``accumulator_init``) sets how firmly the new values resist the first
        updates.
        """
        self._ensure_init()
        keys = np.asarray(keys, dtype=np.intp)
        vectors = np.asarray(vectors)
        if vectors.shape != (keys.size, self.dim):
            raise ValueError(f"vectors must have shape ({keys.size}, {self.dim}), not {vectors.shape}")
        if keys.size and (keys.min() < 0 or keys.max() >= self.n_buckets):
            raise ValueError(f"keys must be bucket ids in [0, {self.n_buckets})")
        if np.unique(keys).size != keys.size:
            raise ValueError("keys must be distinct")
        self._params["emb"][keys] = vectors
        for slot, fresh in zip(self._slots["emb"], self._new_slots(vectors), strict=True):
            slot[keys] = fresh
        if accumulator is not None and self.optimizer == "adagrad":
            self._slots["emb"][0][keys] = accumulator
        self._last = None


def _softmax(logits: np.ndarray) -> list[float]:
    # Few classes: plain Python floats are faster than numpy calls and sum to 1 in float64.
    values = logits.tolist()
    if not values:
        return []
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = math.fsum(exps) if len(exps) > 64 else sum(exps)
    return [e / total for e in exps]


def _l2_normalized(weights: np.ndarray) -> np.ndarray:
    norm = math.sqrt(float(weights @ weights))
    return weights * (1.0 / norm) if norm else weights


def _row_l2_scale(matrix) -> np.ndarray:
    """1 / the L2 norm of each row of a CSR matrix whose rows may repeat a column (the
    per-record path merges repeats first: the norm is taken after summing them)."""
    canonical = matrix.copy()
    canonical.sum_duplicates()
    squares = np.asarray(canonical.multiply(canonical).sum(axis=1), dtype=np.float64).ravel()
    scale = np.zeros_like(squares)
    np.divide(1.0, np.sqrt(squares), out=scale, where=squares > 0)
    return scale


def _put_rows(table: np.ndarray, keys: np.ndarray, values: np.ndarray) -> None:
    """``table[keys] = values`` for distinct row ids, through a rows-as-bytes view: ``put``
    on it is about twice as fast as fancy-index assignment."""
    row = np.dtype((np.void, table.shape[1] * table.itemsize))
    values = np.ascontiguousarray(values, dtype=table.dtype)
    table.view(row).ravel().put(keys, values.view(row).ravel())


def _cache_key(x):
    return dict(x) if isinstance(x, dict) else tuple(x)


class _Encoded(NamedTuple):
    """A batch as a sparse matrix: records × the batch's distinct buckets, entry weights (a
    mean's division included) as values."""

    distinct: np.ndarray  # the batch's distinct bucket ids, sorted
    matrix: object  # scipy.sparse.csr_matrix, shape (records, distinct.size)
    wide_scale: np.ndarray | None = None  # per record: 1 / L2 norm of its row (wide learners)


def _distinct(ids: np.ndarray, n_buckets: int):
    """(sorted distinct ids, each id's index in them as int32); ``np.unique(ids,
    return_inverse=True)`` at a fraction of the cost: one plain sort of (id, position) packed
    in an int64 instead of an argsort."""
    total = ids.size
    shift = max(total.bit_length(), 1)
    if int(n_buckets).bit_length() + shift < 63:
        keys = ids << shift
        keys |= np.arange(total, dtype=np.int64)
        keys.sort()
        order = keys & ((1 << shift) - 1)
        keys >>= shift
    else:
        order = np.argsort(ids, kind="stable")
        keys = ids[order]
    first = np.ones(total, dtype=bool)
    np.not_equal(keys[1:], keys[:-1], out=first[1:])
    inverse = np.empty(total, dtype=np.int32)
    inverse[order] = np.cumsum(first, dtype=np.int32) - 1
    return keys[first], inverse


def _batch_key(batch):
    """What identifies a batch for the predict → learn cache (copies: the caller may reuse
    its arrays or dicts)."""
    if isinstance(batch, BucketBatch):
        return BucketBatch(*(None if a is None else np.array(a) for a in (batch.ids, batch.offsets, batch.weights)))
    return [_cache_key(x) for x in batch]


def _same_batch(key, batch) -> bool:
    if isinstance(key, BucketBatch):
        return isinstance(batch, BucketBatch) and all(
            (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))
            for a, b in zip(
                (key.ids, key.offsets, key.weights), (batch.ids, batch.offsets, batch.weights), strict=True
            )
        )
    return (
        not isinstance(batch, BucketBatch) and len(key) == len(batch) and all(map(_same_input, key, batch))
    )


def _same_input(key, x) -> bool:
    return key == x if isinstance(x, dict) else key == tuple(x)


def _readonly(array):
    if array is None:
        return None
    view = array.view()
    view.flags.writeable = False
    return view


def _bucket_of(key, n_buckets: int) -> int:
    if isinstance(key, numbers.Integral) and not isinstance(key, bool):
        return int(key) % n_buckets
    return stable_bucket(str(key), n_buckets)


def _is_dataframe(X) -> bool:
    return hasattr(X, "to_dict") and hasattr(X, "columns")


def _rows_of(X) -> list[dict]:
    if _is_dataframe(X):
        # River hands DataFrames to mini-batch learners; a missing feature is NaN there.
        return [{k: v for k, v in row.items() if v == v} for row in X.to_dict(orient="records")]
    return X if isinstance(X, list) else list(X)


# --- fusion ---------------------------------------------------------------------------------------

_ARCHITECTURE = ("n_buckets", "dim", "hidden", "activation", "bag", "optimizer", "dtype", "wide")


def fuse(learners: Iterable, weights: Iterable[float] | None = None, *, n_seen: int | None = None):
    """Federated averaging: one learner whose parameters are the records-seen weighted mean.

    ``learners`` are :class:`NeuralClassifier` or pipelines ending in one (with equal
    featurizers). They must share the architecture; their class sets may differ: a class's
    output row is averaged over the learners that know it, weighted by their records. Optimizer
    statistics are averaged the same way. Fusing copies of one learner gives that learner back.

    ``weights``: what each learner weighs (default: the records it has seen, :attr:`n_seen`);
    a learner of weight 0, or that has learned nothing, is left out. ``n_seen``: the records
    the fused learner counts as seen (default: the sum of the weights). The learners given are
    not changed.
    """
    learners = list(learners)
    if not learners:
        raise ValueError("fuse needs at least one learner")
    weights = None if weights is None else [float(w) for w in weights]
    if weights is not None and len(weights) != len(learners):
        raise ValueError(f"fuse got {len(weights)} weights for {len(learners)} learners")
    if all(isinstance(m, compose.Pipeline) for m in learners):
        featurizers = [_split(m)[0] for m in learners]
        configs = [f.hashing_config() for f in featurizers]
        if any(c != configs[0] for c in configs):
            raise ValueError("cannot fuse learners with different hashing configurations")
        fused = fuse([_split(m)[1] for m in learners], weights, n_seen=n_seen)
        return compose.Pipeline(featurizers[0].clone(), fused)
    if not all(isinstance(m, NeuralClassifier) and not isinstance(m, compose.Pipeline) for m in learners):
        raise TypeError("fuse takes NeuralClassifier learners, or pipelines that all end in one")
    first = learners[0]
    for other in learners[1:]:
        for name in _ARCHITECTURE:
            if getattr(other, name) != getattr(first, name):
                raise ValueError(
                    f"cannot fuse learners with different {name}: "
                    f"{getattr(first, name)!r} != {getattr(other, name)!r}"
                )
    if weights is None:
        weights = [float(m.n_seen) for m in learners]
    pairs = [(m, w) for m, w in zip(learners, weights, strict=True) if w > 0 and hasattr(m, "_params")]
    trained = [m for m, _ in pairs]
    result = first.clone()
    if not trained:
        return result
    result._ensure_init()
    counts = np.array([w for _, w in pairs], dtype=np.float64)
    total = counts.sum()
    classes: list = []
    for m in trained:
        classes.extend(c for c in m._classes if c not in result._class_index and c not in classes)
    for label in classes:
        result._add_class(label)
    for name in result._params:
        arrays = [[m._params[name]] + m._slots[name] for m in trained]
        targets = [result._params[name]] + result._slots[name]
        for k, target in enumerate(targets):
            if name == "wide":
                # Class columns: averaged over the learners that know the class.
                num = np.zeros(target.shape)
                den = np.zeros((1, target.shape[1]))
                for m, count, group in zip(trained, counts, arrays, strict=True):
                    where = [result._class_index[c] for c in m._classes]
                    num[:, where] += count * group[k]
                    den[0, where] += count
                target[...] = num / den
            elif name == "out":
                # Class rows: averaged over the learners that know the class.
                num = np.zeros(target.shape)
                den = np.zeros((target.shape[0], 1))
                for m, count, group in zip(trained, counts, arrays, strict=True):
                    where = [result._class_index[c] for c in m._classes]
                    num[where] += count * group[k]
                    den[where] += count
                target[...] = num / den
            else:
                # Accumulate in float64: copies of one float32 table average back exactly.
                num = np.zeros(target.shape)
                for count, group in zip(counts, arrays, strict=True):
                    num += count * group[k]
                target[...] = num / total
    result._n_seen = int(total) if n_seen is None else int(n_seen)
    result._t = max(m._t for m in trained)
    return result


def _split(model):
    steps = list(model.steps.values())
    if len(steps) != 2 or not isinstance(steps[0], TextFeaturizer):
        raise TypeError("expected a pipeline TextFeaturizer | NeuralClassifier")
    if not isinstance(steps[1], NeuralClassifier):
        raise TypeError(f"the pipeline ends in {type(steps[1]).__name__}, not NeuralClassifier")
    return steps[0], steps[1]


def neural_step(model) -> NeuralClassifier:
    """The :class:`NeuralClassifier` of ``model`` (itself, or the last step of a pipeline)."""
    # River counts a pipeline as an instance of its last step's class: test for it first.
    if isinstance(model, compose.Pipeline):
        return _split(model)[1]
    if isinstance(model, NeuralClassifier):
        return model
    raise TypeError(f"expected a NeuralClassifier or a pipeline ending in one, not {type(model).__name__}")
