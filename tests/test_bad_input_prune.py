"""Bad inputs to pruning, scoring, data and evaluation: each is refused with the right error type, a message that
names the input (value, path, plugin, list position), and leaves the model (weights, parameter objects,
requires_grad flags, train/eval mode, config, outputs) and the disk exactly as they were — also when a plugin
fails halfway through slicing the model."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import compress
from compress import data, registry
from compress.pruning.calibrate import Calibration
from compress.errors import ConfigError, DataError, PluginError, TargetError
from compress.pruning.surgery import top_k_sorted
from compress.plugins.axes import HiddenAxis
from compress.plugins.depth import DepthAxis

from conftest import SAMPLE_TEXT, VOCAB, tiny_model

CAL = compress.CalibrationConfig(min_samples=4)
PROBE = torch.arange(4, 20).view(2, 8)


# -- what "nothing changed" means --------------------------------------------------------------------------------

def _prepared(family: str = "llama", **overrides):
    """A tiny model in train mode with its embedding frozen: a restore must bring back modes and flags too."""
    model = tiny_model(family, **overrides).train()
    model.get_input_embeddings().weight.requires_grad_(False)
    return model


def _record(model) -> dict:
    with torch.no_grad():
        logits = model(input_ids=PROBE, use_cache=False).logits.clone()
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "params": {n: (id(p), p.requires_grad, p.device) for n, p in model.named_parameters()},
        "config": model.config.to_dict(),
        "training": [(n, m.training) for n, m in model.named_modules()],
        "logits": logits,
    }


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool(((a == b) | (a.isnan() & b.isnan())).all())


def _assert_unchanged(model, before: dict) -> None:
    after = _record(model)
    assert after["state"].keys() == before["state"].keys()
    changed = [k for k in before["state"] if not _same(before["state"][k], after["state"][k])]
    assert not changed, f"tensors changed: {changed[:5]}"
    assert after["params"] == before["params"]  # the same Parameter objects, flags and devices
    assert after["config"] == before["config"]
    assert after["training"] == before["training"]
    assert _same(after["logits"], before["logits"])


def _listing(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture
def register():
    """Register third-party plugins for one test, and unregister them afterwards."""
    names: list[str] = []

    def _register(cls):
        compress.register_plugin(cls)
        names.append(cls.name)
        return cls

    yield _register
    for name in names:
        registry.unregister_plugin(name)


# -- third-party plugins that misbehave ------------------------------------------------------------------------

def _mlp_keep(ctx, k: int) -> list[list[int]]:
    return [top_k_sorted(s, k).tolist() for s in ctx.importance.require("mlp", "test")]


class _MLPBase(compress.AxisPlugin):
    axis = "mlp"
    needs = ("mlp",)

    @dataclass
    class Config:
        pass

    def select(self, ctx):
        return {"keep": _mlp_keep(ctx, ctx.shape_after.intermediate_size)}

    def apply(self, model, adapter, selection):
        for layer, keep in zip(adapter.decoder_layers(model), selection["keep"]):
            adapter.slice_mlp(layer, torch.tensor(keep, dtype=torch.long))


class HalfApply(_MLPBase):
    """Slices half the layers, then fails."""
    name = "test-half-apply"

    def apply(self, model, adapter, selection):
        layers = adapter.decoder_layers(model)
        for layer, keep in list(zip(layers, selection["keep"]))[: len(layers) // 2]:
            adapter.slice_mlp(layer, torch.tensor(keep, dtype=torch.long))
        model.eval()  # and switches the mode on its way
        raise RuntimeError("disk full halfway through")


class WrongCount(_MLPBase):
    """Keeps one neuron more than the plan."""
    name = "test-wrong-count"
    applied = False

    def select(self, ctx):
        return {"keep": _mlp_keep(ctx, ctx.shape_after.intermediate_size + 1)}

    def apply(self, model, adapter, selection):
        WrongCount.applied = True
        super().apply(model, adapter, selection)


class Duplicates(_MLPBase):
    name = "test-duplicates"

    def select(self, ctx):
        keep = _mlp_keep(ctx, ctx.shape_after.intermediate_size)
        keep[2][1] = keep[2][0]
        return {"keep": keep}


class OutOfRange(_MLPBase):
    name = "test-out-of-range"

    def select(self, ctx):
        keep = _mlp_keep(ctx, ctx.shape_after.intermediate_size)
        keep[0][-1] = ctx.shape_before.intermediate_size  # one past the end
        return {"keep": keep}


class FloatIndices(_MLPBase):
    name = "test-float-indices"

    def select(self, ctx):
        return {"keep": [[float(i) for i in k] for k in _mlp_keep(ctx, ctx.shape_after.intermediate_size)]}


class NoKeep(_MLPBase):
    name = "test-no-keep"

    def select(self, ctx):
        return {"neurons": _mlp_keep(ctx, ctx.shape_after.intermediate_size)}


class SelectRefuses(_MLPBase):
    name = "test-select-refuses"

    def select(self, ctx):
        raise ConfigError("threshold 0.7 keeps no neuron")


class SloppyApply(_MLPBase):
    """Raises nothing, but slices one neuron fewer than it selected."""
    name = "test-sloppy-apply"

    def apply(self, model, adapter, selection):
        for layer, keep in zip(adapter.decoder_layers(model), selection["keep"]):
            adapter.slice_mlp(layer, torch.tensor(keep[:-1], dtype=torch.long))


class InPlace(_MLPBase):
    """Writes into the teacher's weights (which no restore can undo), then fails."""
    name = "test-in-place"

    def apply(self, model, adapter, selection):
        with torch.no_grad():
            adapter.decoder_layers(model)[0].get_submodule(adapter.up).weight.zero_()
        raise RuntimeError("gave up")


