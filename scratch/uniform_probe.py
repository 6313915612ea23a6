"""basenji: every block selective as optimize_ judges it (compiled) vs checkpoint_(selective) compiled in the harness."""
import gc, sys, torch
sys.path.insert(0, "benchmarks")
import harness, strategies
import convmem
from convmem import zoo
from convmem.strategies import optimize as module

orig = module._measure_compiled
def logged(model, inputs, loss_fn, autocast, plan, say):
    orig(model, inputs, loss_fn, autocast, plan, say)
    labels = "+".join(f"{s.option}x{s.stop - s.start}" for s in plan.segments)
    print(f"  judged: {plan.measured_peak_bytes / 2**30:.3f} GiB {plan.measured_step_s * 1e3:.1f} ms  {labels[:160]}", flush=True)
module._measure_compiled = logged

entry = zoo.get("basenji", "default", device="cuda")
try:
    plan = convmem.optimize_(entry.model, *entry.inputs, budget=0.47, loss_fn=entry.loss_fn, allow=("selective", "checkpoint"),
                             compiled=True, progress=True)
    print("accepted", plan.measured_peak_bytes / 2**30)
except Exception as e:
    print(type(e).__name__, str(e)[:200])
del entry; gc.collect(); torch.cuda.empty_cache(); torch._dynamo.reset()
device = torch.device("cuda")
for name, prep in (("checkpoint_ selective compiled", strategies.convmem_checkpoint("selective", compile_model=True)),):
    entry = zoo.get("basenji", "default", device="cuda")
    p = prep(entry)
    r = harness.measure_strategy(entry, p, 5, device)
    print(name, r["peak_bytes"] / 2**30, r["step_ms"], [type(m).__name__ for m in entry.model.modules()].count("Checkpointed"))
