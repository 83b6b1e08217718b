"""`summary`: what a loaded model holds, in words: which weights are 4-bit NF4 (linear layers and mixture-of-experts
weights) and which stay in full precision, and the bytes each takes."""

from __future__ import annotations

from torch import nn

from qlora_trainer import quant
from qlora_trainer.experts import is_nf4_experts
from qlora_trainer.loading import load_info


def model_summary(model: nn.Module) -> str:
    """A short human summary: architecture, which layers are 4-bit, and the bytes they take."""
    info = load_info(model)
    swapped = info.swapped
    nf4_bytes = sum(quant.quantized_bytes(model.get_submodule(n)) for n in swapped)
    nf4_params = sum(model.get_submodule(n).in_features * model.get_submodule(n).out_features for n in swapped)
    experts = [m for m in model.modules() if is_nf4_experts(m)]
    expert_bytes = sum(m.nbytes() for m in experts)
    expert_params = sum(m.shape.numel() for m in experts)
    seen, other_bytes, other_params = set(), 0, 0
    for name, p in model.named_parameters():
        if name.rpartition(".")[0] in swapped or id(p) in seen:
            continue
        seen.add(id(p))
        other_bytes += p.numel() * p.element_size()
        other_params += p.numel()
    kinds = sorted({n.rsplit(".", 1)[-1] for n in swapped})
    some = next(iter(swapped), None)
    compute = model.get_submodule(some).compute_dtype if some else None
    lines = [
        f"model:        {type(model).__name__} from {info.source or 'random weights'}",
        f"4-bit NF4:    {len(swapped)} linear layers ({', '.join(kinds)}), {nf4_params / 1e6:.2f}M params, "
        f"{nf4_bytes / 2**20:.2f} MiB",
    ]
    if experts:
        expert_kinds = sorted({n.rsplit(".", 1)[-1] for n in info.experts})
        lines.append(f"4-bit NF4:    {len(experts)} expert weights ({', '.join(expert_kinds)}; "
                     f"{experts[0].num_experts} experts each), {expert_params / 1e6:.2f}M params, "
                     f"{expert_bytes / 2**20:.2f} MiB")
    routers = " routers, expert biases," if experts else ""
    lines += [
        f"full prec.:   {other_params / 1e6:.2f}M params (embeddings, norms,{routers} output layer), "
        f"{other_bytes / 2**20:.2f} MiB",
        f"compute:      {compute}, device {next(model.parameters()).device}",
    ]
    return "\n".join(lines)
