"""Recipes: one validated description of a whole run, saved as YAML next to the student it produced.

A :class:`Recipe` is a tree of the configs every stage already takes (:class:`CalibrationConfig`,
:class:`PlanConfig`, :class:`SearchConfig`, :class:`DistillConfig`) plus the few settings that live nowhere
else (teacher, target, strategy, plugins, data files, export formats). It is the single place the defaults of a
run are written down: ``compress.compress(recipe)``, its keyword form, the ``compress`` command's flags and
``compress run recipe.yaml`` all start from these same defaults.

Every run writes ``recipe.yaml`` into its output folder (with the library version), so
``compress run OUT/recipe.yaml --out AGAIN`` replays it. Inputs that only existed in memory (a model object, a
list of documents) cannot be written down; the saved recipe lists them under ``inputs_in_memory`` and
``compress run`` refuses it, naming them.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .distillation.config import DistillConfig
from .errors import CompressError, ConfigError
from .exporters.formats import check_export_args
from .io import write_text_atomic
from .pruning.config import STRATEGIES, CalibrationConfig, PlanConfig, SearchConfig, Target
from .validate import check_int, check_teacher_source

RECIPE_FILE = "recipe.yaml"
# What the run prints and the report shows: each stage's greedy continuation of this prompt.
DEFAULT_PROMPT = "A Python list is"
# The parameter count targets are checked against before the teacher is known: large enough to accept any count.
_NO_TEACHER_YET = 10**18


@dataclass
class DataSettings:
    """Text files of a run. ``calibration``: importance scoring (default: the pydocs train split when it is
    there, else the installed packages' docstrings); ``evaluation``: held-out perplexity (never the calibration file);
    ``distillation``: distillation text (default: the calibration file after the tokens calibration used).
    ``eval_seq_len`` / ``eval_tokens``: window length and how much held-out text perplexity reads."""

    calibration: str | None = None
    evaluation: str | None = None
    distillation: str | None = None
    eval_seq_len: int = 512
    eval_tokens: int | None = 4096

    def __post_init__(self) -> None:
        for name in ("calibration", "evaluation", "distillation"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                setattr(self, name, os.fspath(value))
            elif value is not None and not isinstance(value, str):
                raise ConfigError(
                    f"recipe data.{name} should be a file path (or null for the default), got "
                    f"{type(value).__name__} {value!r}"
                )
        check_int("recipe data.eval_seq_len", self.eval_seq_len, 2)
        if self.eval_tokens is not None:
            check_int("recipe data.eval_tokens", self.eval_tokens, 1)


@dataclass
class ExportSettings:
    """What :func:`compress.export` writes: ``formats`` (``"auto"``: safetensors plus the fastest ONNX format
    that passes its checks; or a list of names) and ``quantize`` (``None`` or ``"int8"``)."""

    formats: list[str] | str = "auto"
    quantize: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.formats, (list, tuple)):
            self.formats = [str(f) for f in self.formats]
        elif not isinstance(self.formats, str):
            raise ConfigError(f"recipe export.formats should be 'auto' or a list of format names, got {self.formats!r}")
        try:
            check_export_args(self.formats, self.quantize)
        except ConfigError as exc:
            raise ConfigError(f"recipe export: {exc}") from exc


@dataclass
class Recipe:
    """A whole run: what to compress, to what, how, and what to write.

    ``teacher``: a model folder, a ``.gguf`` file, a hub id or ``"smollm2"`` (None only when the run got a model
    object). ``target``: ``{"params": 0.5}``, ``{"params": 70_000_000}`` or an explicit shape. ``strategy``:
    ``"width"``, ``"depth"`` or ``"width+depth"``. ``plugins``: plugin name -> config fields (or None).
    ``calibration``, ``plan``, ``search``, ``distill``: the stage configs (``search``/``distill`` None: the stage
    does not run). ``reconstruct``: a reconstruct plugin's name or ``{name: config}`` (None: no refit).
    ``data`` / ``export``: see :class:`DataSettings` / :class:`ExportSettings`. ``prompt``: each stage's greedy
    continuation of it (``sample_tokens`` new tokens) goes into the report and the command's output; None skips
    it. ``out_dir``: where the student goes. ``device``: ``"cpu"``, ``"cuda"``, ... (None: the best there is).

    Nested configs may be given as dicts of their fields; every field is checked at construction and a bad one
    raises :class:`~compress.errors.ConfigError` naming it (``distill.lr``, ``calibration.num_samples``, ...).
    """

    teacher: str | None = "smollm2"
    target: dict = field(default_factory=lambda: {"params": 0.5})
    strategy: str = "width"
    plugins: dict = field(default_factory=dict)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    search: SearchConfig | None = None
    reconstruct: str | dict | None = None
    distill: DistillConfig | None = None
    data: DataSettings = field(default_factory=DataSettings)
    export: ExportSettings = field(default_factory=ExportSettings)
    prompt: str | None = DEFAULT_PROMPT
    sample_tokens: int = 24
    out_dir: str = "compressed"
    device: str | None = None
    #: The library version that wrote this recipe (informational; replays run with the installed version).
    compress_version: str | None = None
    #: Inputs of the run that were objects in memory and are not in this file; such a recipe cannot be replayed.
    inputs_in_memory: list = field(default_factory=list)

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):  # nested configs given as dicts (from YAML or by hand) become their dataclasses
            cls = _dataclass_in(hints[f.name])
            value = getattr(self, f.name)
            if cls is not None and isinstance(value, Mapping):
                setattr(self, f.name, _build(cls, value, f.name))
            elif cls is not None and value is not None and not isinstance(value, cls):
                raise ConfigError(
                    f"recipe {f.name} should be a {cls.__name__} (or a dict of its fields"
                    f"{', or null' if f.default is None else ''}), got {type(value).__name__}"
                )
        if self.teacher is not None:
            check_teacher_source(self.teacher)
            self.teacher = os.fspath(self.teacher)
        # Keys and value types as the planner checks them (a budget's size against the teacher: once it loads).
        if isinstance(self.target, (int, float)) and not isinstance(self.target, bool):
            self.target = {"params": self.target}  # target: 0.5 is a parameter budget, as in compress()
        Target.parse(self.target, _NO_TEACHER_YET)
        if not isinstance(self.target, Mapping):
            raise ConfigError(f"recipe target should be a mapping such as {{params: 0.5}}, got {self.target!r}")
        self.target = dict(self.target)
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"recipe strategy should be one of {STRATEGIES}, got {self.strategy!r}")
        self.plugins = plugins_mapping(self.plugins)
        for name, config in self.plugins.items():  # unknown names and bad config fields: refused now
            default_plugin_config(name, config)
        if self.reconstruct is not None and not isinstance(self.reconstruct, (str, Mapping)):
            raise ConfigError(
                f"recipe reconstruct should be a reconstruct plugin's name (e.g. least_squares) or "
                f"{{name: config}}, got {self.reconstruct!r}"
            )
        if self.prompt is not None and (not isinstance(self.prompt, str) or not self.prompt.strip()):
            raise ConfigError(f"recipe prompt should be a non-empty string or null, got {self.prompt!r}")
        check_int("recipe sample_tokens", self.sample_tokens, 1)
        if isinstance(self.out_dir, os.PathLike):
            self.out_dir = os.fspath(self.out_dir)
        if not isinstance(self.out_dir, str) or not self.out_dir.strip():
            raise ConfigError(f"recipe out_dir should be a folder path, got {self.out_dir!r}")
        if self.device is not None and not isinstance(self.device, str):
            raise ConfigError(
                f"recipe device should be a string like cpu, cuda or cuda:1 (or null), got {self.device!r}"
            )
        if not isinstance(self.inputs_in_memory, list):
            raise ConfigError(f"recipe inputs_in_memory should be a list, got {self.inputs_in_memory!r}")

    # -- serialization -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain values (dicts, lists, strings, numbers), every field written out, defaults included: a saved
        recipe replays the same run even if a later version changes a default."""
        return plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True, width=110)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the recipe as YAML (to a temporary file in the same folder, then renamed into place)."""
        return write_text_atomic(path, self.to_yaml())

    @classmethod
    def from_dict(cls, data: Any) -> Recipe:
        """Build and check a recipe from plain values; unknown keys are refused with the known ones listed."""
        return _build(cls, data, "recipe")

    @classmethod
    def from_yaml(cls, text: str, *, source: str = "recipe") -> Recipe:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source} is not valid YAML: {' '.join(str(exc).split())}") from exc
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"{source} should be a YAML mapping of recipe fields (teacher:, target:, ...), got "
                f"{type(data).__name__}"
            )
        return _build(cls, data, "recipe")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Recipe:
        """Read a recipe file (``compress run``); a missing or unreadable file is a :class:`ConfigError` naming it."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read recipe {str(path)!r}: {exc}") from exc
        return cls.from_yaml(text, source=f"recipe {str(path)!r}")

    def replace(self, **changes: Any) -> Recipe:
        return dataclasses.replace(self, **changes)