class ConvertsModel(_MLPBase):
    """Moves the model to float64, unfreezes everything and switches modes, then fails."""
    name = "test-converts-model"

    def apply(self, model, adapter, selection):
        model.to(torch.float64).eval()
        for p in model.parameters():
            p.requires_grad_(True)
        raise ValueError("not in float64, thanks")


class BadGroups(compress.AxisPlugin):
    """Keeps query heads of a KV group it removes."""
    name = "test-bad-groups"
    axis = "heads"
    needs = ("heads",)

    @dataclass
    class Config:
        pass

    def select(self, ctx):
        n = ctx.shape_before.num_hidden_layers
        return {"query_heads": [[0, 1, 3]] * n, "kv_heads": [[0]] * n}  # head 3 is in group 1 (3 heads a group)

    def apply(self, model, adapter, selection):
        raise AssertionError("never reached")


class HiddenThenFail(HiddenAxis):
    """The built-in hidden axis (slices embeddings, norms, every projection, fills Gemma's embed_scale in place),
    then a failure."""
    name = "test-hidden-then-fail"

    def apply(self, model, adapter, selection):
        super().apply(model, adapter, selection)
        raise RuntimeError("lost the device")


class DepthThenFail(DepthAxis):
    """The built-in depth axis (replaces the layer list, renumbers layer_idx, slices config.layer_types), then a
    failure."""
    name = "test-depth-then-fail"

    def apply(self, model, adapter, selection):
        super().apply(model, adapter, selection)
        raise KeyError("layer_map")


def _random_scores(model, adapter):
    return registry.build_plugin("random", "importance").score(model, adapter, None)


class _ScoresBase(compress.ImportancePlugin):
    needs_calibration = False

    @dataclass
    class Config:
        pass


class NaNScores(_ScoresBase):
    name = "test-nan-scores"

    def score(self, model, adapter, calibration):
        scores = _random_scores(model, adapter)
        scores.mlp[1, 5] = float("nan")
        return scores


class WrongShapeScores(_ScoresBase):
    name = "test-wrong-shape-scores"

    def score(self, model, adapter, calibration):
        scores = _random_scores(model, adapter)
        scores.mlp = scores.mlp[:, :-1]
        return scores


class IntScores(_ScoresBase):
    name = "test-int-scores"

    def score(self, model, adapter, calibration):
        scores = _random_scores(model, adapter)
        scores.mlp = (scores.mlp * 100).long()
        return scores


