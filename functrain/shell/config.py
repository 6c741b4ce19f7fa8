"""``TrainConfig``: what ``train(state, config)`` does, as one frozen dataclass.

Plain fields (numbers, strings, ``hparams``) load from a TOML or JSON file and from
``key=value`` command-line arguments; functions and loaders (``step``, ``data``,
``eval_step``, ``eval_data``) are set in Python. The *semantic* part of a config (the
data order, the seed, the score, the hyperparameters the user declares in ``hparams``)
is hashed and stored in the run folder; a resume whose semantic part changed is refused
with a diff. Everything else (``steps``/``epochs``, logging, checkpoint cadence) may
change between runs.

Example:
    >>> from functrain.shell.config import TrainConfig
    >>> config = TrainConfig.from_args(["steps=50", "lr=0.1"], steps=10, hparams={"lr": 0.01})
    >>> config.steps, config.hparams["lr"]
    (50, 0.1)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tomllib

__all__ = ["TrainConfig", "semantic", "semantic_hash", "semantic_diff", "to_plain", "OBJECT_FIELDS"]

OBJECT_FIELDS = ("step", "data", "eval_step", "eval_data")
"""Fields that hold functions or loaders: set in Python, never from a file or the command line."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How to run ``functrain.train``. Units of ``*_every`` are steps in step mode, epochs in epoch mode.

    Fields:
        steps / epochs: train until ``state.step == steps`` (step mode) or ``state.epoch == epochs``
            (epoch mode); exactly one of them.
        step: the train step, a pure ``(state, batch) -> state`` (compiled or not).
        data: a :class:`functrain.data.Loader` (its position lives in the state).
        eval_step, eval_data: an eval step and ``{split: loader or iterable of batches}``.
        eval_every: evaluate every this many steps (step mode) / epochs (epoch mode, default 1).
        score: ``(split, metric, mode)`` that selects the best result; ``mode`` is "min" or "max".
        patience: stop after this many evaluations without improvement of the score.
        checkpoint_dir: the run folder (checkpoints, results, logs); None keeps nothing on disk.
        checkpoint_every: save every this many steps / epochs (besides the final save).
        keep_last, keep_best, async_checkpoint: retention and background writing.
        resume: "auto" (resume when the run folder has a checkpoint, else start fresh), "never",
            or the path of a checkpoint file or folder.
        pretrained: a checkpoint whose params (EMA params when present) start a fresh run.
        log_every: log train scalars every this many steps.
        tensorboard, progress, heartbeat: TensorBoard events, a progress bar (only on a TTY), and
            a ``heartbeat.json`` rewritten at each log.
        seed: the run's seed (recorded; the state's key and the loader's seed are what act).
        hparams: the model/optimizer choices the user declares; semantic, settable as ``name=value``.
    """

    steps: int | None = None
    epochs: int | None = None
    step: Callable[..., Any] | None = None
    data: Any = None
    eval_step: Callable[..., Any] | None = None
    eval_data: Mapping[str, Any] | None = None
    eval_every: int | None = None
    score: tuple[str, str, str] | None = None
    patience: int | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int | None = None
    keep_last: int = 3
    keep_best: int = 1
    async_checkpoint: bool = False
    resume: str = "auto"
    pretrained: str | None = None
    log_every: int = 20
    tensorboard: bool = True
    progress: bool = True
    heartbeat: bool = False
    seed: int = 0
    hparams: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------ loading
    @classmethod
    def from_file(cls, path: str | Path, **defaults: Any) -> TrainConfig:
        """A config from a TOML or JSON file, on top of ``defaults``."""
        return _apply(cls(**defaults), _read_file(Path(path)), f"file {path}")

    @classmethod
    def from_args(cls, argv: Sequence[str], **defaults: Any) -> TrainConfig:
        """A config from ``key=value`` arguments (and ``config=file.toml``), on top of ``defaults``.

        Values are parsed by the field's type (``hparams`` entries by their default's type);
        a key that is neither a field nor an ``hparams`` entry is an error listing the valid keys.
        """
        config = cls(**defaults)
        for arg in argv:
            key, sep, text = arg.partition("=")
            key = key.strip().removeprefix("--")
            if not sep:
                raise ValueError(f"command-line argument {arg!r} is not key=value; for example steps=500")
            if key == "config":
                config = _apply(config, _read_file(Path(text)), f"file {text}")
            else:
                config = _apply(config, {key: text}, "the command line", parse_text=True)
        return config

    def to_dict(self) -> dict[str, Any]:
        """The plain fields as JSON-friendly values (what the run folder records)."""
        names = [f.name for f in dataclasses.fields(self) if f.name not in OBJECT_FIELDS]
        return {name: to_plain(getattr(self, name)) for name in names}


# ------------------------------------------------------------------ parsing
def _read_file(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist")
    if path.suffix == ".toml":
        return tomllib.loads(path.read_text())
    if path.suffix == ".json":
        return json.loads(path.read_text())
    raise ValueError(f"config file {path}: use a .toml or .json file")


def _valid_keys(config: TrainConfig) -> list[str]:
    return [f.name for f in dataclasses.fields(config) if f.name not in OBJECT_FIELDS] + sorted(config.hparams)


def _apply(config: TrainConfig, values: Mapping[str, Any], where: str, parse_text: bool = False) -> TrainConfig:
    hints = typing.get_type_hints(TrainConfig)
    fields: dict[str, Any] = {}
    hparams = dict(config.hparams)
    for key, value in values.items():
        if key in OBJECT_FIELDS:
            raise ValueError(f"{where}: {key!r} holds a function or a loader; set it in Python, not as text")
        if key == "hparams" and isinstance(value, Mapping):
            for k, v in value.items():
                hparams[k] = _parse(v, type(hparams[k]) if k in hparams else Any, f"hparams.{k}", parse_text)
        elif key in hints:
            fields[key] = _parse(value, hints[key], key, parse_text)
        elif key.removeprefix("hparams.") in hparams:
            k = key.removeprefix("hparams.")
            hparams[k] = _parse(value, type(hparams[k]), k, parse_text)
        else:
            raise KeyError(f"{where}: unknown config key {key!r}; valid keys: {', '.join(_valid_keys(config))}")
    return config.replace(**fields, hparams=hparams)


_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def _parse(value: Any, tp: Any, key: str, parse_text: bool) -> Any:
    """``value`` (text from the command line, or a TOML/JSON value) as type ``tp``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (parse_text and str(value).lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _parse(value, arg, key, parse_text)
            except (TypeError, ValueError) as e:
                errors.append(str(e))
        raise ValueError(f"config {key}={value!r}: not a valid {tp}")
    if tp is Any or tp is type(None):
        if parse_text and isinstance(value, str):
            try:
                return json.loads(value)
            except json.JSONDecodeError:
                return value
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in _TRUE | _FALSE:
            return str(value).lower() in _TRUE
        raise ValueError(f"config {key}={value!r}: expected true or false")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ValueError(f"config {key}={value!r}: expected a number, got a boolean")
        try:
            number = float(value) if tp is float else int(str(value)) if isinstance(value, str) else value
        except ValueError:
            raise ValueError(f"config {key}={value!r}: expected {tp.__name__}") from None
        if tp is int and (not isinstance(number, int) or isinstance(number, bool)):
            raise ValueError(f"config {key}={value!r}: expected an integer")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"config {key}={value!r}: expected a string")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = json.loads(value) if value.startswith("[") else [v.strip() for v in value.split(",")]
        return tuple(_parse(v, a, key, parse_text) for v, a in zip(value, args, strict=True))
    if origin in (Mapping, dict) or tp is dict:
        if isinstance(value, str):
            value = json.loads(value)
        if not isinstance(value, Mapping):
            raise ValueError(f"config {key}={value!r}: expected a table/dict")
        return dict(value)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ValueError(f"config {key}={value!r}: cannot read a value of type {tp}")


# --------------------------------------------------------------- semantics
def to_plain(value: Any) -> Any:
    """``value`` as JSON-friendly data (tuples become lists, unknown objects their repr)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return repr(value)


def semantic(config: TrainConfig) -> dict[str, Any]:
    """The part of a config that changes the math of a run (what a resume must not change).

    The seed, the score, the declared ``hparams``, and the train data's fingerprint
    (sample count, global batch size, shuffling, data seed, drop_last).
    """
    data = config.data.fingerprint() if hasattr(config.data, "fingerprint") else None
    return to_plain({"seed": config.seed, "score": config.score, "hparams": dict(config.hparams), "data": data})


def semantic_hash(sem: Mapping[str, Any]) -> str:
    """A SHA-256 hex digest of the semantic part (canonical JSON)."""
    return hashlib.sha256(json.dumps(sem, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: tree}


def semantic_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Readable lines ``key: old -> new`` where two semantic dicts differ."""
    a, b = _flatten(old), _flatten(new)
    missing = object()
    lines = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, missing), b.get(key, missing)
        if va != vb:
            show = lambda v: "(absent)" if v is missing else json.dumps(v)  # noqa: E731
            lines.append(f"  {key}: {show(va)} -> {show(vb)}")
    return lines
