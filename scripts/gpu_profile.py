"""Where a GPU training step's time goes: top CUDA kernels of one stage's step, and the step time per SDPA
backend. `python scripts/gpu_profile.py --stage tokenizer --config configs/coinrun/tokenizer.yaml`."""

import argparse
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from genie.bench import train as bt

p = argparse.ArgumentParser()
p.add_argument("--stage", default="tokenizer")
p.add_argument("--config", default="configs/coinrun/tokenizer.yaml")
p.add_argument("--batch-size", type=int, default=None)
p.add_argument("--compile", action="store_true", help="compile the ST blocks first (genie fit --compile)")
a = p.parse_args()
SIZES = ["image_size", "frames", "batch_size", "patch", "width", "heads", "depth", "mlp", "codes", "actions"]
ns = argparse.Namespace(**dict.fromkeys(SIZES))
stage, cfg = bt.build_stage(a.config, a.stage, ns)
net = stage.net.cuda().train()
c = net.config
B = a.batch_size or cfg["data"]["batch_size"]
T = cfg["data"].get("num_frames", c.num_frames)
batch = {"frames": torch.randint(0, 256, (B, T, c.image_size, c.image_size, 3), dtype=torch.uint8, device="cuda")}
if a.compile:
    print("compiled blocks:", stage.compile_blocks(), flush=True)
opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)


def step():
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = stage.training_loss(batch)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


for name, backends in [
    ("default", None),
    ("flash", [SDPBackend.FLASH_ATTENTION]),
    ("efficient", [SDPBackend.EFFICIENT_ATTENTION]),
    ("cudnn", [SDPBackend.CUDNN_ATTENTION]),
]:
    try:
        ctx = sdpa_kernel(backends) if backends else torch.autocast("cuda", enabled=True)
        with ctx:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        print(f"{a.stage} sdpa={name}: {(time.perf_counter() - t) / 5:.4f} s/step", flush=True)
    except Exception as e:  # a backend may refuse these shapes
        print(f"{a.stage} sdpa={name}: refused ({str(e).splitlines()[0][:120]})", flush=True)

with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for _ in range(2):
        step()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=70))