class RaisingScores(_ScoresBase):
    name = "test-raising-scores"

    def score(self, model, adapter, calibration):
        model.eval()
        raise RuntimeError("CUDA out of memory (simulated)")


class NotScores(_ScoresBase):
    name = "test-not-scores"

    def score(self, model, adapter, calibration):
        return {"mlp": _random_scores(model, adapter).mlp}


class FussyConfig(_ScoresBase):
    name = "test-fussy-config"

    @dataclass
    class Config:
        alpha: float = 1.0

        def __post_init__(self):
            if self.alpha > 1:
                raise ValueError("alpha above one")


# -- 1. transactional pruning ----------------------------------------------------------------------------------

def test_axis_that_fails_halfway_through_apply_leaves_the_model_whole(register, calib_ids):
    register(HalfApply)
    model = _prepared()
    before = _record(model)
    with pytest.raises(PluginError, match=r"axis plugin 'test-half-apply' failed in apply\(\): RuntimeError: disk "
                                          r"full halfway through.*Nothing was changed") as err:
        compress.prune(model, {"intermediate_size": 48}, calib_ids, plugins=["test-half-apply"],
                       calibration_config=CAL)
    assert isinstance(err.value.__cause__, RuntimeError)
    _assert_unchanged(model, before)
    assert model.training and model.model.layers[0].mlp.down_proj.in_features == 96
    compress.prune(model, {"intermediate_size": 48}, calib_ids, calibration_config=CAL)  # still prunable


def test_dtype_device_flags_and_modes_changed_by_a_failing_plugin_come_back(register, calib_ids):
    register(ConvertsModel)
    model = _prepared()
    before = _record(model)
    with pytest.raises(PluginError, match="'test-converts-model' failed in apply.*ValueError: not in float64"):
        compress.prune(model, {"intermediate_size": 48}, calib_ids, plugins=["test-converts-model"],
                       calibration_config=CAL)
    _assert_unchanged(model, before)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert not model.get_input_embeddings().weight.requires_grad and model.training


def test_a_successful_prune_keeps_no_teacher_weights_alive(calib_ids):
    """The undo snapshot holds the teacher's parameters only while pruning runs."""
    import weakref

    model = _prepared()
    old = weakref.ref(model.model.layers[0].mlp.up_proj.weight)
    compress.prune(model, {"intermediate_size": 48}, calib_ids, calibration_config=CAL)
    assert old() is None


@pytest.mark.parametrize("plugin, match", [
    (WrongCount, r"'test-wrong-count' keeps 49 MLP neurons in layer 0, but the plan keeps 48"),
    (Duplicates, r"'test-duplicates' keeps index \d+ of the MLP neurons in layer 2 more than once"),
    (OutOfRange, r"'test-out-of-range' selected MLP neurons in layer 0 with the index 96, out of range.*0\.\.95"),
    (FloatIndices, r"'test-float-indices' selected MLP neurons in layer 0 with the index \d+\.0 of type float"),
    (NoKeep, r"'test-no-keep' returned a selection without 'keep' \(keys: \['neurons'\]\)"),
])
def test_bad_selections_are_refused_before_anything_is_applied(plugin, match, register, calib_ids):
    register(plugin)
    WrongCount.applied = False
    model = _prepared()
    before = _record(model)
    with pytest.raises(PluginError, match=match):
        compress.prune(model, {"intermediate_size": 48}, calib_ids, plugins=[plugin.name], calibration_config=CAL)
    assert not WrongCount.applied
    _assert_unchanged(model, before)


def test_query_heads_outside_their_kept_groups_are_refused(register, calib_ids):
    register(BadGroups)
    model = _prepared()
    before = _record(model)
    with pytest.raises(PluginError, match=r"'test-bad-groups' keeps query head 3 in layer 0, whose KV group 1 it "
                                          "removes"):
        compress.prune(model, {"num_attention_heads": 3, "num_key_value_heads": 1}, calib_ids,
                       plugins=["test-bad-groups"], calibration_config=CAL)
    _assert_unchanged(model, before)


