"""Where the student and the teacher live while training: one process, DDP replicas, or FSDP2 shards.

An :class:`Engine` owns the choices that differ between the three and nothing else, so the training loop in
``trainer.py`` is one piece of code:

* ``single`` — the caller's student trains in place on this process's device;
* ``ddp`` — the same, wrapped in ``DistributedDataParallel`` (gradients all-reduced, fp32);
* ``fsdp`` — a replica of the student is built on the meta device, sharded per decoder layer with
  ``torch.distributed.fsdp.fully_shard`` (bf16 compute, fp32 master weights and reductions on CUDA), filled
  from the caller's weights, trained, and gathered back into the caller's student at the end. The frozen
  teacher is sharded the same way when asked (or when it does not fit whole).

In every mode a student whose weights are bf16/fp16 trains on fp32 master weights and is handed back in its
own dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from ..models import DecoderAdapter
from . import checkpoint as ckpt

if TYPE_CHECKING:
    from torch.distributed.checkpoint.state_dict import ValueType
    from torch.distributed.fsdp import FSDPModule
    from transformers import PreTrainedModel

    from .trainer import DistillModule

MODES = ("single", "ddp", "fsdp")


def _meta_replica(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """An empty model of the same class and config on the meta device (no memory), for sharding."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        config = cast("PreTrainedModel", model).config
        return AutoModelForCausalLM.from_config(config, attn_implementation=config._attn_implementation, dtype=dtype)


def _copy_buffers(src: nn.Module, dst: nn.Module, device: torch.device) -> None:
    """Non-persistent buffers (rotary ``inv_freq``) are not in state dicts: copy them after ``to_empty``."""
    for name, buf in src.named_buffers():
        target = dst.get_buffer(name)
        target.copy_(buf.to(device=device, dtype=target.dtype))


class TeacherTrunk(nn.Module):
    """The teacher as one module: ``forward(ids)`` gives its final hidden states (the fused loss needs those and
    the LM-head weight, never the logits), ``forward(ids, labels)`` its LM loss (teacher correction).

    Under FSDP it is the teacher's root module: calling it gathers the embedding, final norm and LM head (they
    stay gathered: a frozen root is never re-sharded) while each decoder layer is gathered and freed in turn.
    """

    def __init__(self, model: nn.Module, adapter: DecoderAdapter):
        super().__init__()
        self.model = model
        self._base, self._head = adapter.base, adapter.lm_head

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is not None:
            return self.model(input_ids=input_ids, labels=labels, use_cache=False).loss
        return self.model.get_submodule(self._base)(input_ids=input_ids, use_cache=False).last_hidden_state

    def head_weight(self) -> torch.Tensor:
        """The LM head's weight; for a sharded teacher, valid after a forward call (the gathered tensor)."""
        return cast(torch.Tensor, self.model.get_submodule(self._head).weight)


def _checkpointing_on(model: nn.Module) -> None:
    """Activation checkpointing of every decoder layer (non-reentrant). transformers 5 renamed the method
    (``activation_checkpointing_enable``; the old name warns) and also hooks the input embeddings so that
    gradients reach the checkpointed layers."""
    m = cast(Any, model)
    if hasattr(m, "activation_checkpointing_enable"):
        m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:  # transformers 4.57
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _checkpointing_is_on(model: nn.Module) -> bool:
    """Whether the caller switched checkpointing on already (transformers 5 renamed the flag too)."""
    flag = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else None
    return bool(getattr(model, flag or "is_gradient_checkpointing", False))


def _checkpointing_off(model: nn.Module) -> None:
    """Undo :func:`_checkpointing_on`, including the input-embedding hook transformers 5 left behind (its
    ``activation_checkpointing_disable`` removes that hook only for PEFT models)."""
    m = cast(Any, model)
    if hasattr(m, "activation_checkpointing_disable"):
        m.activation_checkpointing_disable()
        if getattr(m, "_require_grads_hooks", None):
            m.disable_input_require_grads()
    else:
        m.gradient_checkpointing_disable()


