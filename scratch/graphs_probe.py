"""Where a graphed tiled tcn step goes: captures, replays, eager windows, pool, peak, CPU and GPU time."""
import sys, time, torch, warnings
import convmem
from convmem.nn.tiled import Tiled
from convmem.nn._window_graphs import graph_pool_bytes

def probe(tile, chunk, graphs, fwd=None):
    entry = convmem.zoo.get("tcn", "default", device="cuda")
    t = Tiled(entry.model, tile, batch_chunk=chunk, cuda_graphs=graphs, forward_tile_length=fwd)
    eager = [0]
    if graphs:
        run = t.graphs.run
        def counted(key, addresses, fn, inputs):
            out, static = run(key, addresses, fn, inputs)
            eager[0] += not static
            return out, static
        t.graphs.run = counted
    def step():
        t.zero_grad(set_to_none=True)
        entry.loss_fn(t(*entry.inputs)).backward()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for _ in range(3):
            step()
    torch.cuda.synchronize()
    eager[0] = 0
    rep0 = t.graphs.replays if graphs else 0
    torch.cuda.reset_peak_memory_stats()
    times, cpu = [], []
    for _ in range(5):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); c0 = time.perf_counter(); step(); c1 = time.perf_counter(); e.record(); torch.cuda.synchronize()
        times.append(s.elapsed_time(e)); cpu.append((c1 - c0) * 1e3)
    alloc = torch.cuda.max_memory_allocated() / 2**30
    pool = graph_pool_bytes() / 2**30
    info = f"captures {t.graphs.captures} replays/step {(t.graphs.replays - rep0) / 5:.0f} eager/step {eager[0] / 5:.0f} keys {len(t.graphs._graphs)} refused {t.graphs.refused}" if graphs else ""
    print(f"tile {tile} chunk {chunk} fwd {fwd} graphs {graphs}: windows {t.last_windows} fwd windows {t.last_forward_windows} "
          f"step {sorted(times)[2]:.1f} ms cpu {sorted(cpu)[2]:.1f} ms alloc {alloc:.3f} GiB pool {pool:.3f} GiB {info} warnings {[str(x.message)[:120] for x in w][:2]}", flush=True)
    del t, entry, step
    import gc; gc.collect(); torch.cuda.empty_cache()

for tile, chunk, fwd in [(8192, None, None), (16384, None, None), (21846, 1, None), (21846, 1, 21846), (8192, 2, None)]:
    for graphs in (False, True):
        probe(tile, chunk, graphs, fwd)
