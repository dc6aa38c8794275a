"""Distillation step speed and memory: ours vs a naive loop, and the loss alone at two vocabulary sizes.

* step: SmolLM2-135M teacher -> its 50%-width student, same batch and sequence length. Ours: teacher in no-grad
  (bf16 on CUDA), fused chunked KL on final hidden states, AdamW (fused on CUDA), bf16 autocast on CUDA. Naive:
  HF forward of both models, full-logit ``F.kl_div`` in fp32, plain AdamW, fp32.
* loss: peak memory of forward+backward of our chunked KL vs a naive full-logit KL for the same hidden states
  at vocab 49,152 (SmolLM2's) and a synthetic 256,000.

    python benchmarks/kd_throughput.py --batch 4 --seq-len 256 --steps 3 --out benchmarks/results/kd_throughput_cpu.json

``--gradient-checkpointing`` adds a third step arm, ours with the student's decoder layers checkpointed
(``DistillConfig(gradient_checkpointing=True)``): less memory for some recomputation.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compress  # noqa: E402
from compress.distillation import DistillConfig, chunked_logit_loss  # noqa: E402
from compress.distillation.trainer import DistillModule  # noqa: E402
from compress.models import adapter_for  # noqa: E402

from _common import machine, peak_memory  # noqa: E402

H100_BF16_FLOPS = 989e12  # dense bf16 peak of an H100 SXM, for MFU


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def ours_step_fn(student, teacher, device, cfg: DistillConfig):
    adapter = adapter_for(student)
    module = DistillModule(student, adapter, cfg, {}, teacher.config.hidden_size)
    cuda = device.type == "cuda"
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5, fused=True)  # as compress.distill does
    if cfg.gradient_checkpointing:  # as compress.distill does it
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    t_base, t_head = teacher.get_submodule(adapter.base), teacher.lm_head.weight
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    if cfg.compile:
        module = torch.compile(module)

    def step(batch):
        with torch.no_grad(), autocast:
            t_final = t_base(input_ids=batch, use_cache=False).last_hidden_state
        with autocast:
            loss = module(batch, t_final, {}, t_head)[0]  # [loss, kd, ce, hidden]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)
    return step


def naive_step_fn(student, teacher, device):
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)

    def step(batch):
        with torch.no_grad():
            t_logits = teacher(input_ids=batch).logits.float()
        s_logits = student(input_ids=batch).logits.float()
        loss = F.kl_div(F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1), log_target=True,
                        reduction="batchmean") / batch.shape[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)
    return step


def time_steps(step, batch, steps, device):
    step(batch)  # warm-up (allocations, kernels, compile)
    sync(device)
    with peak_memory() as mem:
        t = time.perf_counter()
        for _ in range(steps):
            step(batch)
        sync(device)
        seconds = time.perf_counter() - t
    return seconds / steps, mem


def loss_memory(vocab: int, tokens: int, width: int, device, only: str | None = None) -> dict:
    out = {}
    for name in [only] if only else ("naive", "ours"):
        gc.collect()
        g = torch.Generator(device="cpu").manual_seed(0)
        h_s = torch.randn(tokens, width, generator=g).to(device).requires_grad_()
        w_s = (torch.randn(vocab, width, generator=g) * 0.02).to(device).requires_grad_()
        h_t, w_t = torch.randn(tokens, width, generator=g).to(device), (torch.randn(vocab, width, generator=g) * 0.02).to(device)
        with peak_memory() as mem:
            if name == "naive":
                s, t = (h_s @ w_s.t()).float(), (h_t @ w_t.t()).float()
                loss = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
            else:
                loss, _, _ = chunked_logit_loss(h_s, w_s, h_t, w_t, chunk_tokens=256)
            loss.backward()
        out[name] = {"loss": float(loss.detach()), **mem}
        del h_s, w_s, h_t, w_t, loss
    return out


def run_arm(arm: str, args) -> dict:
    """One measurement in this (fresh) process, so no allocator state carries over between arms."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    kind, _, rest = arm.partition(":")
    if kind == "loss":
        vocab, name = rest.split(":")
        return loss_memory(int(vocab), args.loss_tokens, 576, device, only=name)
    teacher, _ = compress.load_teacher("smollm2")
    student = copy.deepcopy(teacher)
    compress.prune(student, {"params": 0.5}, None, plugins=["magnitude"])
    params = compress.pruning.shape.count_params(student)
    teacher.to(device)
    student.to(device).train()
    batch = torch.randint(0, 49152, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    if rest == "naive":
        step = naive_step_fn(student, teacher, device)
    else:
        if device.type == "cuda":
            teacher.to(torch.bfloat16)
        step = ours_step_fn(student, teacher, device, DistillConfig(
            max_steps=1, compile=args.compile, chunk_tokens=args.chunk_tokens,
            gradient_checkpointing=rest == "ours-checkpointed"))
    seconds, mem = time_steps(step, batch, args.steps, device)
    tokens = args.batch * args.seq_len
    out = {"seconds_per_step": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
           "student_params": params, **mem}
    if device.type == "cuda":
        flops = 6 * params * tokens + 2 * compress.pruning.shape.count_params(teacher) * tokens
        out["mfu"] = round(flops / seconds / H100_BF16_FLOPS, 3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--loss-tokens", type=int, default=2048)
    p.add_argument("--chunk-tokens", type=int, default=256, help="token chunk of our fused loss in the step arm")
    p.add_argument("--gradient-checkpointing", action="store_true", help="also time ours with checkpointing")
    p.add_argument("--arm", default=None, help=argparse.SUPPRESS)  # internal: run one arm, print its JSON
    p.add_argument("--out", default="benchmarks/results/kd_throughput_cpu.json")
    args = p.parse_args()
    if args.arm:
        print("RESULT " + json.dumps(run_arm(args.arm, args)), flush=True)
        return
    results = {"machine": machine(), "date": str(date.today()), "args": vars(args), "loss_memory": {}, "step": {}}
    forwarded = [f"--batch={args.batch}", f"--seq-len={args.seq_len}", f"--steps={args.steps}",
                 f"--loss-tokens={args.loss_tokens}", f"--chunk-tokens={args.chunk_tokens}"]
    forwarded += ["--compile"] if args.compile else []
    arms = ["loss:49152:naive", "loss:49152:ours", "loss:256000:naive", "loss:256000:ours", "step:naive", "step:ours"]
    arms += ["step:ours-checkpointed"] if args.gradient_checkpointing else []
    for arm in arms:
        proc = subprocess.run([sys.executable, __file__, *forwarded, "--arm", arm], capture_output=True, text=True)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not lines:
            raise SystemExit(f"arm {arm} failed:\n{proc.stderr[-3000:]}")
        value = json.loads(lines[-1][7:])
        kind, _, rest = arm.partition(":")
        if kind == "loss":
            vocab, name = rest.split(":")
            results["loss_memory"].setdefault(vocab, {})[name] = value[name]
        else:
            results["step"][rest] = value
        print(arm, value, flush=True)
    step = results["step"]
    ratio = {}
    for ours in [k for k in step if k != "naive"]:
        ratio[f"throughput_{ours}_over_naive"] = round(step[ours]["tokens_per_s"] / step["naive"]["tokens_per_s"], 2)
        for key in ("peak_rss_extra_mib", "peak_cuda_extra_mib"):
            if key in step[ours]:
                ratio[f"{key}_{ours}_over_naive"] = round(step[ours][key] / max(step["naive"][key], 1e-9), 3)
    for vocab, arms in results["loss_memory"].items():
        for key in ("peak_rss_extra_mib", "peak_cuda_extra_mib"):
            if key in arms["ours"]:
                ratio[f"loss_{vocab}_{key}_ours_over_naive"] = round(arms["ours"][key] / max(arms["naive"][key], 1e-9), 3)
    results["ratio"] = ratio
    print(ratio, flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
