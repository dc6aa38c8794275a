"""The stage functions and the subpackages behind them can both be imported (neither shadows the other)."""

import importlib
import inspect

import compress


def test_functions_and_modules_import_side_by_side():
    assert inspect.isfunction(compress.distill) and inspect.isfunction(compress.export)
    assert inspect.isfunction(compress.compress) and inspect.ismodule(compress.pruning.reconstruct)
    onnx = importlib.import_module("compress.exporters.onnx")
    trainer = importlib.import_module("compress.distillation.trainer")
    assert compress.exporters.onnx is onnx and compress.distillation.trainer is trainer
    assert compress.distillation.distill is compress.distill and compress.exporters.export is compress.export
    import compress.exporters.genai as genai  # the form that used to fail: `compress.export` was the function

    assert genai.__name__ == "compress.exporters.genai"
