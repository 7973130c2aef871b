"""Host and wall milliseconds of each part of DistillModule's training step on a GPU, and of alternatives.

At 256x16 the step is host-bound (BENCHMARKS.md): what matters is how long the host takes to queue
each part. Each part runs 100 times after 10 warm-up calls; `host_ms` is the time to queue one call
(before the closing synchronize), `wall_ms` includes the GPU finishing. Parts run in isolation, on an
otherwise idle GPU, so host_ms is their cost with nothing else competing.

  fwd_bwd_zero      the compiled forward + DistillLoss (KD), backward, zero_grad
  cudagraph_nodes   per CUDA graph: its inputs, and those copied into it each replay (non-static)
  get_total_norm, foreach_norm_stack, foreach_norm_only, norm_to_grad_scale, clip_grad_norm_
                    the gradient norm and clipping, several ways (norm_to_grad_scale: the module's)
  fused_adamw_step  torch's fused AdamW
  finite_check, values_clone, isfinite   the step's bookkeeping of its loss terms
  compiled_update_<mode>   clipping + AdamW (foreach, capturable, tensor lr) under torch.compile,
                    with regrad_*: fresh gradient tensors each step, as zero_grad(set_to_none) gives
  bare_step, bare_fwd_bwd_zero   bench_fit's `bare` figure, whole and without its optimizer step

    python scripts/bench_step_parts.py --model unet_mnv3   # writes benchmarks/step_parts_<gpu>_<model>.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch._inductor.cudagraph_trees as cudagraph_trees  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import bench_fit  # noqa: E402

from distill.losses import FiniteCheck  # noqa: E402


def record_graph_inputs(seen: dict) -> None:
    """Record, once per CUDA graph of cudagraph trees, how many inputs it copies in at each replay."""
    copy_inputs = cudagraph_trees.CUDAGraphNode._copy_inputs_and_remove_from_src

    def recording(node, dsts, srcs):
        if id(node) not in seen:
            copied = [srcs[i] for i in node.non_static_input_idx if isinstance(srcs[i], torch.Tensor)]
            seen[id(node)] = {
                "non_static": len(node.non_static_input_idx),
                "inputs": len(srcs),
                "shapes": [tuple(t.shape) for t in copied][:12],
            }
        return copy_inputs(node, dsts, srcs)

    cudagraph_trees.CUDAGraphNode._copy_inputs_and_remove_from_src = recording


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="unet_mnv3", choices=list(bench_fit.MODELS))
    parser.add_argument("--regime", default="256x16", type=bench_fit.Regime.parse)
    parser.add_argument("--out", default="benchmarks")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_step_parts needs a CUDA GPU")
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    name = re.sub(r"[^A-Za-z0-9]+", "_", torch.cuda.get_device_name(0)).strip("_").lower()
    out: dict = {
        "device": torch.cuda.get_device_name(0),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": " ".join(["python3", *sys.argv]),
        "torch": torch.__version__,
        "model": args.model,
        "regime": str(args.regime),
    }
    graphs: dict = {}
    record_graph_inputs(graphs)

    def timeit(part: str, fn, n: int = 100, warm: int = 10) -> None:
        for _ in range(warm):
            fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(n):
            fn()
        host = (time.perf_counter() - start) / n * 1e3
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / n * 1e3
        out[part] = {"host_ms": round(host, 4), "wall_ms": round(wall, 4)}
        print(part, out[part], flush=True)

    student = bench_fit.MODELS[args.model]
    # bench_fit's settings for the module (pure, pipeline) and for bare, as `--compile reduce-overhead`
    settings = argparse.Namespace(compile="reduce-overhead", compile_bare=True, precision="bf16-mixed")
    module = bench_fit.training_module(student, settings).to(device)
    module.student.to(memory_format=torch.channels_last)
    module.on_fit_start()
    batch = bench_fit.fake_batch(args.regime, device)
    batch["teacher_valid"] = torch.ones(args.regime.batch, dtype=torch.bool, device=device)
    params = list(module.parameters())
    out["params"] = len(params)
    optimizer = module.make_optimizer(fused=True)

    def forward_backward():
        with bench_fit.autocast(device, settings.precision):
            total, names, values = module.training_loss(batch)
        total.backward()
        return names, values

    start = time.time()
    for _ in range(5):
        forward_backward()
        optimizer.zero_grad(set_to_none=True)
    out["compile_s"] = round(time.time() - start, 1)
    timeit("fwd_bwd_zero", lambda: (forward_backward(), optimizer.zero_grad(set_to_none=True)))
    out["cudagraph_nodes"] = list(graphs.values())

    names, values = forward_backward()
    grads = [p.grad for p in params]
    timeit("get_total_norm", lambda: torch.nn.utils.get_total_norm(grads))
    timeit("foreach_norm_stack", lambda: torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))
    timeit("foreach_norm_only", lambda: torch._foreach_norm(grads))

    def norm_to_grad_scale():
        norm = torch.nn.utils.get_total_norm(grads)
        optimizer.grad_scale = torch.clamp((norm + 1e-6) / 1.0, min=1.0)

    timeit("norm_to_grad_scale", norm_to_grad_scale)
    timeit("fused_adamw_step", optimizer.step)
    timeit("clip_grad_norm_", lambda: torch.nn.utils.clip_grad_norm_(params, 1.0))
    timeit("finite_check", lambda: FiniteCheck(names, values))
    timeit("values_clone", lambda: values.clone())
    timeit("isfinite", lambda: values.isfinite())

    for mode in ("default", "reduce-overhead"):
        copies = [p.detach().clone().requires_grad_() for p in params]
        for p, g in zip(copies, grads, strict=True):
            p.grad = g.clone()
        adamw = torch.optim.AdamW(copies, lr=torch.tensor(1e-3, device=device), foreach=True, capturable=True)

        def clip_and_step(copies=copies, adamw=adamw):
            copy_grads = [p.grad for p in copies]
            norm = torch.nn.utils.get_total_norm(copy_grads)
            torch._foreach_mul_(copy_grads, torch.clamp(1.0 / (norm + 1e-6), max=1.0))
            adamw.step()

        compiled = torch.compile(clip_and_step, mode=mode)
        start = time.time()
        compiled()
        torch.cuda.synchronize()
        out[f"compiled_update_{mode}_compile_s"] = round(time.time() - start, 1)
        timeit(f"compiled_update_{mode}", compiled)

        def regrad(copies=copies):
            for p, g in zip(copies, grads, strict=True):
                p.grad = g.clone()

        timeit(f"regrad_{mode}", regrad)
        timeit(f"regrad_plus_compiled_update_{mode}", lambda r=regrad, c=compiled: (r(), c()))

    bare = bench_fit.bare_step(student, args.regime, settings, device)
    graphs.clear()
    for _ in range(5):
        bare()
    timeit("bare_step", bare)
    out["bare_cudagraph_nodes"] = list(graphs.values())
    timeit("bare_fwd_bwd_zero", lambda: bare(update=False))
    path = Path(args.out) / f"step_parts_{name}_{args.model}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", path)


if __name__ == "__main__":
    main()
