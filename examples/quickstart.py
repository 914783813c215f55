"""Patch a small LitGPT model with Delta Attention Residuals, train a few CPU steps, print the routing.

    python examples/quickstart.py
"""

import torch
from litgpt import GPT, Config

import lit_dar

torch.manual_seed(0)
config = Config.from_name("Qwen3-0.6B", n_layer=6, n_embd=128, n_head=4, n_query_groups=2, head_size=32,
                          intermediate_size=384, vocab_size=256, padded_vocab_size=256, block_size=128)
model = lit_dar.patch_model(GPT(config), lit_dar.DARConfig(mode="delta", gate="none"))
model.apply(model._init_weights)
print(f"routing adds {lit_dar.routing_overhead(model)['routing_params']:,} parameters "
      f"({lit_dar.routing_overhead(model)['percent']:.3f} %)")

# a toy language: each token is followed by (7·token + 1) mod 256 or, one time in four, a random token
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
for step in range(60):
    idx = torch.randint(0, 256, (8, 65))
    for t in range(1, 65):
        keep = torch.rand(8) < 0.75
        idx[:, t] = torch.where(keep, (7 * idx[:, t - 1] + 1) % 256, idx[:, t])
    logits = model(idx[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step % 20 == 0 or step == 59:
        print(f"step {step:3d}  loss {loss.item():.3f}")

lit_dar.enable_routing_stats(model)
with torch.no_grad():
    model(torch.randint(0, 256, (2, 64)))
print("sublayer  sources  max weight (uniform)  entropy/log n")
for j, s in enumerate(lit_dar.routing_statistics(model)):
    n = int(s["n_sources"])
    norm_entropy = s["entropy"].item() / s["uniform_entropy"].item() if n > 1 else 0.0
    print(f"{j:8d}  {n:7d}  {s['max_weight'].item():.3f} ({s['uniform_max_weight'].item():.3f})       {norm_entropy:.3f}")