def test_compress_error_from_a_plugin_keeps_its_type_and_names_the_plugin(register, calib_ids):
    register(SelectRefuses)
    model = _prepared()
    before = _record(model)
    with pytest.raises(ConfigError, match=r"^axis plugin 'test-select-refuses': threshold 0\.7 keeps no neuron"):
        compress.prune(model, {"intermediate_size": 48}, calib_ids, plugins=["test-select-refuses"],
                       calibration_config=CAL)
    _assert_unchanged(model, before)


def test_apply_that_slices_other_than_it_selected_is_undone(register, calib_ids):
    register(SloppyApply)
    model = _prepared()
    before = _record(model)
    with pytest.raises(PluginError, match=r"after axis plugin 'test-sloppy-apply' applied its selection, layer 0's "
                                          r"mlp\.gate_proj has weight shape \(47, 96\), but the plan needs \(48, 96\)"):
        compress.prune(model, {"intermediate_size": 48}, calib_ids, plugins=["test-sloppy-apply"],
                       calibration_config=CAL)
    _assert_unchanged(model, before)


def test_weights_written_in_place_are_reported_not_hidden(register, calib_ids):
    register(InPlace)
    model = _prepared()
    with pytest.raises(PluginError, match=r"'test-in-place' failed in apply\(\).*could not be fully restored: "
                                          r"model\.layers\.0\.mlp\.up_proj\.weight.*reload the model"):
        compress.prune(model, {"intermediate_size": 48}, calib_ids, plugins=["test-in-place"],
                       calibration_config=CAL)
    assert model.model.layers[0].mlp.up_proj.weight.shape == (96, 96)  # the structure is back, the values are not


def test_hidden_axis_failing_after_slicing_restores_gemma_buffers_and_ties(register, calib_ids):
    register(HiddenThenFail)
    model = _prepared("gemma3_text")
    embed = model.get_input_embeddings()
    scale = embed.embed_scale.clone()
    before = _record(model)
    with pytest.raises(PluginError, match="'test-hidden-then-fail' failed in apply.*lost the device.*Nothing was"):
        compress.prune(model, {"hidden_size": 48}, calib_ids, plugins=["test-hidden-then-fail"],
                       calibration_config=CAL)
    _assert_unchanged(model, before)
    assert torch.equal(embed.embed_scale, scale) and model.lm_head.weight is embed.weight


def test_depth_axis_failing_after_slicing_restores_layers_and_config_lists(register, calib_ids):
    register(DepthThenFail)
    model = _prepared("gemma3_text")
    layers = list(model.model.layers)
    before = _record(model)
    with pytest.raises(PluginError, match="'test-depth-then-fail' failed in apply.*KeyError"):
        compress.prune(model, {"num_hidden_layers": 2}, calib_ids, strategy="depth",
                       plugins={"test-depth-then-fail": {"method": "block_influence"}}, calibration_config=CAL)
    _assert_unchanged(model, before)
    assert list(model.model.layers) == layers and len(model.config.layer_types) == 4
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2, 3]


# -- 2. importance scores checked ------------------------------------------------------------------------------

@pytest.mark.parametrize("plugin, match", [
    (NaNScores, r"importance plugin 'test-nan-scores' gave 'mlp' scores with 1 NaN/inf value\(s\) \(the first at "
                r"index \(1, 5\)"),
    (WrongShapeScores, r"importance plugin 'test-wrong-shape-scores' gave 'mlp' scores of shape \(4, 95\), but this "
                       r"model needs \(4, 96\)"),
    (IntScores, r"importance plugin 'test-int-scores' gave 'mlp' scores of dtype torch.int64"),
    (NotScores, r"importance plugin 'test-not-scores' should be a compress.Importance, got dict"),
])
def test_bad_scores_from_a_plugin_are_refused_before_selection(plugin, match, register):
    register(plugin)
    model = _prepared()
    before = _record(model)
    with pytest.raises(PluginError, match=match):
        compress.prune(model, {"intermediate_size": 48}, None, plugins=[plugin.name])
    _assert_unchanged(model, before)


