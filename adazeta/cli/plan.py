"""`adazeta-plan`: the peak memory of a training run, predicted before the weights are downloaded.

    adazeta-plan model=llama2-7b method=adazeta train.batch_size=16 \
        task.data_dir=../shared/data/sst2 model.tokenizer=packaged:smollm2-135m
    adazeta-plan --methods adazeta,mezo,ft model=llama2-7b task.data_dir=../shared/data/sst2
    adazeta-plan --fit 1,2 --check 8,30 model=smollm2-135m     # check against a full-depth run
    make plan

The architecture is built with random weights at full width and a few layers (`--fit`, 1 and 2 by
default), the peak of a training step measured at each depth in a fresh process, and the line
peak = a + b x layers read at the full depth; `--check` measures more depths and reports the line's
error there. A bf16 target on a CPU is measured in float32 and converted; a CUDA target measured on a
CPU adds the buffers only CUDA allocates. The method and its limits: docs/design.md, section "The
memory planner"; the library part: adazeta/engine/plan/.
"""

from __future__ import annotations

import argparse
import os
import sys

from adazeta.engine.plan.line import TARGET_DEVICES, Plan, fit_line, plan
from adazeta.engine.plan.measure import GIB

GB = 1e9
# Reported peaks to print beside a prediction: (model name, method name) -> text.
REPORTED = {
    ("llama2-7b", "adazeta"): "14 GB (AdaZeta paper, Llama-2-7B, SST-2)",
    ("llama2-7b", "ft"): "about 118 GB (AdaZeta paper, full fine-tuning)",
}


