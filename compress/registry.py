"""One plugin registry for every kind of plugin, built-in or third-party.

A plugin is a class with a ``name``, a ``kind`` (``"importance"``, ``"axis"`` or ``"reconstruct"``) and a
``Config`` dataclass that validates itself in ``__post_init__``. Plugins arrive two ways, and both end in
:func:`register_plugin`:

* installed packages declare them in the ``compress.plugins`` entry-point group (the built-ins in ``plugins/``
  are declared there too, in this project's ``setup.cfg``), and
* code in the running process uses the :func:`register_plugin` decorator.

Model-family adapters (``compress.DecoderAdapter`` instances) travel the same entry-point group: an entry point
named after one of the adapter's families registers it, unless that family already has one.

Which third-party distributions are loaded can be restricted with the ``COMPRESS_PLUGINS`` environment variable
(``all`` — the default —, ``none``, or a comma-separated list of distribution names) or the ``allow`` argument
of :func:`load_entry_point_plugins`. Built-in plugins always load.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING, Any, cast

from .errors import PluginError

if TYPE_CHECKING:
    from .plugin_api import Plugin

ENTRY_POINT_GROUP = "compress.plugins"
DISTRIBUTION = "compress-llm"
ENV_ALLOW = "COMPRESS_PLUGINS"
KINDS = ("importance", "axis", "reconstruct")


@dataclass(frozen=True)
class PluginInfo:
    """What :func:`list_plugins` reports about one registered plugin."""

    name: str
    kind: str
    source: str  # "builtin", "entry-point:<distribution>" or "local"
    cls: type[Plugin]  # a Plugin subclass, or a class with the same name, kind and Config


_REGISTRY: dict[str, PluginInfo] = {}
_ENTRY_POINTS_LOADED = False
_ENTRY_POINT_HANDLERS: list[Callable[[str, Any, str], bool]] = []


def _validate_plugin_class(cls: Any) -> None:
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise PluginError(f"plugin class {cls!r} needs a non-empty string attribute `name`")
    kind = getattr(cls, "kind", None)
    if kind not in KINDS:
        raise PluginError(f"plugin {name!r}: `kind` should be one of {KINDS}, got {kind!r}")
    config = getattr(cls, "Config", None)
    if config is None or not dataclasses.is_dataclass(config):
        raise PluginError(f"plugin {name!r} needs a `Config` dataclass (it may have no fields)")


def register_plugin(cls: type | None = None, *, source: str = "local"):
    """Register a plugin class; usable as ``@register_plugin`` or ``register_plugin(cls)``.

    Registering a second plugin under a name already taken is an error, whatever the source.
    """

    def _register(plugin_cls: type) -> type:
        _validate_plugin_class(plugin_cls)
        checked = cast("type[Plugin]", plugin_cls)  # validated: it has a name, a kind and a Config, as a Plugin
        existing = _REGISTRY.get(checked.name)
        if existing is not None:
            if existing.cls is plugin_cls:
                return plugin_cls
            raise PluginError(
                f"a plugin named {checked.name!r} is already registered (from {existing.source}: "
                f"{existing.cls.__module__}.{existing.cls.__qualname__}); choose another name"
            )
        _REGISTRY[checked.name] = PluginInfo(checked.name, checked.kind, source, checked)
        return plugin_cls

    return _register(cls) if cls is not None else _register


def unregister_plugin(name: str) -> None:
    """Remove a plugin (mainly for tests and interactive sessions)."""
    _REGISTRY.pop(name, None)


def _allowed_distributions(allow: Iterable[str] | str | None) -> set[str] | None:
    """None means every distribution is allowed."""
    if allow is None:
        allow = os.environ.get(ENV_ALLOW, "all")
    if isinstance(allow, str):
        text = allow.strip().lower()
        if text in ("", "all", "*"):
            return None
        if text == "none":
            return set()
        allow = [part for part in text.split(",") if part.strip()]
    return {_normalize(a) for a in allow}


def _normalize(dist_name: str) -> str:
    return dist_name.strip().lower().replace("_", "-").replace(".", "-")


def load_entry_point_plugins(allow: Iterable[str] | str | None = None, *, force: bool = False) -> None:
    """Import and register every plugin declared in the ``compress.plugins`` entry-point group.

    ``allow`` restricts third-party distributions (see the module docstring); built-ins always load.
    Runs once per process unless ``force`` is given.
    """
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED and not force:
        return
    allowed = _allowed_distributions(allow)
    found = False
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = _normalize(ep.dist.name) if ep.dist is not None else "unknown"
        builtin = dist == DISTRIBUTION
        found = found or builtin
        if not builtin and allowed is not None and dist not in allowed:
            continue
        try:
            cls = ep.load()
        except Exception as exc:  # a broken third-party package must say which one it is
            raise PluginError(f"could not load plugin {ep.name!r} from {dist} ({ep.value}): {exc}") from exc
        if any(handler(ep.name, cls, dist) for handler in _ENTRY_POINT_HANDLERS):
            continue
        if getattr(cls, "name", None) != ep.name:
            raise PluginError(
                f"entry point {ep.name!r} of {dist} points at a plugin named {getattr(cls, 'name', None)!r}; "
                "the entry-point name and the plugin's `name` must match"
            )
        register_plugin(cls, source="builtin" if builtin else f"entry-point:{dist}")
    if not found:
        raise PluginError(
            f"no built-in plugins found in the {ENTRY_POINT_GROUP!r} entry-point group: the {DISTRIBUTION} "
            "distribution is not installed. Install it (`pip install -e .` in a checkout) rather than "
            "importing the source folder directly."
        )
    _ENTRY_POINTS_LOADED = True


def add_entry_point_handler(handler: Callable[[str, Any, str], bool]) -> None:
    """Let the module that owns a kind of entry-point object other than a plugin class (a model family's adapter)
    register it: ``handler(entry_point_name, obj, distribution)`` returns True when it took ``obj``. The owning
    module adds its handler when it is imported, which loading such an entry point does first; so the registry
    imports none of those modules."""
    if handler not in _ENTRY_POINT_HANDLERS:
        _ENTRY_POINT_HANDLERS.append(handler)


def get_plugin(name: str, kind: str | None = None) -> type[Plugin]:
    """Return the plugin class registered as ``name`` (loading entry points on first use)."""
    load_entry_point_plugins()
    info = _REGISTRY.get(name)
    if info is None or (kind is not None and info.kind != kind):
        choices = sorted(i.name for i in _REGISTRY.values() if kind is None or i.kind == kind)
        what = f"{kind} plugin" if kind else "plugin"
        raise PluginError(f"unknown {what} {name!r}; registered: {', '.join(choices) or 'none'}")
    return info.cls


def build_plugin(name: str, kind: str, config: Any = None) -> Any:
    """Instantiate plugin ``name`` with ``config`` (a Config instance, a dict of its fields, or None).

    A config the plugin refuses with a :class:`~compress.CompressError` keeps that error (it names the field);
    any other exception from the plugin's ``Config`` or constructor becomes a :class:`PluginError` naming the
    plugin, with the original as ``__cause__``.
    """
    if not isinstance(name, str):
        raise PluginError(f"plugin names are strings, got {type(name).__name__} {name!r}")
    cls = get_plugin(name, kind)
    if config is None:
        config = _construct(name, "Config()", cls.Config)
    elif isinstance(config, dict):
        fields = {f.name for f in dataclasses.fields(cls.Config)}
        unknown = sorted(set(config) - fields, key=repr)
        if unknown:
            raise PluginError(
                f"plugin {name!r} has no config field(s) {unknown}; its fields are {sorted(fields) or 'none'}"
            )
        config = _construct(name, "Config(...)", cls.Config, **config)
    elif not isinstance(config, cls.Config):
        raise PluginError(f"plugin {name!r} expects a {cls.Config.__qualname__} or dict, got {type(config).__name__}")
    return _construct(name, "constructor", cls, config)


def _construct(name: str, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    from .errors import CompressError

    try:
        return fn(*args, **kwargs)
    except CompressError:
        raise
    except Exception as exc:  # noqa: BLE001 - a third-party plugin's own error, said to be the plugin's
        shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise PluginError(
            f"plugin {name!r} refused its config{' (' + shown + ')' if shown else ''} in its {what}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def list_plugins(kind: str | None = None) -> list[PluginInfo]:
    """Every registered plugin (optionally of one kind), sorted by kind then name."""
    load_entry_point_plugins()
    return sorted((i for i in _REGISTRY.values() if kind is None or i.kind == kind), key=lambda i: (i.kind, i.name))