def test_plain_exception_in_score_becomes_a_plugin_error(register, calib_ids):
    register(RaisingScores)
    model = _prepared()
    before = _record(model)
    with pytest.raises(PluginError, match=r"'test-raising-scores' failed in score\(\): RuntimeError: CUDA out of "
                                          "memory") as err:
        compress.prune(model, {"params": 0.5}, None, plugins=["test-raising-scores"])
    assert isinstance(err.value.__cause__, RuntimeError)
    _assert_unchanged(model, before)  # the plugin switched to eval mode; train mode is back
    with pytest.raises(PluginError, match="test-raising-scores"):
        compress.score_importance(model, None, plugin="test-raising-scores")
    _assert_unchanged(model, before)


@pytest.mark.parametrize("field, value, match", [
    ("mlp", float("nan"), r"precomputed importance \(from 'random'\) gave 'mlp' scores with 1 NaN/inf.*\(0, 3\)"),
    ("hidden", float("inf"), r"precomputed importance \(from 'random'\) gave 'hidden' scores with 1 NaN/inf.*index 3"),
])
def test_non_finite_precomputed_importance_is_refused(field, value, match):
    model = _prepared()
    scores = compress.score_importance(model, None, plugin="random")
    getattr(scores, field).view(-1)[3] = value
    before = _record(model)
    with pytest.raises(ConfigError, match=match):
        compress.prune(model, {"params": 0.5}, None, importance=scores)
    _assert_unchanged(model, before)


def test_plugin_config_error_names_the_plugin(register):
    register(FussyConfig)
    model = _prepared()
    before = _record(model)
    with pytest.raises(PluginError, match=r"plugin 'test-fussy-config' refused its config \(alpha=2\).*ValueError: "
                                          "alpha above one"):
        compress.prune(model, {"params": 0.5}, None, plugins={"test-fussy-config": {"alpha": 2}})
    _assert_unchanged(model, before)


# -- 3. non-finite weights -------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_teacher_with_non_finite_weights_is_refused(value, calib_ids):
    model = _prepared()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 7] = value
    before = _record(model)
    with pytest.raises(DataError, match=r"NaN or infinite weights in model\.layers\.1\.mlp\.up_proj\.weight"):
        compress.prune(model, {"params": 0.5}, calib_ids, calibration_config=CAL)
    _assert_unchanged(model, before)


# -- 4. targets ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target, match", [
    ({"params": 1.5}, r"params=1\.5 is neither a fraction nor a count: a fraction must be in \(0, 1\); a count must "
                      r"be an integer like 70_000_000"),
    (1.5, r"params=1\.5 is neither a fraction nor a count"),
    ({"params": float("nan")}, r"got nan: it must be a finite number"),
    ({"params": float("inf")}, r"got inf: it must be a finite number"),
    ({"params": True}, r"got True"),
    ({"params": "half"}, r"got 'half'"),
    ({"params": "0.5"}, r"got '0\.5' \(a string: write the number without quotes\)"),
    ({"hidden_size": "48"}, r"target hidden_size should be an integer, got '48'"),
    ({"num_hidden_layers": False}, r"target num_hidden_layers should be an integer, got False"),
])
def test_bad_target_values_are_named(target, match, calib_ids):
    model = _prepared()
    before = _record(model)
    with pytest.raises(TargetError, match=match):
        compress.prune(model, target, calib_ids, calibration_config=CAL)
    _assert_unchanged(model, before)


# -- 5. tokenizer and data -------------------------------------------------------------------------------------

def test_tokenizer_larger_than_the_embedding(tokenizer):
    model = _prepared(vocab_size=100)
    before = _record(model)
    with pytest.raises(DataError, match=rf"the tokenizer has {len(tokenizer)} tokens but the model's embedding has "
                                        "100 rows: they do not belong together"):
        compress.prune(model, {"params": 0.5}, SAMPLE_TEXT, tokenizer=tokenizer, calibration_config=CAL)
    _assert_unchanged(model, before)