def human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def report(p: Plan) -> str:
    """The plan as markdown: the measured depths against the line, then the prediction."""
    mdt = p.measured_dtype
    lines = [
        f"### {p.method} on {p.model}: {p.depth} layers, {p.dtype} base"
        + (f" (measured in {mdt}, converted)" if mdt != p.dtype else ""),
        "",
        f"batch {p.batch}",
        "",
        f"| layers | params | trainable | inference GiB ({mdt}) | step peak GiB ({mdt}) | line GiB | error | step s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    a, b = p.line_in_measured_dtype()
    for m in p.measurements:
        err = "fit" if m.layers in p.fit_layers else f"{100 * (a + b * m.layers - m.peak_gib) / m.peak_gib:+.1f}%"
        lines.append(f"| {m.layers} | {human(m.params)} | {human(m.trainable_params)} | {m.inference_gib:.3f} "
                     f"| {m.peak_gib:.3f} | {a + b * m.layers:.3f} | {err} | {m.step_s:.2f} |")
    lines.append(f"| **{p.depth}** | | | | | **{a + b * p.depth:.2f}** | predicted | |")
    lines.append("")
    if p.dtype_checks:
        lines += [f"dtype check: {p.dtype} measured natively against the {mdt} measurement converted",
                  "", f"| layers | {p.dtype} native GiB | converted GiB | error |", "|---:|---:|---:|---:|"]
        lines += [f"| {n} | {native:.3f} | {conv:.3f} | {100 * (conv - native) / native:+.1f}% |"
                  for n, conv, native in p.dtype_checks]
        if len({n for n, _, _ in p.dtype_checks}) >= 2:
            a, b = fit_line([n for n, _, _ in p.dtype_checks], [native for _, _, native in p.dtype_checks])
            lines.append(f"| **{p.depth}** | **{a + b * p.depth:.2f}** (native line) | **{p.peak_gib:.2f}** | "
                         f"{100 * (p.peak_gib - a - b * p.depth) / (a + b * p.depth):+.1f}% |")
        lines.append("")
    if p.cuda_terms:
        lines += [f"CUDA target, measured on {p.device}: buffers only CUDA allocates (docs/design.md, the memory planner)",
                  "", f"| term | allocated by | CUDA GiB ({p.dtype}) | held in the measurement GiB ({mdt}) | added GiB |",
                  "|---|---|---:|---:|---:|"]
        lines += [f"| {t.name} | {t.source} | {t.cuda_gib:.4f} | {t.cpu_gib:.4f} | {t.added(p.ratio):+.4f} |"
                  for t in p.cuda_terms]
        lines += [f"| **total** | | | | **{p.added_gib:+.4f}** |", ""]
    ref = REPORTED.get((p.model, p.method))
    measured_line = f" (the {mdt} line: {a + b * p.depth:.2f} GiB)" if mdt != p.dtype else ""
    parts = f" = line {p.line_gib:.2f} + CUDA terms {p.added_gib:.2f}" if p.cuda_terms else ""
    if p.reserved_gib is not None:
        kind = f"allocated; reserved by the CUDA allocator {p.reserved_gib:.2f} GiB"
    elif p.target_device == "cuda":
        kind = "allocated; the CUDA allocator reserves more: measure on a GPU for that"
    else:
        kind = "resident set"
    lines.append(f"**Predicted peak of {p.method} on {p.model} ({p.dtype}, {p.target_device}): {p.peak_gib:.2f} GiB "
                 f"({p.peak_gib * GIB / GB:.1f} GB)**{parts} ({kind}){measured_line}; inference {p.inference_gib:.2f} "
                 f"GiB, ratio {p.peak_gib / p.inference_gib:.2f}" + (f"; reported: {ref}" if ref else ""))
    return "\n".join(lines)


def summary_table(plans: list[Plan]) -> str:
    rows = ["| method | dtype | device | predicted peak GiB | of which CUDA terms | GB | inference GiB | peak / inference "
            "| worst check error | reported |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for p in plans:
        errs = [abs(e) for _, _, e in p.checks()]
        worst = f"{100 * max(errs):.1f}%" if errs else "not checked"
        terms = f"{p.added_gib:.2f}" if p.cuda_terms else ""
        rows.append(f"| {p.method} | {p.dtype} | {p.target_device} | {p.peak_gib:.2f} | {terms} | {p.peak_gib * GIB / GB:.1f} "
                    f"| {p.inference_gib:.2f} "
                    f"| {p.peak_gib / p.inference_gib:.2f} | {worst} | {REPORTED.get((p.model, p.method), '')} |")
    return "\n".join(rows)


def ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def depths(text: str) -> str:
    """argparse type of --fit/--check/--check-dtype: comma-separated layer counts >= 1 (or empty)."""
    parts = [x.strip() for x in text.split(",") if x.strip()]
    if not all(x.isdigit() and int(x) >= 1 for x in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of layer counts >= 1, e.g. 1,2")
    return ",".join(parts)


def positive(text: str) -> int:
    """argparse type of --q/--steps/--seq-len/--threads: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 1")
    return value


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="adazeta-plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fit", type=depths, default="1,2", help="depths the line is fitted on (default 1,2)")
    p.add_argument("--check", type=depths, default="", help="further depths to measure and compare with the line")
    p.add_argument("--methods", default="", help="comma-separated methods (default: the config's method=)")
    p.add_argument("--seq-len", type=positive, default=None, help="synthetic rows of N tokens (default: the task's longest batch)")
    p.add_argument("--q", type=positive, default=1, help="queries per ZO step")
    p.add_argument("--steps", type=positive, default=None, help="training steps measured (default 1 for ZO, 2 for first order)")
    p.add_argument("--check-dtype", type=depths, default="", help="depths to measure natively in the target dtype too "
                   "(e.g. 1,2; slow on CPU), against the converted float32 measurement")
    p.add_argument("--threads", type=positive, default=None, help="torch threads in each measurement")
    p.add_argument("--target-device", choices=TARGET_DEVICES, default="auto",
                   help="the device the prediction is for (default auto: model.device's type; cuda for "
                   "model.device=auto); a cuda target measured on a CPU adds the buffers only CUDA allocates")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as for adazeta-train")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from adazeta.errors import AdazetaError

    methods = [m for m in args.methods.split(",") if m] or [None]
    plans = []
    try:
        for method in methods:
            overrides = list(args.overrides) + ([f"method={method}"] if method else [])
            plans.append(plan(overrides, fit=ints(args.fit), check=ints(args.check), seq_len=args.seq_len,
                              q=args.q, steps=args.steps, check_dtype=ints(args.check_dtype), threads=args.threads,
                              target_device=args.target_device, log=lambda s: print(s, file=sys.stderr, flush=True)))
            print(report(plans[-1]) + "\n", flush=True)
    except (AdazetaError, HydraException, OmegaConfBaseException) as e:  # a bad override: its message, no traceback
        sys.exit(f"error: {e}")
    if len(plans) > 1:
        print(summary_table(plans))


if __name__ == "__main__":
    main()
