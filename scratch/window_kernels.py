"""Which GPU kernels grow with the number of windows (tcn default, tiled, batch chunks of 1)."""
import gc, sys, collections, torch, time
import convmem
from convmem.nn.tiled import Tiled
from torch.profiler import profile, ProfilerActivity

def kernels(name, model, loss_fn, x):
    def step():
        model.zero_grad(set_to_none=True)
        loss_fn(model(x)).backward()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step(); torch.cuda.synchronize()
    by = collections.defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            k = ev.name[:70]
            by[k][0] += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
            by[k][1] += 1
    total = sum(v[0] for v in by.values()) / 1e3
    n = sum(v[1] for v in by.values())
    print(f"== {name}: kernels {total:.1f} ms in {n} launches", flush=True)
    for k, (t, c) in sorted(by.items(), key=lambda kv: -kv[1][0])[:14]:
        print(f"   {t/1e3:7.2f} ms {c:5d}x  {k}", flush=True)

def fresh():
    return convmem.zoo.get("tcn", "default", device="cuda")

e = fresh(); kernels("eager", e.model, e.loss_fn, e.inputs[0]); del e
for tile in (32768, 24576):
    e = fresh(); t = Tiled(e.model, tile, batch_chunk=1, forward_tile_length=tile)
    kernels(f"tiled {tile} b1", t, e.loss_fn, e.inputs[0]); del e, t; gc.collect(); torch.cuda.empty_cache()
e = fresh(); t = Tiled(e.model, 16384, forward_tile_length=16384)
kernels("tiled 16384", t, e.loss_fn, e.inputs[0]); del e, t; gc.collect(); torch.cuda.empty_cache()
# cudnn.benchmark on the graphed, compiled, selective windows
sys.argv = ["x"]
torch.backends.cudnn.benchmark = True
exec(open("scratch/graphs_probe2.py").read().split("e = fresh(); measure(\"eager\"")[0])
e = fresh(); measure("eager benchmark", e.model, e.loss_fn, e.inputs[0]); del e
config("benchmark compiled selective graphs 24576 b1 fwd 24576", 24576, 1, True, selective=True, compiled=True, fwd=24576)
config("benchmark compiled selective graphs 32768 b1 fwd 32768", 32768, 1, True, selective=True, compiled=True, fwd=32768)
