"""The example plugin package, installed by pip into a temporary folder, is found through its entry point and
prunes a model end to end: the same path a user's own package takes."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import compress
from compress import registry
from compress.errors import ConfigError

from conftest import tiny_model

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "compress-plugin-wanda"


@pytest.fixture
def installed_example(tmp_path, monkeypatch):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(EXAMPLE)],
        check=True,
    )
    monkeypatch.syspath_prepend(str(target))
    importlib.invalidate_caches()
    yield target
    registry.unregister_plugin("wanda")
    sys.modules.pop("compress_plugin_wanda", None)
    registry.load_entry_point_plugins(force=True)


def test_env_var_keeps_third_party_out(installed_example):
    registry.load_entry_point_plugins(allow="none", force=True)
    assert "wanda" not in {p.name for p in compress.list_plugins()}


def test_installed_plugin_prunes_end_to_end(installed_example, calib_ids, tmp_path):
    registry.load_entry_point_plugins(allow="compress-plugin-wanda", force=True)
    info = {p.name: p for p in compress.list_plugins()}["wanda"]
    assert info.source == "entry-point:compress-plugin-wanda" and info.kind == "importance"

    model = tiny_model("llama")
    report = compress.prune(model, {"params": 0.5}, calib_ids, plugins=["wanda"],
                            calibration_config=compress.CalibrationConfig(min_samples=4))
    assert report.importance == "wanda" and report.params_after <= 0.5 * report.params_before
    model.save_pretrained(tmp_path / "out")
    with pytest.raises(ConfigError, match="power"):
        compress.prune(tiny_model("llama"), {"params": 0.5}, calib_ids, plugins={"wanda": {"power": 0}})
    with pytest.raises(ConfigError, match="gives no 'layers' scores"):
        compress.prune(tiny_model("llama"), {"num_hidden_layers": 2}, calib_ids, strategy="depth",
                       plugins={"wanda": None, "depth": {"method": "block_influence"}},
                       calibration_config=compress.CalibrationConfig(min_samples=4))
