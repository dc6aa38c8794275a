"""Built-in reconstruct plugin ``least_squares``: after pruning, refit each layer's output projections (the
attention output projection and the MLP down-projection, as the family adapter names them) by ridge regression
so that the student's module outputs match the teacher's on the kept hidden channels.

Layer by layer, attention before MLP, on the student as already refit so far: the regression inputs are the
student's actual inputs to the projection, the targets the teacher's outputs of the corresponding module (student
layer ``i`` ↔ teacher layer ``kept["layers"][i]``) restricted to ``kept["hidden"]``, on the same tokens. The
ridge strength is chosen per module on held-out calibration windows, and a module whose best refit does worse
on them than its pruned weights keeps its pruned weights (it "backs off").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from compress.errors import ConfigError, DataError, UnsupportedModelError
from compress.models import DecoderAdapter
from compress.plugin_api import ReconstructPlugin
from compress.progress import bar
from compress.pruning.calibrate import Calibration
from compress.pruning.reconstruct import LayerStream, forward_context

MODULES = ("attention", "mlp")
_DTYPES = {"float64": torch.float64, "float32": torch.float32}


class _Stats:
    """Sums over tokens for a linear fit with intercept, ``a ↦ W a + b``: with ``x = [a, 1]``,
    ``G = Σ x xᵀ`` ((in+1)²), ``C = Σ x yᵀ`` ((in+1) × out) and ``Σ ‖y‖²`` (the token count is ``G[-1, -1]``)."""

    def __init__(self, n_in: int, n_out: int, dtype: torch.dtype, device: torch.device) -> None:
        self.n_in, self.n_out, self.dtype, self.device = n_in, n_out, dtype, device
        self.G = torch.zeros(n_in + 1, n_in + 1, dtype=dtype, device=device)
        self.C = torch.zeros(n_in + 1, n_out, dtype=dtype, device=device)
        self.yy = torch.zeros((), dtype=dtype, device=device)

    def add(self, a: torch.Tensor, y: torch.Tensor) -> None:
        """Add the tokens of inputs ``a`` (``... × in``) and targets ``y`` (``... × out``) to the sums."""
        a = a.reshape(-1, self.n_in).to(self.device, self.dtype)
        y = y.reshape(-1, self.n_out).to(self.device, self.dtype)
        x = torch.cat([a, torch.ones(a.shape[0], 1, dtype=self.dtype, device=self.device)], dim=1)
        self.G.addmm_(x.T, x)
        self.C.addmm_(x.T, y)
        self.yy += (y * y).sum()

    def to(self, device: torch.device) -> _Stats:
        """A float64 copy of the sums on ``device`` (where the solves run)."""
        out = _Stats.__new__(_Stats)
        out.n_in, out.n_out, out.dtype, out.device = self.n_in, self.n_out, torch.float64, device
        out.G, out.C, out.yy = (t.to(device, torch.float64) for t in (self.G, self.C, self.yy))
        return out

    @property
    def tokens(self) -> int:
        """How many tokens the sums hold."""
        return int(self.G[-1, -1].item())

    def error(self, w_aug: torch.Tensor) -> float:
        """``Σ ‖Wᵀ x − y‖²`` for the augmented ``w_aug = [Wᵀ; bᵀ]`` ((in+1) × out), from the sums alone."""
        return float(self.yy - 2 * (w_aug * self.C).sum() + (w_aug * (self.G @ w_aug)).sum())


def _ridge(fit: _Stats, lam: float, intercept: bool) -> torch.Tensor | None:
    """``[Wᵀ; bᵀ]`` minimizing ``Σ‖W a + b − y‖² + λ·s·‖W‖²`` (``s`` = mean of the diagonal of the (centered)
    Gram matrix; ``b`` unpenalized, zero without ``intercept``), or None when the system is singular."""
    n_in = fit.n_in
    G, C = fit.G[:n_in, :n_in], fit.C[:n_in]
    if intercept:
        n = fit.G[n_in, n_in]
        a_sum, y_sum = fit.G[:n_in, n_in], fit.C[n_in]
        G = G - torch.outer(a_sum, a_sum) / n
        C = C - torch.outer(a_sum, y_sum) / n
    scale = torch.diagonal(G).mean()
    M = G + (lam * scale) * torch.eye(n_in, dtype=G.dtype, device=G.device)
    L, info = torch.linalg.cholesky_ex(M)
    try:
        wt = torch.cholesky_solve(C, L) if int(info) == 0 else torch.linalg.solve(M, C)
    except RuntimeError:  # singular (torch.linalg.LinAlgError is a RuntimeError)
        return None
    if not bool(torch.isfinite(wt).all()):
        return None
    b = (y_sum - a_sum @ wt) / n if intercept else torch.zeros(C.shape[1], dtype=wt.dtype, device=wt.device)
    return torch.cat([wt, b[None]], dim=0)


class LeastSquaresReconstruct(ReconstructPlugin):
    """Ridge refit of the attention output projections and MLP down-projections onto the teacher's outputs.

    Per module, with ``A`` the student's inputs to the projection (``tokens × in``) and ``Y`` the teacher's
    outputs of the corresponding module on the kept hidden channels (``tokens × out``), on the fit windows:
    ``Wᵀ = (AᵀA + λ·s·I)⁻¹ AᵀY`` with ``s`` the mean of ``diag(AᵀA)`` (so ``λ`` is relative), solved by Cholesky
    in float64. Where the projection has a bias (some families), the statistics are centered and the intercept is
    written to the bias (FLAP-style bias compensation); a projection without one never gets one, so the student
    still loads with stock ``from_pretrained``.

    ``λ`` is chosen per module from ``lambdas`` by the squared error on the held-out windows (the last
    ``holdout_fraction`` of them, at least one), computed from held-out sums without a second pass:
    ``tr(YᵀY) − 2 tr(Wᵀ C_h) + tr(Wᵀ G_h W)``. When even the best is no better than the pruned weights' held-out
    error, the module keeps its weights ("backed off", said in the report).

    Sequential: layer by layer, attention before MLP, each module's statistics come from the student as refit so
    far. The decoder layers run one at a time over recorded residual streams
    (:class:`compress.pruning.reconstruct.LayerStream`): one forward of each model to record them, then about two
    layer passes of the teacher and three of the student per layer, stopped early after the module of interest.

    Memory: the statistics of one module at a time — fit and held-out each ``(in+1)² + (in+1)·out`` numbers in
    ``dtype`` (``in`` = the projection's input width, ``out`` = the kept hidden size) — plus the residual streams of
    both models over the windows used (``windows × seq_len × (hidden_teacher + hidden_student)`` in the models'
    dtype, on their devices) and one batch's activations at a time. ``max_windows`` caps the windows used.
    """

    name = "least_squares"

    @dataclass
    class Config:
        #: ridge strengths tried per module, relative to the mean diagonal of the Gram matrix
        lambdas: tuple = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
        #: share of the calibration windows held out to choose λ and guard against overfitting (the last ones)
        holdout_fraction: float = 0.25
        #: use at most this many calibration windows (None: all)
        max_windows: int | None = None
        #: which projections to refit: "attention", "mlp", "both", or a list of the first two
        modules: tuple = MODULES
        #: accumulation dtype of the statistics ("float64"; "float32" halves their memory; solves are float64)
        dtype: str = "float64"

        def __post_init__(self) -> None:
            lams = self.lambdas
            if isinstance(lams, (int, float)) and not isinstance(lams, bool):
                lams = (lams,)
            if not isinstance(lams, (list, tuple)) or not lams:
                raise ConfigError(
                    f"LeastSquaresReconstruct.lambdas should be a non-empty list of numbers >= 0, got {self.lambdas!r}"
                )
            for v in lams:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                    raise ConfigError(
                        f"LeastSquaresReconstruct.lambdas should hold finite numbers >= 0, got {v!r} "
                        f"in {self.lambdas!r}"
                    )
            self.lambdas = tuple(float(v) for v in lams)
            f = self.holdout_fraction
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f < 1:
                raise ConfigError(
                    f"LeastSquaresReconstruct.holdout_fraction should be a number strictly between 0 and 1, got {f!r}"
                )
            m = self.max_windows
            if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 2):
                raise ConfigError(
                    f"LeastSquaresReconstruct.max_windows should be None or an integer >= 2 (one "
                    f"window to fit, one to hold out), got {m!r}"
                )
            mods = self.modules
            if mods == "both":
                mods = MODULES
            elif isinstance(mods, str):
                mods = (mods,)
            if not isinstance(mods, (list, tuple)) or not mods or any(x not in MODULES for x in mods):
                raise ConfigError(
                    f"LeastSquaresReconstruct.modules should be 'attention', 'mlp', 'both' or a list "
                    f"of the first two, got {self.modules!r}"
                )
            self.modules = tuple(x for x in MODULES if x in mods)
            d = self.dtype
            if isinstance(d, torch.dtype):
                d = {v: k for k, v in _DTYPES.items()}.get(d, d)
            if d not in _DTYPES:
                raise ConfigError(f"LeastSquaresReconstruct.dtype should be 'float64' or 'float32', got {self.dtype!r}")
            self.dtype = d

    # -- checks, before any work -----------------------------------------------------------------------------
    def _projections(self, model: nn.Module, adapter: DecoderAdapter, what: str) -> list[dict[str, nn.Linear]]:
        """Per layer of ``model``, the configured output projections (``"attention"``, ``"mlp"``), refused
        where the adapter's path does not lead to an ``nn.Linear`` (``what``: how messages name the model)."""
        family = getattr(model.config, "model_type", type(model).__name__)
        out = []
        for i, layer in enumerate(adapter.decoder_layers(model)):
            mods = {}
            for kind, path in (("attention", adapter.o), ("mlp", adapter.down)):
                if kind not in self.config.modules:
                    continue
                try:
                    mod = layer.get_submodule(path)
                except AttributeError as exc:
                    raise UnsupportedModelError(
                        f"least_squares: the {family!r} adapter names {path!r} as the "
                        f"{kind} output projection, but {what} layer {i} has none"
                    ) from exc
                if not isinstance(mod, nn.Linear):
                    raise UnsupportedModelError(
                        f"least_squares refits nn.Linear output projections; {what} layer {i}'s {path} is a "
                        f"{type(mod).__name__} ({family!r}). Use modules=[...] without {kind!r}, or another "
                        "reconstruct plugin"
                    )
                mods[kind] = mod
            out.append(mods)
        return out

    def run(
        self, student: nn.Module, teacher: nn.Module, adapter: DecoderAdapter, calibration: Calibration, kept: dict
    ) -> dict:
        """Refit the configured projections of every student layer, in order (see the class docstring); return
        the per-module records, their totals and notes."""
        layer_map, hidden_idx, s_proj, t_proj = self._check(student, teacher, adapter, kept)
        device = next(student.parameters()).device
        dtype = _DTYPES[self.config.dtype]
        if device.type == "mps" and dtype == torch.float64:
            raise ConfigError(
                "LeastSquaresReconstruct.dtype='float64' is not available on Apple MPS; use dtype='float32'"
            )
        windows = _Windows.split(calibration, self.config)
        with forward_context(student, teacher):
            records = self._refit_layers(
                student, teacher, adapter, windows, layer_map, hidden_idx, (s_proj, t_proj), dtype, device
            )
        return _summary(records, windows, adapter)

    def _check(
        self, student: nn.Module, teacher: nn.Module, adapter: DecoderAdapter, kept: dict
    ) -> tuple[list[int], torch.Tensor, list[dict[str, nn.Linear]], list[dict[str, nn.Linear]]]:
        """The layer map and kept hidden channels, and the projections of both models, refused where ``kept``
        does not describe them (layers out of order, output widths that differ from the kept channels)."""
        layer_map = list(kept["layers"])
        if any(b <= a for a, b in zip(layer_map, layer_map[1:])):
            raise ConfigError(
                f"least_squares follows the teacher layer by layer and needs kept['layers'] in "
                f"increasing order, got {layer_map}"
            )
        hidden_idx = torch.tensor(kept["hidden"], dtype=torch.long)
        s_proj = self._projections(student, adapter, "the student's")
        t_proj = self._projections(teacher, adapter, "the teacher's")
        for i, t in enumerate(layer_map):
            for kind, mod in s_proj[i].items():
                t_mod = t_proj[t][kind]
                if mod.out_features != len(hidden_idx) or t_mod.out_features <= int(hidden_idx.max()):
                    raise ConfigError(
                        f"least_squares: student layer {i}'s {kind} projection writes "
                        f"{mod.out_features} channels and teacher layer {t}'s {t_mod.out_features}, "
                        f"but kept['hidden'] lists {len(hidden_idx)}; kept does not describe these "
                        "models"
                    )
        return layer_map, hidden_idx, s_proj, t_proj

    def _refit_layers(
        self,
        student: nn.Module,
        teacher: nn.Module,
        adapter: DecoderAdapter,
        windows: _Windows,
        layer_map: list[int],
        hidden_idx: torch.Tensor,
        projections: tuple[list[dict[str, nn.Linear]], list[dict[str, nn.Linear]]],
        dtype: torch.dtype,
        device: torch.device,
    ) -> list[dict]:
        """Layer by layer, attention before MLP: gather each module's fit and held-out statistics from the
        student's inputs and the teacher's outputs, then refit it (:meth:`_refit`). One record per module."""
        s_proj, t_proj = projections
        batches, is_held = windows.batches, windows.is_held
        records: list[dict] = []
        solve_device = torch.device("cpu") if device.type == "mps" else device
        t_stream = LayerStream(teacher, adapter, batches, upto=layer_map[-1])
        s_stream = LayerStream(student, adapter, batches)
        n_s = len(layer_map)
        for i in bar(range(n_s), desc="reconstructing", unit="layer"):
            t = layer_map[i]
            t_stream.advance_to(t)
            last = i == n_s - 1
            for kind in self.config.modules:
                s_mod, t_mod = s_proj[i][kind], t_proj[t][kind]
                stats = [_Stats(s_mod.in_features, len(hidden_idx), dtype, device) for _ in range(2)]
                # the teacher's MLP pass runs its whole layer, which advances its stream at the same time
                finish = kind == "mlp" and not last
                for b in range(len(batches)):
                    y, out = t_stream.run_until(b, t_mod, want="output", stop=not finish)
                    if finish:
                        assert out is not None  # stop=False: the layer ran to its end
                        t_stream.hidden[b] = out
                    a, _ = s_stream.run_until(b, s_mod, want="input", stop=True)
                    stats[is_held[b]].add(a, y.index_select(-1, hidden_idx.to(y.device)))
                if finish:
                    t_stream.position += 1
                record = self._refit(s_mod, stats[0].to(solve_device), stats[1].to(solve_device))
                path = adapter.o if kind == "attention" else adapter.down
                records.append(
                    {"layer": i, "teacher_layer": t, "module": kind, "path": f"{adapter.layers}.{i}.{path}", **record}
                )
                del stats
            if not last:
                s_stream.advance()
        del t_stream, s_stream
        return records

    def _refit(self, module: nn.Linear, fit: _Stats, held: _Stats) -> dict:
        """Choose λ on ``held``, then replace ``module``'s weight (and bias) unless that does worse than now."""
        intercept = module.bias is not None
        w0 = module.weight.detach().to(fit.G.device, torch.float64)
        b0 = (
            module.bias.detach().to(fit.G.device, torch.float64)
            if intercept
            else torch.zeros(w0.shape[0], dtype=torch.float64, device=fit.G.device)
        )
        current = torch.cat([w0.T, b0[None]], dim=0)
        yy = float(held.yy)
        err_before = held.error(current)
        errors: dict[float, float] = {}
        solutions: dict[float, torch.Tensor] = {}
        for lam in self.config.lambdas:
            w = _ridge(fit, lam, intercept)
            if w is not None:
                errors[lam], solutions[lam] = held.error(w), w
        rel = (lambda e: max(e, 0.0) / yy) if yy > 0 else (lambda e: 0.0)
        record = {
            "bias": intercept,
            "held_out_errors": {str(k): rel(v) for k, v in errors.items()},
            "held_out_rel_error_before": rel(err_before),
            "fit_tokens": fit.tokens,
            "held_out_tokens": held.tokens,
            "_err_before": max(err_before, 0.0),
            "_yy": yy,
        }
        best = min(errors, key=errors.__getitem__) if errors else None
        if best is None or not errors[best] < err_before:
            why = (
                "no λ gave a solution (the inputs carry no signal)"
                if best is None
                else f"the best λ={best:g} does worse on held-out windows ({rel(errors[best]):.4g}) than the current "
                f"weights ({rel(err_before):.4g})"
            )
            return {
                **record,
                "lambda": None,
                "held_out_rel_error_after": rel(err_before),
                "backed_off": True,
                "reason": why,
                "_err_after": max(err_before, 0.0),
            }
        w = solutions[best]
        module.weight = nn.Parameter(
            w[:-1].T.to(module.weight.device, module.weight.dtype).contiguous(),
            requires_grad=module.weight.requires_grad,
        )
        if intercept:
            module.bias = nn.Parameter(
                w[-1].to(module.bias.device, module.bias.dtype).contiguous(), requires_grad=module.bias.requires_grad
            )
        return {
            **record,
            "lambda": best,
            "held_out_rel_error_after": rel(errors[best]),
            "backed_off": False,
            "_err_after": max(errors[best], 0.0),
        }


@dataclass
class _Windows:
    """The calibration windows a refit uses, in batches: the fit windows first, then the held-out ones (the last
    ``holdout_fraction`` of them, at least one); ``is_held[b]`` says which batch ``b`` is."""

    batches: list[torch.Tensor]
    is_held: list[bool]
    fit: int
    held: int
    seq_len: int

    @classmethod
    def split(cls, calibration: Calibration, config: LeastSquaresReconstruct.Config) -> _Windows:
        """At most ``config.max_windows`` windows of ``calibration``, split; refused when fewer than two."""
        windows = calibration.input_ids
        if config.max_windows is not None:
            windows = windows[: config.max_windows]
        n = windows.shape[0]
        held = max(1, round(n * config.holdout_fraction))
        if n - held < 1:
            raise DataError(f"least_squares needs at least 2 calibration windows (one to fit, one held out), got {n}")
        bs = calibration.batch_size
        fit_batches, held_batches = list(windows[: n - held].split(bs)), list(windows[n - held :].split(bs))
        return cls(
            fit_batches + held_batches,
            [False] * len(fit_batches) + [True] * len(held_batches),
            n - held,
            held,
            windows.shape[1],
        )


def _summary(records: list[dict], windows: _Windows, adapter: DecoderAdapter) -> dict:
    """The plugin's report: the records (their private error sums removed), totals over them, and notes."""
    err_before = sum(r["_err_before"] for r in records)
    err_after = sum(r["_err_after"] for r in records)
    yy = sum(r["_yy"] for r in records)
    for r in records:
        for k in ("_err_before", "_err_after", "_yy"):
            r.pop(k)
    totals = {
        "modules": len(records),
        "refit": sum(not r["backed_off"] for r in records),
        "backed_off": sum(r["backed_off"] for r in records),
        "held_out_rel_error_before": err_before / yy if yy > 0 else 0.0,
        "held_out_rel_error_after": err_after / yy if yy > 0 else 0.0,
        "fit_windows": windows.fit,
        "held_out_windows": windows.held,
        "fit_tokens": windows.fit * windows.seq_len,
        "held_out_tokens": windows.held * windows.seq_len,
    }
    notes = []
    if adapter.residual_norms:
        notes.append(
            f"in this family the norms {list(adapter.residual_norms)} follow the projections; the refit "
            "matches the projections' outputs before them"
        )
    return {"modules": records, "totals": totals, "notes": notes}
