"""tcn default, one process: eager vs tiled windows graphed / selective / compiled; pool growth per capture."""
import gc, sys, time, warnings, torch
import convmem
from convmem.nn import tiled as tiled_mod
from convmem.nn.tiled import Tiled
from convmem.nn._window_graphs import WindowGraphs, graph_pool_bytes

GiB = 2**30
orig_try = WindowGraphs._try_capture
def logged_try(self, key, fn, inputs):
    before = graph_pool_bytes()
    g = orig_try(self, key, fn, inputs)
    print(f"    capture {key[0]} {key[2]}: pool {before/GiB:.3f} -> {graph_pool_bytes()/GiB:.3f} GiB", flush=True)
    return g
WindowGraphs._try_capture = logged_try
orig_call_window = tiled_mod._Runner.call_window
FORWARD_GRAPHS = [True]
def call_window(self, w, leaves):
    if not FORWARD_GRAPHS[0]:
        return self.call(w, leaves)
    return orig_call_window(self, w, leaves)
tiled_mod._Runner.call_window = call_window

def measure(name, model, loss_fn, x, steps_warm=3):
    def step():
        model.zero_grad(set_to_none=True)
        loss_fn(model(x)).backward()
    t0 = time.time()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for _ in range(steps_warm):
            step()
    torch.cuda.synchronize()
    warm_s = time.time() - t0
    gc.collect(); torch.cuda.reset_peak_memory_stats()
    times, cpu = [], []
    for _ in range(5):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); c0 = time.perf_counter(); step(); c1 = time.perf_counter(); e.record(); torch.cuda.synchronize()
        times.append(s.elapsed_time(e)); cpu.append((c1 - c0) * 1e3)
    alloc = torch.cuda.max_memory_allocated() / GiB
    pool = graph_pool_bytes() / GiB
    msgs = sorted({str(m.message)[:150] for m in w if "could not be captured" in str(m.message)})
    print(f"{name}: step {sorted(times)[2]:.1f} ms (min {min(times):.1f}) cpu {sorted(cpu)[2]:.1f} ms alloc {alloc:.3f} GiB pool {pool:.3f} total {alloc+pool:.3f} GiB warm {warm_s:.0f}s {msgs}", flush=True)

def fresh():
    return convmem.zoo.get("tcn", "default", device="cuda")

def config(name, tile, chunk, graphs, selective=False, compiled=False, fwd_graphs=True, fwd=None, full=0):
    FORWARD_GRAPHS[0] = fwd_graphs
    e = fresh()
    m = e.model
    if full:
        chosen = {f"blocks.{round(i * 16 / full)}" for i in range(full)}
        convmem.checkpoint_(m, policy="full", filter_fn=lambda mod, fqn: fqn in chosen)
    if selective:
        convmem.checkpoint_(m, policy="selective", filter_fn=lambda mod, fqn: fqn.startswith("blocks.") and fqn.count(".") == 1 and not isinstance(mod, convmem.nn.Checkpointed) and fqn not in (chosen if full else ()))
    if compiled:
        m.compile(dynamic=False)
    t = Tiled(m, tile, batch_chunk=chunk, cuda_graphs=graphs, forward_tile_length=fwd)
    try:
        measure(name, t, e.loss_fn, e.inputs[0])
    except Exception as err:
        print(f"{name}: FAILED {type(err).__name__}: {str(err)[:300]}", flush=True)
    del t, m, e
    gc.collect(); torch.cuda.empty_cache(); torch._dynamo.reset()

e = fresh(); measure("eager", e.model, e.loss_fn, e.inputs[0]); del e; gc.collect(); torch.cuda.empty_cache()
for full in (0, 4, 8, 16):
    config(f"compiled graphs 32768 b1 full {full} selective {16 - full}", 32768, 1, True, selective=True, compiled=True, fwd=32768, full=full)
e = fresh(); measure("eager again", e.model, e.loss_fn, e.inputs[0])