class Engine:
    """One of :data:`MODES`, with the device, the process group size and the precision it trains in."""

    def __init__(
        self,
        mode: str,
        device: torch.device,
        world: int,
        use_bf16: bool,
        adapter: DecoderAdapter,
        gradient_checkpointing: bool = False,
        compile_layers: bool = False,
    ):
        if mode not in MODES:
            raise ValueError(f"unknown engine {mode!r}")
        self.mode, self.device, self.world, self.use_bf16 = mode, device, world, use_bf16
        self.adapter = adapter
        self.gradient_checkpointing, self.compile_layers = gradient_checkpointing, compile_layers
        self.mesh = None
        if mode == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh

            self.mesh = init_device_mesh(device.type, (world,))
        self.module: DistillModule | None = None
        self.wrapped: nn.Module | None = None
        self._caller_student: nn.Module | None = None
        self._enabled_checkpointing = False  # gradient checkpointing switched on by this run (to switch off)
        # (layer, its compiled call before this run)
        self._compiled: list[tuple[nn.Module, Callable[..., Any] | None]] = []
        self.optimizer_meta: dict = {}

    # --- precision ------------------------------------------------------------------------------------------

    def autocast(self):
        """bf16 autocast for the single/DDP engines (FSDP casts through its mixed-precision policy instead)."""
        if self.use_bf16 and self.mode != "fsdp":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _mp_policy(self):
        from torch.distributed.fsdp import MixedPrecisionPolicy

        if self.use_bf16:
            return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        return MixedPrecisionPolicy()

    def _shard(self, model: nn.Module, root: nn.Module) -> None:
        from torch.distributed.fsdp import fully_shard

        for layer in self.adapter.decoder_layers(model):
            fully_shard(layer, mesh=self.mesh, mp_policy=self._mp_policy())
        fully_shard(root, mesh=self.mesh, mp_policy=self._mp_policy())

    def _fill(
        self, root: nn.Module, full_state: dict[str, torch.Tensor], buffers_from: nn.Module, buffers_to: nn.Module
    ) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        root.to_empty(device=self.device)
        dtype = next(root.parameters()).dtype
        full_state = {k: v.detach().to(dtype) for k, v in full_state.items()}
        # (dict is invariant: a dict of tensors is a dict of the library's ValueType)
        set_model_state_dict(
            root, cast("dict[str, ValueType]", full_state), options=StateDictOptions(full_state_dict=True)
        )
        _copy_buffers(buffers_from, buffers_to, self.device)

    # --- student --------------------------------------------------------------------------------------------

    def place_student(self, student: nn.Module, make_module: Callable[[nn.Module], DistillModule]) -> nn.Module:
        """Return the module to train (student + projections + loss), wrapped for this engine.

        ``make_module(student)`` builds the ``DistillModule`` around a student. Its parameters' initial values
        come from ``module.initial_state()`` for everything that is not the student.
        """
        self._caller_student = student
        if self.mode == "fsdp":
            student.to("cpu")  # the caller's copy waits in host memory: the device holds only the shards
            replica = _meta_replica(student)
            self._prepare_layers(replica)
            module = make_module(replica)
            self._shard(replica, module)
            state = {f"student.{k}": v for k, v in student.state_dict().items()}
            state.update(module.initial_state())
            self._fill(module, state, student, replica)
            replica.train()
            self.module = self.wrapped = module
            return module
        if any(p.is_floating_point() and p.dtype != torch.float32 for p in student.parameters()):
            student.float()  # fp32 master weights; autocast computes in bf16 (the caller's dtypes come back)
        student.to(self.device)
        self._prepare_layers(student)
        module = make_module(student)
        self.module = module
        self.wrapped = module
        if self.mode == "ddp":
            self.wrapped = nn.parallel.DistributedDataParallel(
                module,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                gradient_as_bucket_view=True,
            )
        student.train()
        return self.wrapped

    def _prepare_layers(self, student: nn.Module) -> None:
        if self.gradient_checkpointing and not _checkpointing_is_on(student):
            _checkpointing_on(student)
            self._enabled_checkpointing = student is self._caller_student
        if self.compile_layers:
            for layer in self.adapter.decoder_layers(student):
                if student is self._caller_student:
                    self._compiled.append((layer, layer._compiled_call_impl))
                layer.compile()

    def no_sync(self, last_micro_batch: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of a step (DDP)."""
        if self.mode == "ddp" and not last_micro_batch:
            return cast(nn.parallel.DistributedDataParallel, self.wrapped).no_sync()  # place_student wrapped it
        if self.mode == "fsdp":
            cast("FSDPModule", self.module).set_requires_gradient_sync(last_micro_batch)  # sharded by _shard
        return nullcontext()

    def finish_student(self) -> None:
        """Hand the trained weights back to the caller's student (every rank calls this); the caller's dtypes,
        devices and flags are put back by its :class:`ModelBackup`."""
        assert self.module is not None and self._caller_student is not None  # set by place_student
        if self.mode == "fsdp":
            _gather_into(self.module.student, self._caller_student)
        self.undo_student_changes()
        self._caller_student.eval()

    def undo_student_changes(self) -> None:
        """Undo what this engine switched on in the caller's student: compiled layers (a later eager use must
        not recompile) and gradient checkpointing. Idempotent; safe on any error path."""
        for layer, before in self._compiled:
            layer._compiled_call_impl = before
        self._compiled = []
        if self._enabled_checkpointing and self._caller_student is not None:
            _checkpointing_off(self._caller_student)
            self._enabled_checkpointing = False

    # --- teacher --------------------------------------------------------------------------------------------

    def place_teacher(self, teacher: nn.Module, shard: bool, trained: bool = False) -> TeacherTrunk:
        """The teacher to run, as a :class:`TeacherTrunk`: around the caller's model (moved to the device), or
        around a sharded replica under FSDP — bf16 on CUDA unless it is to be trained first (teacher
        correction: fp32 master weights, bf16 compute). The caller's teacher then waits in host memory."""
        if shard:
            frozen_bf16 = self.use_bf16 and self.device.type == "cuda" and not trained
            teacher.to("cpu")
            replica = _meta_replica(teacher, torch.bfloat16 if frozen_bf16 else torch.float32)
            trunk = TeacherTrunk(replica, self.adapter_for_teacher(teacher))
            self._shard(replica, trunk)
            self._fill(trunk, {f"model.{k}": v for k, v in teacher.state_dict().items()}, teacher, replica)
            return trunk
        if trained and next(teacher.parameters()).dtype != torch.float32:
            teacher.float()  # teacher correction trains fp32 master weights (the run's end restores the dtype)
        teacher.to(self.device)
        return TeacherTrunk(teacher, self.adapter_for_teacher(teacher))

    @staticmethod
    def adapter_for_teacher(teacher: nn.Module) -> DecoderAdapter:
        from ..models import layout_for

        return layout_for(teacher)

    def teacher_trainer(self, trunk: TeacherTrunk) -> nn.Module:
        """What teacher correction calls: every rank must end with the same corrected teacher."""
        if self.world > 1 and not _is_sharded(trunk):
            return nn.parallel.DistributedDataParallel(
                trunk, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        return trunk

    def freeze_teacher(self, trunk: TeacherTrunk, backup: ModelBackup, corrected: bool = False) -> None:
        """Make the teacher ready for no-grad forward passes: bf16 weights on CUDA (the caller's weights are
        kept in host memory first — the corrected ones after teacher correction — and put back at the end)."""
        trunk.eval()
        if not _is_sharded(trunk) and self.use_bf16 and self.device.type == "cuda":
            if any(p.is_floating_point() and p.dtype != torch.bfloat16 for p in trunk.model.parameters()):
                backup.save_weights(again=corrected, for_cast=True)
            trunk.model.to(torch.bfloat16)

    # --- checkpoint tensors ---------------------------------------------------------------------------------

    def save_tensors(self, path, optimizer) -> None:
        assert self.module is not None  # set by place_student
        if self.mode == "fsdp":
            ckpt.save_sharded(path, self.module, optimizer)
        else:
            self.optimizer_meta = ckpt.save_replicated(path, self.module.student, self.module.projections, optimizer)

    def load_tensors(self, path, optimizer, optimizer_meta: dict | None) -> None:
        assert self.module is not None  # set by place_student
        if self.mode == "fsdp":
            ckpt.load_sharded(path, self.module, optimizer)
        else:
            ckpt.load_replicated(path, self.module.student, self.module.projections, optimizer, optimizer_meta)


class ModelBackup:
    """A model as the caller gave it, so that the end of a run — success or error — gives it back as it was.

    Recorded at once (no copy of any weight): every parameter's and buffer's device and dtype, the
    ``requires_grad`` flags, the gradients (detached from the model for the run, so that backward never adds
    into the caller's), and every submodule's train/eval mode. :meth:`save_weights` adds an exact host copy of
    the weights (a snapshot); :meth:`restore` puts back the first snapshot after an error (the weights as they
    came in), and after success only a snapshot taken because the run casts the weights (a teacher run in bf16:
    its exact weights come back; a trained student or a corrected teacher keeps what it learned).
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.params = {n: (p.device, p.dtype, p.requires_grad) for n, p in model.named_parameters()}
        self.buffers = {n: (b.device, b.dtype) for n, b in model.named_buffers()}
        self.grads = {n: p.grad for n, p in model.named_parameters()}
        self.modes = {n: m.training for n, m in model.named_modules()}
        self.snapshots: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []
        self.restore_on_success = False

    def detach_grads(self) -> None:
        for p in self.model.parameters():
            p.grad = None

    def save_weights(self, again: bool = False, for_cast: bool = False) -> None:
        """Keep a host copy of the current weights (unless one exists and ``again`` is False). ``for_cast``: the
        run is about to cast them, so success puts this copy back too."""
        self.restore_on_success |= for_cast
        if self.snapshots and not again:
            return
        with torch.no_grad():
            params = {
                n: p.detach().to("cpu", copy=True) for n, p in self.model.named_parameters() if p.device.type != "meta"
            }
            buffers = {
                n: b.detach().to("cpu", copy=True) for n, b in self.model.named_buffers() if b.device.type != "meta"
            }
        self.snapshots.append((params, buffers))

    def restore(self, error: bool) -> None:
        """Put back devices, dtypes, flags, gradients and modes, and the weights of a snapshot (see the class)."""
        snapshot: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] = ({}, {})
        if self.snapshots and (error or self.restore_on_success):
            snapshot = self.snapshots[0] if error else self.snapshots[-1]
        with torch.no_grad():
            for table, get, values in (
                (self.params, self.model.get_parameter, snapshot[0]),
                (self.buffers, self.model.get_buffer, snapshot[1]),
            ):
                for name, (device, dtype, *_rest) in table.items():
                    try:
                        t = get(name)
                    except AttributeError:
                        continue  # removed by someone else meanwhile: nothing to put back
                    value = values.get(name)
                    if t.device == device and t.dtype == dtype:
                        if value is not None:
                            t.data.copy_(value)
                    else:
                        t.data = (t.data if value is None else value).to(device=device, dtype=dtype)
            for name, (_device, _dtype, flag) in self.params.items():
                try:
                    p = self.model.get_parameter(name)
                except AttributeError:
                    continue
                p.requires_grad_(flag)
                p.grad = self.grads[name]
        for name, module in self.model.named_modules():
            if name in self.modes:
                module.training = self.modes[name]
        self.snapshots, self.restore_on_success = [], False


TeacherBackup = ModelBackup  # the former name


def _is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _gather_into(sharded: nn.Module, target: nn.Module) -> None:
    """Copy a sharded model's weights into a plain model of the same shape, one tensor at a time."""
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        for name, param in sharded.named_parameters():
            full = param.full_tensor() if isinstance(param, DTensor) else param
            dst = target.get_parameter(name)
            dst.copy_(full.to(device=dst.device, dtype=dst.dtype))


def gather_teacher(trunk: TeacherTrunk, teacher: nn.Module) -> None:
    """After teacher correction on a sharded replica, the caller's teacher receives the corrected weights."""
    _gather_into(trunk.model, teacher)
