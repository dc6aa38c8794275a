"""The arguments of the pruning stage's public calls: the checks that run before any work, and the keywords that
were renamed.

:func:`check_prune_args` refuses every input of :func:`compress.prune` that can be judged without running the
model (the model's type, the strategy, the configs, precomputed importance, the form of ``plugins``); ``prune``
and :func:`compress.pruning.search.search_shapes` run it first, and a pipeline can run it before it loads weights.

:func:`resolve_keywords` takes a call's renamed keywords: the configs are ``calibration=`` and ``plan=`` in every
public call, as in :func:`compress.compress` (they were ``calibration_config=`` and ``plan_config=`` in ``prune``,
``score_importance``, ``search_shapes`` and ``reconstruct``), and the calibration data — once the ``calibration``
parameter of those calls — is ``data``. The old spellings keep working for one release, with a
:class:`DeprecationWarning` naming the new keyword.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..errors import ConfigError, warn
from .calibrate import Importance
from .config import CalibrationConfig, PlanConfig, check_config, check_strategy

#: Plugins as a call takes them: a name, a list of names, or a dict of name -> config (a Config, a dict of its
#: fields, or None).
PluginsArg = Mapping[str, Any] | Sequence[str] | None
#: Old keyword -> new keyword, for the calls that renamed their config keywords.
RENAMED = {"calibration_config": "calibration", "plan_config": "plan"}


class _Sentinel:
    """A default that says "not given" where None is a meaningful value."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


#: Default of the calibration data in ``prune``, ``score_importance``, ``search_shapes`` and ``reconstruct``: the
#: data is required (it may be None where a call allows it), but the old spelling ``calibration=<data>`` may give
#: it by keyword, so the parameter itself cannot be required. Left unset, it is a :class:`TypeError` as before.
REQUIRED: Any = _Sentinel("required")
#: The ``plan`` of :func:`resolve_keywords` for a call that takes no plan (``plan_config=`` is then unknown to it).
NO_PLAN: Any = _Sentinel("no plan")


def normalize_plugins(plugins: PluginsArg) -> dict[str, Any]:
    """``plugins`` as ``{name: config or None}``, refused with a :class:`ConfigError` when it is not a name, a
    list of names or a dict of name -> config, or names something other than a non-empty string."""
    if plugins is None:
        return {}
    if isinstance(plugins, str):
        return {plugins: None}
    if isinstance(plugins, Mapping):
        chosen = dict(plugins)
    elif isinstance(plugins, (list, tuple, set, frozenset)):
        chosen = {name: None for name in plugins}
    else:
        raise ConfigError(
            f"plugins should be a plugin name, a list of names or a dict of name -> config, got "
            f"{type(plugins).__name__} {plugins!r}"
        )
    bad = [name for name in chosen if not isinstance(name, str) or not name]
    if bad:
        raise ConfigError(f"plugin names should be non-empty strings, got {bad[0]!r} in plugins={plugins!r}")
    return chosen


def check_prune_args(
    model: Any,
    *,
    strategy: Any = "width",
    plugins: Any = None,
    calibration: Any = None,
    plan: Any = None,
    importance: Any = None,
    spelled: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Refuse, before any work, every input of :func:`compress.prune` that can be checked without running the
    model, in this order: ``model`` (an ``nn.Module``; a skeleton on the meta device will do), ``strategy`` (one
    of :data:`~compress.pruning.config.STRATEGIES`), ``calibration`` (a :class:`CalibrationConfig` or None),
    ``plan`` (a :class:`PlanConfig` or None), ``importance`` (an :class:`Importance` or None) and the form of
    ``plugins`` (see :func:`normalize_plugins`; whether the names are registered is checked when they are
    resolved). Each refusal is a :class:`ConfigError` naming the input; ``spelled`` maps an input to the keyword
    the caller used for it (``{"calibration": "calibration_config"}``), so the message names what was typed.

    Returns the plugins as ``{name: config or None}``.
    """
    names = {"calibration": "calibration", "plan": "plan", **(spelled or {})}
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model should be a torch.nn.Module (a Hugging Face causal LM), got "
            f"{type(model).__name__} {str(model)[:80]!r}; load one first, e.g. "
            "model, tok = compress.load_teacher(...)"
        )
    check_strategy(strategy)
    check_config(names["calibration"], calibration, CalibrationConfig)
    check_config(names["plan"], plan, PlanConfig)
    if importance is not None and not isinstance(importance, Importance):
        raise ConfigError(
            f"importance= should be a compress.Importance (from compress.score_importance), got "
            f"{type(importance).__name__}"
        )
    return normalize_plugins(plugins)


@dataclass
class Keywords:
    """A call's calibration data and configs once renamed keywords are resolved (:func:`resolve_keywords`).
    ``spelled``: input -> the old keyword the caller used for it, for messages (see :func:`check_prune_args`)."""

    data: Any
    calibration: Any
    plan: Any = None
    spelled: dict[str, str] = field(default_factory=dict)


def resolve_keywords(
    function: str, data: Any, calibration: Any, plan: Any = NO_PLAN, renamed: Mapping[str, Any] | None = None
) -> Keywords:
    """The calibration data and configs of a call to ``function`` that may use the old spellings.

    ``renamed`` holds the call's extra keywords: ``calibration_config`` and (for calls with a plan)
    ``plan_config`` are taken for ``calibration`` and ``plan`` with a :class:`DeprecationWarning`; any other is
    a :class:`TypeError`, as Python says it. ``calibration`` holding data rather than a config (a tensor, a
    :class:`~compress.pruning.calibrate.Calibration`, text) is the old keyword of the data: it is taken for
    ``data``, with a warning. Giving one input under both spellings is a :class:`ConfigError`; data left unset
    (:data:`REQUIRED`) is a :class:`TypeError`, as when it was a required argument.
    """
    renamed = dict(renamed or {})
    allowed = {old: new for old, new in RENAMED.items() if new == "calibration" or plan is not NO_PLAN}
    unknown = [key for key in renamed if key not in allowed]
    if unknown:
        raise TypeError(f"{function}() got an unexpected keyword argument {unknown[0]!r}")
    given = Keywords(data, calibration, None if plan is NO_PLAN else plan)
    if _is_data(calibration):
        if data is not REQUIRED:
            raise ConfigError(
                f"{function}() got calibration data twice: as data and as calibration= (its old keyword); pass it "
                "once, as data (calibration= now takes a compress.CalibrationConfig)"
            )
        warn(
            f"{function}(calibration=<data>) is deprecated: pass the calibration data as data= (or positionally); "
            "calibration= now takes the compress.CalibrationConfig",
            DeprecationWarning,
        )
        given.data, given.calibration = calibration, None
    if given.data is REQUIRED:
        raise TypeError(f"{function}() missing 1 required argument: 'data' (the calibration data, or None)")
    for old, value in renamed.items():
        new = allowed[old]
        if getattr(given, new) is not None:
            raise ConfigError(f"{function}() got both {new}= and {old}= (its old name); pass only {new}=")
        warn(
            f"{function}({old}=...) is deprecated and will be removed in the next release: use {new}=...",
            DeprecationWarning,
        )
        setattr(given, new, value)
        given.spelled[new] = old
    return given


def _is_data(value: Any) -> bool:
    """Whether ``calibration=`` holds calibration data (the old meaning) rather than a config or None: anything
    but None, a :class:`CalibrationConfig` and a dict (which is refused as a config, with the line that builds
    one)."""
    return value is not None and value is not REQUIRED and not isinstance(value, (CalibrationConfig, Mapping))
