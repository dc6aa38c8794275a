"""Deployment speed on CPU, every format side by side in one run: teacher vs ~50% students.

Models: the real teacher (SmolLM2-135M) and students pruned here from it to 50% of its parameters, one per
strategy (``width``: the planner's shape; ``depth``: the contiguous layer block the search removes; activation
importance, no training — hence their perplexities). Each model is exported once with ``compress.export`` (so
the export's own gates run: parity, tokenizer agreement, int8/int4 perplexity change) and then run in:

* ``optimum-fp32`` / ``optimum-int8``: the Optimum folders ``onnx/`` and ``onnx-int8/`` through the stock
  ``ORTModelForCausalLM.generate`` loop, as users run them;
* ``genai-fp32`` / ``genai-int8`` / ``genai-int4``: the onnxruntime-genai folders through its own C++
  generator loop (``onnxruntime_genai`` Model / GeneratorParams / Generator, greedy);
* ``gguf-f16`` / ``gguf-q8_0``: llama.cpp through its Python bindings (``llama_cpp``), only when those bindings
  import and ``compress.exporters.gguf.export_gguf`` exists; otherwise recorded as not runnable, with the reason.

For each model × format, at 1 thread and at all cores: prefill time of a 512-token prompt (pydocs valid) and
decode tokens/s of 128 greedy tokens, every one of them generated (no early stop), median of ``--runs`` runs.
The first new token comes from the prefill, so decode speed = 127 / (time of the 127 decode steps).

Bandwidth limit: single-thread memory read bandwidth is measured once (numpy sum over a 512 MiB float32
array); the weight bytes read per decoded token are the bytes of the weight initializers of the graph's
MatMul / MatMulNBits / Gemm nodes (followed through Transpose/Cast, e.g. a tied LM head; embedding Gather
tables excluded: a lookup reads one row) — for GGUF, all tensor bytes minus the token embedding. limit tok/s =
bandwidth / bytes; the 1-thread decode speed is reported as a fraction of it.

Perplexity (pydocs valid, first 4,096 tokens, 512-token windows): fp32 by PyTorch
(``compress.evaluate.perplexity``); Optimum fp32/int8 by onnxruntime and the genai int8/int4 figures, all
taken from the export report (the gates measured them).

The machine must be idle: the script refuses to start (exit code 3) unless the 1-minute load average is below
1.0, or ``--allow-busy`` is given (recorded in the JSON). Since others may start work during the run, each
measurement also records ``other_processes_cores``: the cores the rest of the machine kept busy meanwhile
(/proc/stat minus this process); the table marks a figure measured beside more than 0.2 such cores "busy".

    python benchmarks/deploy_latency.py --runs 3 --out benchmarks/results/deploy_latency_genai.json
    python benchmarks/deploy_latency.py --models teacher --formats genai-fp32 --runs 1 --prefill 64 --decode 16 \\
        --allow-busy --work-dir /tmp/dl   # quick check; --work-dir keeps (and reuses) the exports

The onnxruntime-genai formats of the teacher on each transformers line (its own builder release), back to back
in one session (BENCHMARKS.md, issue 21; the versions are recorded in the JSON):

    .venv/bin/python benchmarks/deploy_latency.py --models teacher --formats genai-fp32,genai-int8,genai-int4 \
        --runs 3 --allow-busy --work-dir /tmp/dl-0.15.2 --out benchmarks/results/deploy_latency_genai_0.15.2.json
    .venv5/bin/python benchmarks/deploy_latency.py --models teacher --formats genai-fp32,genai-int8,genai-int4 \
        --runs 3 --allow-busy --work-dir /tmp/dl-0.18.0 --out benchmarks/results/deploy_latency_genai_0.18.0.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compress  # noqa: E402
from compress.data import PYDOCS_TRAIN, PYDOCS_VALID  # noqa: E402
from compress.evaluate import perplexity  # noqa: E402
from compress.exporters.onnx import INT8_DIR, ONNX_DIR  # noqa: E402

from _common import machine  # noqa: E402

MODELS = ("teacher", "width", "depth")
FORMATS = ("optimum-fp32", "optimum-int8", "genai-fp32", "genai-int8", "genai-int4", "gguf-f16", "gguf-q8_0")
# benchmark format -> (compress.export format, folder in the export)
EXPORT_FOLDER = {"optimum-fp32": ("onnx", ONNX_DIR), "optimum-int8": ("onnx", INT8_DIR),
                 "genai-fp32": ("onnx-genai", "onnx-genai"), "genai-int8": ("onnx-genai-int8", "onnx-genai-int8"),
                 "genai-int4": ("onnx-genai-int4", "onnx-genai-int4")}
GGUF_TYPES = {"gguf-f16": "f16", "gguf-q8_0": "q8_0"}
FP32_OF = {"optimum-int8": "optimum-fp32", "genai-int8": "genai-fp32", "genai-int4": "genai-fp32",
           "gguf-q8_0": "gguf-f16"}
GOALS = {"student_fp32_decode_vs_teacher": 1.8, "int8_student_vs_fp32_teacher": 3.0, "int8_ppl_change": 0.03,
         "int4_ppl_change": 0.08}


# --- machine -----------------------------------------------------------------------------------------------------


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def busy_cpu_seconds() -> float:
    """CPU seconds all processes of the machine have spent busy since boot (/proc/stat, every core)."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def memory_bandwidth(mib: int = 512, repeats: int = 7) -> dict:
    """Single-thread memory bandwidth, GB/s: read (numpy sum) and copy (read + write) of a ``mib`` MiB array."""
    a = np.ones(mib * 2**20 // 4, dtype=np.float32)
    b = np.empty_like(a)
    read, copy_ = [], []
    a.sum(), np.copyto(b, a)  # touch every page first
    for _ in range(repeats):
        t = time.perf_counter()
        a.sum()
        read.append(a.nbytes / (time.perf_counter() - t) / 1e9)
        t = time.perf_counter()
        np.copyto(b, a)
        copy_.append(2 * a.nbytes / (time.perf_counter() - t) / 1e9)
    return {"array_mib": mib, "repeats": repeats, "read_gb_s_best": round(max(read), 2),
            "read_gb_s_median": round(statistics.median(read), 2), "copy_gb_s_best": round(max(copy_), 2),
            "copy_gb_s_median": round(statistics.median(copy_), 2),
            "method": "numpy float32 sum (read) and np.copyto (read+write counted), one thread"}


# --- weight bytes per decoded token ------------------------------------------------------------------------------


def onnx_weight_bytes(onnx_file: Path) -> dict:
    """Bytes of the weight initializers the MatMul/MatMulNBits/Gemm nodes read (through Transpose/Cast/Identity
    of an initializer, e.g. a tied LM head); Gather tables (embedding lookups) are not counted."""
    import onnx
    from onnx import helper

    model = onnx.load(str(onnx_file), load_external_data=False)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}

    def nbytes(t) -> int:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        return int(np.prod(t.dims, dtype=np.int64)) * itemsize if t.dims else itemsize

    def source(name: str, depth: int = 0) -> str | None:
        if name in inits:
            return name
        node = producer.get(name)
        if node is not None and depth < 3 and node.op_type in ("Transpose", "Cast", "Identity") and node.input:
            return source(node.input[0], depth + 1)
        return None

    used: set[str] = set()
    nodes = 0
    for node in graph.node:
        if node.op_type not in ("MatMul", "MatMulNBits", "Gemm", "MatMulInteger", "FusedMatMul"):
            continue
        found = {s for s in (source(i) for i in node.input[1:] if i) if s is not None}
        nodes += bool(found)
        used |= found
    total = sum(nbytes(inits[n]) for n in used)
    return {"weight_bytes_per_token": total, "weight_nodes": nodes, "weight_tensors": len(used)}