def default_plugin_config(name: str, config: Any = None, kind: str | None = None) -> dict | None:
    """The full config fields of plugin ``name`` built with ``config`` (refused with a :class:`PluginError`
    or :class:`ConfigError` naming the field when the name or a field is wrong); None for a plugin without one."""
    from .registry import build_plugin, get_plugin

    cls = get_plugin(name, kind)
    built = getattr(build_plugin(name, cls.kind, config), "config", None)
    if dataclasses.is_dataclass(built) and not isinstance(built, type):
        return plain(dataclasses.asdict(built))
    return None


def plugins_mapping(plugins: Any) -> dict:
    """Plugins as ``{name: config fields or None}``: a name, a list of names or a mapping."""
    if plugins is None:
        return {}
    if isinstance(plugins, str):
        plugins = [plugins]
    if isinstance(plugins, (list, tuple)):
        plugins = {name: None for name in plugins}
    if not isinstance(plugins, Mapping):
        raise ConfigError(f"recipe plugins should be a mapping of plugin name -> config (or null), got {plugins!r}")
    out = {}
    for name, config in plugins.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"recipe plugin names should be non-empty strings, got {name!r}")
        if dataclasses.is_dataclass(config) and not isinstance(config, type):
            config = dataclasses.asdict(config)
        if config is not None and not isinstance(config, Mapping):
            raise ConfigError(f"recipe plugins.{name} should be a mapping of its config fields or null, got {config!r}")
        out[name] = dict(config) if config is not None else None
    return out


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass a field's type names (``X`` or ``X | None``), if any."""
    for candidate in (hint, *typing.get_args(hint)):
        if isinstance(candidate, type) and dataclasses.is_dataclass(candidate):
            return candidate
    return None


def _build(cls: type, data: Any, where: str) -> Any:
    """``cls(**data)`` with nested dataclasses built too; errors name the recipe key that caused them."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} should be a mapping of {cls.__name__}'s fields, got {type(data).__name__} {data!r}")
    known = {f.name: f for f in fields(cls) if f.init}
    unknown = [k for k in data if k not in known]
    if unknown:
        raise ConfigError(
            f"{where}: unknown field{'s' if len(unknown) > 1 else ''} {', '.join(map(str, unknown))}; "
            f"{cls.__name__} has {', '.join(known)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        sub = _dataclass_in(hints.get(key))
        kwargs[key] = _build(sub, value, f"{where}.{key}") if sub is not None and isinstance(value, Mapping) else value
    try:
        return cls(**kwargs)
    except CompressError as exc:
        if where == "recipe":
            raise
        raise ConfigError(f"{where}: {exc}") from exc
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def plain(value: Any) -> Any:
    """Tuples to lists and mappings to dicts, recursively (YAML's safe dumper writes only plain types)."""
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if type(value).__module__ == "numpy" and hasattr(value, "item"):  # numpy scalars: YAML writes plain numbers
        return value.item()
    return value
