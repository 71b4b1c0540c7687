"""The compiled digits MLP at batch 1 and 128 with and without fxpress.compile's per-call
OpenMP clause (``small_work_serial``), side by side in one process: fp32 eager, fxpress
int8 eager, int8 compiled with the clause, int8 compiled without it, fp32 compiled.
Medians of interleaved rounds at 2 threads, then 1; prints the load average.

``python -m bench.compile_threads [rounds]``"""
from __future__ import annotations

import contextlib
import os
import sys

import torch


def main(rounds: int = 15) -> None:
    import fxpress
    import fxpress.compiled as compiled_mod
    from bench.common import interleaved_medians
    from examples import digits

    x = digits.digits_data().x_test
    model = digits.trained_mlp().eval()
    big = x[:128]
    q = fxpress.compress(model, "quantize{bits=8,activations=dynamic}", (big,),
                         calibration=[(big,)], policy="warn", progress=False).module
    v = {"fp32 eager": model, "int8 eager": q}
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        v["int8 compiled"] = fxpress.compile(q, big)
        # without the clause, and without its cache key (Inductor's cache would hand back
        # the code made with it)
        kept = compiled_mod.small_work_serial, compiled_mod._serial_pass
        compiled_mod.small_work_serial, compiled_mod._serial_pass = contextlib.nullcontext, \
            lambda: torch._inductor.config.post_grad_custom_post_pass
        try:
            v["int8 compiled, no clause"] = fxpress.compile(q, big)
            v["int8 compiled, no clause"](x[:1])  # compiled (and run) without the clause
        finally:
            compiled_mod.small_work_serial, compiled_mod._serial_pass = kept
        v["fp32 compiled"] = fxpress.compile(model, big)
        for n in (2, 1):
            torch.set_num_threads(n)
            for name, xx in (("b1", x[:1]), ("b128", big)):
                load = os.getloadavg()[0]
                r = interleaved_medians({k: (lambda m=m, xx=xx: m(xx)) for k, m in v.items()}, rounds)
                print(f"{n} thread(s) {name} (load {load:.1f}):",
                      ", ".join(f"{k} {t * 1e3:.3f} ms" for k, t in r.items()))
    finally:
        torch.set_num_threads(threads)
    print("compiles:", {k: m.compiles for k, m in v.items() if hasattr(m, "compiles")})


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