def test_tokenizer_far_smaller_than_the_embedding(tokenizer):
    model = _prepared(vocab_size=4096)  # a real padded table is a few percent larger, never twice
    before = _record(model)
    with pytest.raises(DataError, match=rf"{len(tokenizer)} tokens but the model's embedding has 4096 rows, more "
                                        "than twice as many: they do not belong together"):
        compress.prune(model, {"params": 0.5}, SAMPLE_TEXT, tokenizer=tokenizer, calibration_config=CAL)
    with pytest.raises(DataError, match="more than twice as many"):
        compress.evaluate.perplexity(model, tokenizer, SAMPLE_TEXT, seq_len=32)
    _assert_unchanged(model, before)


class _TokenizerWithImageTokens:
    """300 regular tokens, but special tokens numbered past them (as multimodal tokenizers do)."""
    all_special_ids = [0, 1, 2, 350]
    added_tokens_decoder = {350: "<|image|>"}

    def __len__(self):
        return 300

    def convert_ids_to_tokens(self, token_id):
        return self.added_tokens_decoder[token_id]


def test_tokenizer_special_ids_beyond_the_embedding(calib_ids):
    model = _prepared()
    before = _record(model)
    with pytest.raises(DataError, match=rf"the tokenizer's special/added token '<\|image\|>' has id 350, but the "
                                        rf"model's embedding has only {VOCAB} rows"):
        compress.prune(model, {"params": 0.5}, SAMPLE_TEXT, tokenizer=_TokenizerWithImageTokens(),
                       calibration_config=CAL)
    _assert_unchanged(model, before)


def test_slightly_padded_embedding_is_accepted(tokenizer):
    model = tiny_model("llama", vocab_size=384)  # rounded up to a multiple of 128
    compress.validate.check_tokenizer_matches(model, tokenizer)


