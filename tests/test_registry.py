from dataclasses import dataclass

import pytest

import compress
from compress import registry
from compress.errors import ConfigError, PluginError


def test_builtins_come_from_entry_points():
    plugins = {p.name: p for p in compress.list_plugins()}
    for name in ("activation", "magnitude", "random", "mlp", "heads", "hidden", "depth"):
        assert plugins[name].source == "builtin"
    assert plugins["activation"].kind == "importance" and plugins["depth"].kind == "axis"


def test_decorator_registers_and_duplicates_fail():
    @compress.register_plugin
    class Mine(compress.ImportancePlugin):
        name = "test-mine"

        @dataclass
        class Config:
            pass

    try:
        assert compress.get_plugin("test-mine") is Mine
        assert any(p.name == "test-mine" and p.source == "local" for p in compress.list_plugins())
        with pytest.raises(PluginError, match="already registered"):
            @compress.register_plugin
            class Other(compress.ImportancePlugin):
                name = "test-mine"

                @dataclass
                class Config:
                    pass
        with pytest.raises(PluginError, match="already registered"):
            @compress.register_plugin
            class Clash(compress.ImportancePlugin):
                name = "activation"

                @dataclass
                class Config:
                    pass
    finally:
        registry.unregister_plugin("test-mine")


def test_malformed_plugin_is_refused():
    class NoName(compress.ImportancePlugin):
        @dataclass
        class Config:
            pass

    with pytest.raises(PluginError, match="name"):
        compress.register_plugin(NoName)


def test_unknown_plugin_lists_choices():
    with pytest.raises(PluginError, match="unknown importance plugin 'nope'.*activation"):
        registry.get_plugin("nope", "importance")


def test_bad_config_names_field_and_value():
    with pytest.raises(ConfigError, match=r"seq_agg.*'median'"):
        registry.build_plugin("activation", "importance", {"seq_agg": "median"})
    with pytest.raises(ConfigError, match=r"method.*'middle'"):
        registry.build_plugin("depth", "axis", {"method": "middle"})
    with pytest.raises(PluginError, match="no config field"):
        registry.build_plugin("random", "importance", {"sed": 1})


def test_env_var_restricts_third_party(monkeypatch):
    assert registry._allowed_distributions("none") == set()
    assert registry._allowed_distributions("all") is None
    assert registry._allowed_distributions("compress_plugin_wanda, other") == {"compress-plugin-wanda", "other"}
    monkeypatch.setenv("COMPRESS_PLUGINS", "none")
    assert registry._allowed_distributions(None) == set()
