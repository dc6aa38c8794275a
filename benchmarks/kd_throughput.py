"""Distillation step speed and memory: ours vs a naive loop, and the loss alone at two vocabulary sizes.

* step: SmolLM2-135M teacher -> its 50%-width student, same batch and sequence length. Ours: teacher in no-grad
  (bf16 on CUDA), fused chunked KL on final hidden states, AdamW (fused on CUDA), bf16 autocast on CUDA. Naive:
  HF forward of both models, full-logit ``F.kl_div`` in fp32, plain AdamW, fp32.
* loss: peak memory of forward+backward of our chunked KL vs a naive full-logit KL for the same hidden states
  at vocab 49,152 (SmolLM2's) and a synthetic 256,000.

    python benchmarks/kd_throughput.py --batch 4 --seq-len 256 --steps 4 --out benchmarks/results/kd_throughput.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compress  # noqa: E402
from compress.distill import DistillConfig, chunked_logit_loss  # noqa: E402
from compress.distill.trainer import DistillModule  # noqa: E402
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
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5, fused=cuda)
    t_base, t_head = teacher.get_submodule(adapter.base), teacher.lm_head.weight
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    if cfg.compile:
        module = torch.compile(module)

    def step(batch):
        with torch.no_grad(), autocast:
            t_final = t_base(input_ids=batch, use_cache=False).last_hidden_state
        with autocast:
            loss = module(batch, t_final, {}, t_head)["loss"]
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


def loss_memory(vocab: int, tokens: int, width: int, device) -> dict:
    out = {}
    for name in ("naive", "ours"):
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
                loss, _ = chunked_logit_loss(h_s, w_s, h_t, w_t, chunk_tokens=256)
            loss.backward()
        out[name] = {"loss": float(loss), **mem}
        del h_s, w_s, h_t, w_t, loss
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--loss-tokens", type=int, default=2048)
    p.add_argument("--out", default="benchmarks/results/kd_throughput.json")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    results = {"machine": machine(), "date": str(date.today()), "args": vars(args)}

    results["loss_memory"] = {str(v): loss_memory(v, args.loss_tokens, 576, device) for v in (49_152, 256_000)}
    print(json.dumps(results["loss_memory"], indent=1), flush=True)

    teacher, tok = compress.load_teacher("smollm2")
    student = copy.deepcopy(teacher)
    compress.prune(student, {"params": 0.5}, None, plugins=["magnitude"])
    params = compress.shape.count_params(student)
    teacher.to(device)
    batch = torch.randint(0, 49152, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    tokens = args.batch * args.seq_len
    arms = {}
    for name in ("naive", "ours"):
        s = copy.deepcopy(student).to(device).train()
        t = teacher if name == "naive" or device.type == "cpu" else copy.deepcopy(teacher).to(torch.bfloat16)
        step = naive_step_fn(s, t, device) if name == "naive" else ours_step_fn(
            s, t, device, DistillConfig(max_steps=1, compile=args.compile, chunk_tokens=1024))
        seconds, mem = time_steps(step, batch, args.steps, device)
        flops = 6 * params * tokens + 2 * compress.shape.count_params(teacher) * tokens
        arms[name] = {"seconds_per_step": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1), **mem}
        if device.type == "cuda":
            arms[name]["mfu"] = round(flops / seconds / H100_BF16_FLOPS, 3)
        print(name, arms[name], flush=True)
        del s, step
        gc.collect()
    arms["ratio"] = {"throughput_ours_over_naive": round(arms["ours"]["tokens_per_s"] / arms["naive"]["tokens_per_s"], 2)}
    for key in ("peak_rss_extra_mib", "peak_cuda_extra_mib"):
        if key in arms["ours"]:
            arms["ratio"][f"{key}_ours_over_naive"] = round(arms["ours"][key] / max(arms["naive"][key], 1e-9), 3)
    results["step"] = {"student_params": params, "batch": args.batch, "seq_len": args.seq_len, **arms}
    print(arms["ratio"], flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