@pytest.mark.parametrize("make, match", [
    (lambda ids: ids.index_put((torch.tensor([3]), torch.tensor([5])), torch.tensor(-1)),
     rf"calibration token ids contain the negative id -1; ids must lie in 0\.\.{VOCAB - 1}"),
    (lambda ids: ids.index_put((torch.tensor([3]), torch.tensor([5])), torch.tensor(VOCAB + 7)),
     rf"calibration token ids contain the id {VOCAB + 7}, outside the model's vocabulary of {VOCAB}"),
    (lambda ids: ids.float(), r"calibration token ids should be an integer tensor.*got dtype torch.float32"),
    (lambda ids: ids.view(-1), r"calibration token ids should be a 2-D \[N, seq_len\] tensor, got shape \(512,\)"),
    (lambda ids: Calibration(ids.index_put((torch.tensor([0]), torch.tensor([0])), torch.tensor(-5))),
     r"negative id -5"),
])
def test_bad_token_ids(make, match, calib_ids):
    model = _prepared()
    before = _record(model)
    with pytest.raises(DataError, match=match):
        compress.prune(model, {"params": 0.5}, make(calib_ids), calibration_config=CAL)
    _assert_unchanged(model, before)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working directory holding a real train.txt, a folder, and binary files people pass by mistake."""
    (tmp_path / "train.txt").write_text(SAMPLE_TEXT)
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "part1.txt").write_text(SAMPLE_TEXT)
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + b"\x00" * 64)
    (tmp_path / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (tmp_path / "latin1.txt").write_bytes(("caf\xe9 cr\xe8me br\xfbl\xe9e " * 50).encode("latin-1"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("source, match", [
    ("train.tx", r"text file 'train\.tx' does not exist \(looked for in the working directory .*did you mean "
                 r"'train\.txt'.*to pass literal text, give a string with whitespace or a list of strings"),
    ("data/train.txt", r"text file 'data/train\.txt' does not exist.*its folder 'data' does not exist either"),
    ("corpus", r"'corpus' is a directory, not a text file; give a file inside it such as 'corpus/part1\.txt'"),
    ("model.safetensors", r"'model\.safetensors' looks like a binary file \(NUL bytes.*that is a weights file"),
    ("logo.png", r"'logo\.png' looks like a binary file \(NUL bytes in its first 8192 bytes\)"),
    ("latin1.txt", r"'latin1\.txt' is not UTF-8 text \(undecodable byte b'\\xe9' at offset 3\)"),
    ("https://example.com/train.txt", r"does not exist.*URLs are not downloaded"),
])
def test_bad_data_paths(source, match, workdir, tokenizer):
    model = _prepared()
    before, files = _record(model), _listing(workdir)
    with pytest.raises(DataError, match=match):
        compress.prune(model, {"params": 0.5}, source, tokenizer=tokenizer, calibration_config=CAL)
    with pytest.raises(DataError, match=match):
        data.check_source(source)  # the same refusal, without tokenizing anything
    _assert_unchanged(model, before)
    assert _listing(workdir) == files


@pytest.mark.parametrize("source, match", [
    (["one document. " * 50, "another. " * 50, 5], r"data\[2\] is int 5, not text"),
    (["a document. " * 50, None], r"data\[1\] is NoneType None, not text"),
    ([b"bytes, not text " * 5], r"data\[0\] is bytes b'bytes, not text.*decode bytes first"),
    ([{"text": "fine " * 50}, {"body": "no text"}], r"data\[1\] is a row without a string 'text' field \(its keys: "
                                                    r"\['body'\]\)"),
    (b"raw bytes " * 100, r"data given as bytes \(1000 bytes\); decode it to str"),
    ({"train": ["text " * 50]}, r"data given as a dict with keys \['train'\].*pick a split, e.g. data\['train'\]"),
    (12345, r"data should be a path, a string or a list of documents, got int 12345"),
])
def test_non_text_data(source, match, tokenizer):
    model = _prepared()
    before = _record(model)
    with pytest.raises(DataError, match=match):
        compress.prune(model, {"params": 0.5}, source, tokenizer=tokenizer, calibration_config=CAL)
    _assert_unchanged(model, before)


def test_literal_text_rule(workdir):
    """Text with whitespace is text, a list item is always text; a name without whitespace must exist."""
    assert list(data.iter_text(["data/train.txt"])) == ["data/train.txt"]
    assert list(data.iter_text("see data/train.txt for more")) == ["see data/train.txt for more"]
    assert "".join(data.iter_text("train.txt")) == SAMPLE_TEXT  # an existing file is read
    cjk = "日本語のテキストです。版本1.0"  # no whitespace, but no file extension either: text
    assert list(data.iter_text(cjk)) == [cjk]
    with pytest.raises(DataError, match="does not exist"):
        list(data.iter_text("valid.jsonl"))


@pytest.mark.parametrize("kwargs, match", [
    (dict(seq_len=0), r"seq_len should be an integer of at least 2.*got seq_len=0"),
    (dict(seq_len=1), r"got seq_len=1"),
    (dict(seq_len=32.0), r"got seq_len=32\.0"),
    (dict(max_tokens=-5), r"max_tokens should be a positive integer, or None.*got max_tokens=-5"),
    (dict(batch_size=0), r"batch_size should be a positive integer, got batch_size=0"),
])
def test_bad_evaluation_arguments(kwargs, match, tokenizer):
    model = _prepared()
    before = _record(model)
    with pytest.raises(ConfigError, match=match):
        compress.evaluate.perplexity(model, tokenizer, SAMPLE_TEXT, **kwargs)
    _assert_unchanged(model, before)


def test_evaluation_failure_restores_train_mode(tokenizer, workdir):
    model = _prepared()
    before = _record(model)
    with pytest.raises(DataError, match="'train.tx' does not exist"):
        compress.evaluate.perplexity(model, tokenizer, "train.tx", seq_len=32)
    _assert_unchanged(model, before)


# -- other arguments -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(plugins=5), r"plugins should be a plugin name, a list of names or a dict of name -> config, got int 5"),
    (dict(calibration_config={"seq_len": 16}), r"calibration_config should be a compress.CalibrationConfig.*got dict"),
    (dict(importance={"mlp": None}), r"importance= should be a compress.Importance.*got dict"),
    (dict(strategy=["width"]), r"strategy should be one of .*got \['width'\]"),
])
def test_bad_prune_arguments(kwargs, match, calib_ids):
    model = _prepared()
    before = _record(model)
    with pytest.raises(ConfigError, match=match):
        compress.prune(model, {"params": 0.5}, calib_ids, **kwargs)
    _assert_unchanged(model, before)


def test_non_finite_plan_weight_is_named():
    with pytest.raises(ConfigError, match=r"PlanConfig.weights\['mlp'\] should be a non-negative number, got nan"):
        compress.PlanConfig(weights={"mlp": float("nan"), "hidden": 32.0, "heads": 2.0, "depth": 8.0})
    with pytest.raises(ConfigError, match=r"CalibrationConfig.num_samples should be a positive integer, got True"):
        compress.CalibrationConfig(num_samples=True)


def test_a_path_instead_of_a_model(calib_ids):
    with pytest.raises(ConfigError, match=r"model should be a torch.nn.Module.*got str 'smollm2'.*load_teacher"):
        compress.prune("smollm2", {"params": 0.5}, calib_ids)


# -- 6. adapters -----------------------------------------------------------------------------------------------

def test_adapter_families_given_as_one_string_is_refused():
    families = compress.supported_families()
    model = tiny_model("olmo2")
    adapter = compress.models.adapter_for(model)
    with pytest.raises(ValueError, match=r"families.*'olmo2'"):
        compress.register_adapter(compress.DecoderAdapter(families="olmo2"), replace=True)
    assert compress.supported_families() == families and "o" not in families
    assert compress.models.adapter_for(model) is adapter


def test_a_mistyped_path_with_a_space_in_its_folder_is_not_read_as_text(tokenizer, tmp_path, monkeypatch):
    """'My Data/trian.txt' (a typo of an existing file in a folder with a space) must not be evaluated as 17
    characters of text: it names a file, which does not exist."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "My Data").mkdir()
    (tmp_path / "My Data" / "train.txt").write_text(SAMPLE_TEXT)
    model = tiny_model("llama")
    with pytest.raises(DataError, match=r"'My Data/trian.txt' does not exist.*did you mean.*My Data/train.txt"):
        compress.evaluate.perplexity(model, tokenizer, "My Data/trian.txt", seq_len=16)
    with pytest.raises(DataError, match=r"'My Data/trian.txt' does not exist"):
        compress.prune(model, {"intermediate_size": 48}, "My Data/trian.txt", tokenizer=tokenizer,
                       calibration_config=CAL)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["My Data", "train.txt"]