def gguf_weight_bytes(gguf_file: Path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_file))
    total = sum(int(t.n_bytes) for t in reader.tensors)
    embed = sum(int(t.n_bytes) for t in reader.tensors if t.name == "token_embd.weight")
    # llama.cpp ties the output to token_embd when no output.weight exists: the LM head then reads that table.
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    return {"weight_bytes_per_token": total - (0 if tied else embed), "tensor_bytes": total,
            "token_embd_bytes": embed, "tied_output": tied}


# --- runners -----------------------------------------------------------------------------------------------------


def median_result(prefill: list[float], decode: list[float], new_tokens: int, cpu: list[float]) -> dict:
    p, d = statistics.median(prefill), statistics.median(decode)
    return {"prefill_s": round(p, 4), "decode_s": round(d, 4),
            "decode_tokens_per_s": round((new_tokens - 1) / max(d, 1e-9), 2),
            "prefill_runs_s": [round(x, 4) for x in prefill], "decode_runs_s": [round(x, 4) for x in decode],
            "decode_cpu_per_wall": round(statistics.median(cpu), 2)}


def run_optimum(folder: Path, threads: int, prompt: torch.Tensor, new_tokens: int, runs: int) -> dict:
    """Stock ``ORTModelForCausalLM``: prefill (one forward pass) and ``generate`` of ``new_tokens`` greedy tokens."""
    import onnxruntime as ort
    from optimum.onnxruntime import ORTModelForCausalLM

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    torch.set_num_threads(threads)  # the generate loop's own tensor ops
    model = ORTModelForCausalLM.from_pretrained(str(folder), provider="CPUExecutionProvider", session_options=so)
    mask = torch.ones_like(prompt)
    kwargs = dict(attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  pad_token_id=0)
    model(input_ids=prompt, attention_mask=mask)  # warm-up
    model.generate(input_ids=prompt, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})
    prefill, decode, cpu = [], [], []
    for _ in range(runs):
        t = time.perf_counter()
        model(input_ids=prompt, attention_mask=mask)
        prefill.append(time.perf_counter() - t)
        t, c = time.perf_counter(), time.process_time()
        out = model.generate(input_ids=prompt, **kwargs)
        wall, cpu_s = time.perf_counter() - t, time.process_time() - c
        if out.shape[1] != prompt.shape[1] + new_tokens:
            raise RuntimeError(f"generate returned {out.shape[1] - prompt.shape[1]} tokens, not {new_tokens}")
        decode.append(max(wall - prefill[-1], 1e-9))  # generate = prefill + the decode steps
        cpu.append(cpu_s / wall)
    del model
    return median_result(prefill, decode, new_tokens, cpu)


