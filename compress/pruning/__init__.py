"""The pruning stage: calibrate, score importance, plan a shape, select and slice, refit, search.

Modules: :mod:`.config` (the stage's configs, leaf), :mod:`.calibrate` (token windows and the streamed, hooked
pass), :mod:`.shape` (a model's shape and exact parameter formula), :mod:`.plan` (target -> shape),
:mod:`.arguments` (the checks run before any work, renamed keywords), :mod:`.prune` (plugins, selection,
slicing), :mod:`.selection` (checks of scores, selections and kept indices), :mod:`.transaction` (put a model
back as it was if slicing fails), :mod:`.surgery` (in-place slicing of Linear/Embedding/norm modules),
:mod:`.reconstruct` (refit after pruning), :mod:`.search` (candidate shapes with short distillations),
:mod:`.generic` (the Torch-Pruning backend for families without an adapter).

This file imports nothing on purpose: adapters (:mod:`compress.models`) import :mod:`.surgery`, and a package
``__init__`` that imported the stage would make that a cycle. The public names are re-exported by ``compress``.
"""