# -- one check of kept indices, worded for a plugin's selection and for reconstruct's kept ------------------------

@pytest.mark.parametrize("values, kind, value", [
    ({1, 2}, "container", {1, 2}), (torch.tensor([0.0, 1.0]), "container", None), ([0, 1, 2], "count", 3),
    ([0, 1.0], "element", 1.0), ([0, True], "element", True), ([0, 7], "range", 7), ([-1, 0], "range", -1),
    ([3, 3], "duplicate", 3),
])
def test_check_indices_names_the_first_problem(values, kind, value):
    from compress.pruning.selection import IndexProblem, check_indices

    with pytest.raises(IndexProblem) as info:
        check_indices(values, 2, 4)
    assert info.value.kind == kind
    if value is not None:
        assert info.value.value == value
    assert check_indices(torch.tensor([3, 0]), 2, 4) == [3, 0] and check_indices(range(2), 2, 4) == [0, 1]


def test_kept_indices_are_checked_alike_in_reconstruct():
    from compress.pruning.reconstruct import check_kept
    from compress.pruning.shape import ModelShape

    teacher = ModelShape(64, 96, 6, 2, 4, 16)
    student = teacher.replace(hidden_size=2)
    for hidden, match in [([0, 1, 2], r"kept\['hidden'\] lists 3 indices, but the student has 2"),
                          ([0, 0], r"kept\['hidden'\] lists an index more than once"),
                          ([0, 64], r"kept\['hidden'\] holds 64, out of range: the teacher has 64"),
                          ([0, 1.0], r"kept\['hidden'\] holds 1\.0 of type float"),
                          ("01", r"kept\['hidden'\] should be a list of integer indices, got str")]:
        with pytest.raises(ConfigError, match=match):
            check_kept({"hidden": hidden}, student, teacher)
    assert check_kept({"hidden": [5, 9]}, student, teacher) == {"layers": [0, 1, 2, 3], "hidden": [5, 9]}