def run_genai(folder: Path, threads: int, prompt: list[int], new_tokens: int, runs: int) -> dict:
    """onnxruntime-genai's generator: ``append_tokens`` (the prefill) then ``generate_next_token`` until
    ``new_tokens`` greedy tokens exist (``min_length`` = ``max_length``: no early stop on the end token)."""
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    config.clear_providers()  # the CPU
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    model = og.Model(config)
    length = len(prompt) + new_tokens

    def once() -> tuple[float, float, float]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=length, min_length=length, do_sample=False)
        gen = og.Generator(model, params)
        t = time.perf_counter()
        gen.append_tokens(prompt)
        p = time.perf_counter() - t
        t, c, n = time.perf_counter(), time.process_time(), 0
        while not gen.is_done():
            gen.generate_next_token()  # the first one samples the prefill's logits; each later one runs a step
            n += 1
        d, cpu_s = time.perf_counter() - t, time.process_time() - c
        if n != new_tokens:
            raise RuntimeError(f"the generator produced {n} tokens, not {new_tokens}")
        return p, d, cpu_s / d

    once()  # warm-up
    results = [once() for _ in range(runs)]
    del model
    return median_result([r[0] for r in results], [r[1] for r in results], new_tokens, [r[2] for r in results])


def run_llama_cpp(gguf_file: Path, threads: int, prompt: list[int], new_tokens: int, runs: int) -> dict:
    """llama.cpp through ``llama_cpp.Llama``: ``eval`` of the prompt, then greedy argmax steps (no stop token)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf_file), n_ctx=len(prompt) + new_tokens + 8, n_batch=len(prompt),
                          n_threads=threads, n_threads_batch=threads, verbose=False)

    def once() -> tuple[float, float, float]:
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        p = time.perf_counter() - t
        t, c = time.perf_counter(), time.process_time()
        for i in range(new_tokens):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            if i < new_tokens - 1:  # the last token needs no further step
                llm.eval([token])
        d, cpu_s = time.perf_counter() - t, time.process_time() - c
        return p, d, cpu_s / d

    once()
    results = [once() for _ in range(runs)]
    del llm
    return median_result([r[0] for r in results], [r[1] for r in results], new_tokens, [r[2] for r in results])


def gguf_status() -> tuple[bool, str]:
    try:
        import llama_cpp  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return False, f"llama.cpp's Python bindings do not import ({type(exc).__name__}: {exc})"
    try:
        from compress.exporters.gguf import export_gguf  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return False, f"no GGUF writer (compress.exporters.gguf.export_gguf: {type(exc).__name__}: {exc})"
    return True, "runnable"


# --- models and export -------------------------------------------------------------------------------------------


def build_models(names: list[str], args) -> tuple[dict, object]:
    teacher, tok = compress.load_teacher("smollm2")
    models = {}
    if "teacher" in names:
        models["teacher"] = (teacher, "SmolLM2-135M (compress.load_teacher('smollm2'))")
    calib = compress.CalibrationConfig(num_samples=args.calib_samples)
    for strategy in [n for n in names if n != "teacher"]:
        student = copy.deepcopy(teacher)
        plugins = {"depth": {"eval_samples": 8}} if strategy == "depth" else None
        t = time.perf_counter()
        report = compress.prune(student, {"params": 0.5}, PYDOCS_TRAIN, tokenizer=tok, strategy=strategy,
                                calibration=calib, plugins=plugins)
        models[strategy] = (student, f"pruned here to 50% params, {strategy}, activation importance, "
                                     f"{args.calib_samples} calibration samples, no training; shape "
                                     f"{report.shape_after}; {time.perf_counter() - t:.0f} s")
        print(f"pruned {strategy}: {report.shape_after}", flush=True)
    return models, tok


def export_model(model, tok, out: Path, fmts: list[str], args) -> dict:
    """``compress.export`` once per model (its gates included), or the report of an earlier export in ``out``
    (``--work-dir``) when it holds every folder needed."""
    export_formats = sorted({EXPORT_FOLDER[f][0] for f in fmts if f in EXPORT_FOLDER})
    if any(f in GGUF_TYPES for f in fmts):
        export_formats.append("safetensors")  # the Hugging Face folder the GGUF writer reads
    int8 = any(f in ("optimum-int8", "genai-int8") for f in fmts)
    quantize = "int8" if int8 and {"onnx", "onnx-genai"} & set(export_formats) else None
    if quantize and "optimum-int8" in fmts and "onnx" not in export_formats:
        export_formats.append("onnx")
    report_file = out / "export_report.json"
    if report_file.is_file():
        report = json.loads(report_file.read_text())
        if set(export_formats) <= set(report["formats"]) and (not quantize or report.get("int8")
                                                               or "onnx" not in export_formats):
            print(f"reusing the export in {out}", flush=True)
            return report
    t = time.perf_counter()
    report = compress.export(model, tok, out, formats=export_formats, quantize=quantize, eval_data=PYDOCS_VALID,
                             eval_tokens=args.eval_tokens, overwrite=True).to_dict()
    print(f"exported {export_formats} (quantize={quantize}) in {time.perf_counter() - t:.0f} s", flush=True)
    return report


def format_ppl(fmt: str, report: dict, ppl_fp32: float) -> tuple[float | None, float | None, str]:
    """(perplexity, change vs its fp32 reference, source) of a format, from the export report."""
    if fmt == "optimum-fp32" and report.get("int8"):
        return report["int8"]["ppl_fp32"], None, "onnxruntime (export report)"
    if fmt == "optimum-int8" and report.get("int8"):
        r = report["int8"]
        return r["ppl_int8"], r["ppl_change"], "onnxruntime, change vs onnxruntime fp32 (export report)"
    if fmt == "genai-fp32":
        return ppl_fp32, None, "PyTorch fp32 (the folder passed the logit parity gate)"
    if fmt in ("genai-int8", "genai-int4"):
        folder = EXPORT_FOLDER[fmt][1]
        p = report.get("genai", {}).get(folder, {}).get("perplexity")
        if p:
            precision = fmt.split("-")[1]
            return p[f"ppl_{precision}"], p["ppl_change"], "onnxruntime-genai, change vs PyTorch fp32 (export report)"
    if fmt == "optimum-fp32":
        return ppl_fp32, None, "PyTorch fp32"
    return None, None, "not measured"


# --- report ------------------------------------------------------------------------------------------------------


def ratios(results: dict, model_names: list[str], fmts: list[str]) -> dict:
    out: dict = {"student_fp32_decode_vs_teacher": {}, "int8_student_vs_fp32_teacher": {}, "int8_ppl_change": {},
                 "int4_ppl_change": {}}
    entries = results["entries"]

    def speed(model: str, fmt: str, threads: str) -> float | None:
        e = entries.get(f"{model}/{fmt}", {})
        return e.get("threads", {}).get(threads, {}).get("decode_tokens_per_s")

    thread_keys = sorted({k for e in entries.values() for k in e.get("threads", {})}, key=int)
    students = [m for m in model_names if m != "teacher"]
    for t in thread_keys:
        for student in students:
            for fmt in ("optimum-fp32", "genai-fp32", "gguf-f16"):
                s, base = speed(student, fmt, t), speed("teacher", fmt, t)
                if s and base:
                    r = s / base
                    out["student_fp32_decode_vs_teacher"][f"{student}/{fmt}/{t}t"] = {
                        "ratio": round(r, 3), "met": r >= GOALS["student_fp32_decode_vs_teacher"]}
            for fmt in ("optimum-int8", "genai-int8", "gguf-q8_0"):
                s = speed(student, fmt, t)
                for base_fmt in dict.fromkeys([FP32_OF[fmt], "optimum-fp32"]):
                    base = speed("teacher", base_fmt, t)
                    if s and base:
                        r = s / base
                        change = entries[f"{student}/{fmt}"].get("ppl_change")
                        out["int8_student_vs_fp32_teacher"][f"{student}/{fmt} vs teacher/{base_fmt}/{t}t"] = {
                            "ratio": round(r, 3), "met": r >= GOALS["int8_student_vs_fp32_teacher"],
                            "int8_ppl_change": None if change is None else round(change, 4)}
    for key, e in entries.items():
        change = e.get("ppl_change")
        if change is None:
            continue
        if e["format"] in ("optimum-int8", "genai-int8", "gguf-q8_0"):
            out["int8_ppl_change"][key] = {"change": round(change, 4), "met": change <= GOALS["int8_ppl_change"]}
        if e["format"] == "genai-int4":
            out["int4_ppl_change"][key] = {"change": round(change, 4), "met": change <= GOALS["int4_ppl_change"]}
    return out


def print_table(results: dict) -> None:
    threads = results["threads"]
    hdr = ["model/format", "weights MB/tok", "files MiB", "PPL", "PPL chg"]
    for t in threads:
        hdr += [f"prefill {t}t (s)", f"decode {t}t (tok/s)"]
    hdr += ["BW limit 1t (tok/s)", "1t / limit"]
    print("\n| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    for key, e in results["entries"].items():
        if "error" in e:
            print(f"| {key} | failed: {e['error'][:150]} |")
            continue
        ppl = f"{e['ppl']:.2f}" if e.get("ppl") is not None else "-"
        chg = f"{e['ppl_change'] * 100:+.1f}%" if e.get("ppl_change") is not None else "-"
        row = [key, f"{e['weight_bytes_per_token'] / 1e6:.1f}", f"{e['files_mib']}", ppl, chg]
        for t in threads:
            r = e["threads"].get(str(t), {})
            busy = "" if r.get("other_processes_cores", 0) < 0.2 else f" (busy {r['other_processes_cores']})"
            row += [f"{r.get('prefill_s', '-')}", f"{r.get('decode_tokens_per_s', '-')}{busy}"]
        lim = e.get("bandwidth_limit_1t")
        row += [f"{lim['limit_tokens_per_s']}", f"{lim['measured_over_limit']:.2f}"
                + ("" if lim["within_2x"] else " (>2x off)")] if lim else ["-", "-"]
        print("| " + " | ".join(row) + " |")
    for name, why in results.get("not_runnable", {}).items():
        print(f"{name}: not runnable ({why})")
    for name, m in results["models"].items():  # the fp32 folder's gate: logits against PyTorch
        p = (m.get("genai_gates") or {}).get("onnx-genai", {}).get("parity")
        if p:
            print(f"{name} genai-fp32 parity: max |logit diff| {p['max_abs_diff']:.2e} (prefill "
                  f"{p['max_abs_diff_prefill']:.2e}, decode {p['max_abs_diff_decode']:.2e}), {p['relative_diff']:.1e} "
                  f"of max |logit| {p['max_abs_logit']:.1f}")
    print("\nGoals:")
    for goal, items in results["ratios"].items():
        print(f"  {goal} (goal {'<=' if 'ppl' in goal else '>='} {GOALS[goal]}):")
        for k, v in items.items():
            val = f"{v['change'] * 100:+.2f}%" if "change" in v else f"{v['ratio']:.2f}x"
            if v.get("int8_ppl_change") is not None:
                val += f" (int8 PPL change {v['int8_ppl_change'] * 100:+.2f}%)"
            print(f"    {k}: {val} {'MET' if v['met'] else 'not met'}")


# --- main --------------------------------------------------------------------------------------------------------


def parse_list(value: str, allowed: tuple, what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise SystemExit(f"unknown {what} {bad or value!r}; choose from {','.join(allowed)}")
    return items


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--prefill", type=int, default=512, help="prompt tokens")
    ap.add_argument("--decode", type=int, default=128, help="greedy tokens to generate (all of them, no early stop)")
    ap.add_argument("--models", default=",".join(MODELS), help=f"subset of {','.join(MODELS)}")
    ap.add_argument("--formats", default=",".join(FORMATS), help=f"subset of {','.join(FORMATS)}")
    ap.add_argument("--threads", default=None, help="thread counts to run, default '1,<all cores>'")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--work-dir", default=None, help="keep the exports here and reuse them (default: a temp dir)")
    ap.add_argument("--allow-busy", action="store_true", help="run even if the 1-minute load is >= 1.0")
    ap.add_argument("--out", default="benchmarks/results/deploy_latency_genai.json")
    args = ap.parse_args()
    model_names = [m for m in MODELS if m in parse_list(args.models, MODELS, "model(s)")]
    fmts = [f for f in FORMATS if f in parse_list(args.formats, FORMATS, "format(s)")]
    cores = os.cpu_count() or 1
    threads = [int(t) for t in args.threads.split(",")] if args.threads else sorted({1, cores})

    load_before = loadavg()
    if load_before[0] >= 1.0 and not args.allow_busy:
        print(f"machine busy: load average {load_before} (1-minute load must be below 1.0); waiting is up to you, "
              "or pass --allow-busy to measure anyway (recorded)", flush=True)
        sys.exit(3)
    started = datetime.now()
    import onnxruntime
    import onnxruntime_genai
    import transformers

    results: dict = {
        "machine": machine(), "date": started.strftime("%Y-%m-%d %H:%M"), "args": vars(args),
        "versions": {"onnxruntime": onnxruntime.__version__, "onnxruntime_genai": onnxruntime_genai.__version__,
                     "torch": torch.__version__, "transformers": transformers.__version__},
        "idle": {"loadavg_before": load_before, "allow_busy": args.allow_busy,
                 "idle_at_start": load_before[0] < 1.0},
        "threads": threads, "goals": GOALS, "not_runnable": {}, "models": {}, "entries": {}}
    gguf_fmts = [f for f in fmts if f in GGUF_TYPES]
    if gguf_fmts:
        ok, why = gguf_status()
        if not ok:
            for f in gguf_fmts:
                results["not_runnable"][f] = why
            fmts = [f for f in fmts if f not in GGUF_TYPES]
            print(f"gguf: not runnable ({why})", flush=True)

    bw = memory_bandwidth()
    results["bandwidth_1t"] = bw
    print(f"single-thread memory bandwidth: {bw}", flush=True)

    models, tok = build_models(model_names, args)
    prompt_ids = compress.data.pack_tokens(tok, PYDOCS_VALID, args.prefill, max_windows=1)
    prompt_list = [int(i) for i in prompt_ids[0]]
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="deploy-latency-"))
    try:
        for name, (model, origin) in models.items():
            t = time.perf_counter()
            ppl_fp32 = perplexity(model, tok, PYDOCS_VALID, seq_len=512, max_tokens=args.eval_tokens)
            out = work / name
            report = export_model(model, tok, out, fmts, args)
            results["models"][name] = {
                "origin": origin, "params": report["params"], "layers": model.config.num_hidden_layers,
                "shape": report["shape"], "ppl_fp32_pytorch": ppl_fp32, "export_seconds": report["seconds"],
                "export_formats": report["formats"], "parity": report.get("parity"),
                "genai_gates": {k: {kk: vv for kk, vv in v.items() if kk != "perplexity"}
                                for k, v in report.get("genai", {}).items()}}
            print(f"{name}: PPL fp32 {ppl_fp32:.3f} ({time.perf_counter() - t:.0f} s with export)", flush=True)
            gguf_files: dict = {}
            if gguf_fmts and not results["not_runnable"]:
                from compress.exporters.gguf import export_gguf

                try:
                    gguf_files = export_gguf(out, out / "gguf", [GGUF_TYPES[f] for f in gguf_fmts])
                except Exception as exc:  # noqa: BLE001
                    for f in gguf_fmts:
                        results["entries"][f"{name}/{f}"] = {"format": f, "error": f"GGUF export: {exc}"}
            for fmt in fmts + (gguf_fmts if gguf_files else []):
                key = f"{name}/{fmt}"
                entry: dict = {"format": fmt, "loadavg_at_start": loadavg()}
                try:
                    if fmt in GGUF_TYPES:
                        path = Path(gguf_files[GGUF_TYPES[fmt]])
                        entry.update(gguf_weight_bytes(path), files_mib=round(path.stat().st_size / 2**20, 1))
                        entry["ppl"], entry["ppl_change"], entry["ppl_source"] = None, None, "not measured"
                        runner, target, prompt = run_llama_cpp, path, prompt_list
                    else:
                        folder = out / EXPORT_FOLDER[fmt][1]
                        onnx_file = folder / "model.onnx"
                        entry.update(onnx_weight_bytes(onnx_file))
                        entry["files_mib"] = round(sum(f.stat().st_size for f in folder.iterdir()
                                                       if ".onnx" in f.name) / 2**20, 1)
                        entry["ppl"], entry["ppl_change"], entry["ppl_source"] = format_ppl(fmt, report, ppl_fp32)
                        if fmt.startswith("optimum"):
                            runner, target, prompt = run_optimum, folder, prompt_ids
                        else:
                            runner, target, prompt = run_genai, folder, prompt_list
                    entry["threads"] = {}
                    for n in threads:
                        busy, own, wall = busy_cpu_seconds(), time.process_time(), time.perf_counter()
                        entry["threads"][str(n)] = runner(target, n, prompt, args.decode, args.runs)
                        # cores the rest of the machine kept busy meanwhile (idle machine: ~0)
                        others = ((busy_cpu_seconds() - busy) - (time.process_time() - own)) \
                            / (time.perf_counter() - wall)
                        entry["threads"][str(n)]["other_processes_cores"] = round(max(others, 0.0), 2)
                        print(f"{key} {n}t: {entry['threads'][str(n)]}", flush=True)
                    one = entry["threads"].get("1")
                    if one:
                        limit = bw["read_gb_s_best"] * 1e9 / entry["weight_bytes_per_token"]
                        ratio = one["decode_tokens_per_s"] / limit
                        entry["bandwidth_limit_1t"] = {"limit_tokens_per_s": round(limit, 2),
                                                       "measured_over_limit": round(ratio, 3),
                                                       "within_2x": ratio >= 0.5}
                except Exception as exc:  # noqa: BLE001 - record and go on with the other formats
                    entry["error"] = f"{type(exc).__name__}: {exc}"
                    print(f"{key} failed: {entry['error']}", flush=True)
                results["entries"][key] = entry
    finally:
        if not args.work_dir:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    results["idle"]["loadavg_after"] = loadavg()
    results["idle"]["note"] = ("loadavg_after includes this benchmark's own load (it keeps up to all cores busy); "
                               + ("the machine was not checked idle (--allow-busy): compare figures within this run, "
                                  "and read other_processes_cores" if args.allow_busy
                                  else "the machine was checked idle before starting"))
    results["seconds"] = round((datetime.now() - started).total_seconds())
    results["ratios"] = ratios(results, model_names, fmts)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=2))
    print_table(results)
    print(f"\nload average before {load_before}, after {results['idle']['loadavg_after']}"
          f"{' (--allow-busy)' if args.allow_busy else ''}; {results['seconds']} s; wrote {out_path}")


if __name__ == "__main__":
    main()
