"""The singular values of every LoRA update, the rank they call for, and rank truncation: the maths of `inspect`
(inspect_adapter.py prints, plots and writes what this computes; train prints the verdict).

    dW = scale * B @ A,   B (out, r), A (r, in)
    B = Qb Rb,  A.T = Qa Ra                       (thin QR: Qb (out, r), Qa (in, r), Rb, Ra (r, r))
    dW = Qb (scale * Rb Ra.T) Qa.T = (Qb Uc) S (Vc.T Qa.T)     with  scale * Rb Ra.T = Uc S Vc.T  (r x r SVD)

so the SVD of an (out, in) update costs two thin QRs and one r x r SVD, and dW itself is never formed. All of it
runs in fp64 on the CPU: the factors are small, and sigma_r of a nearly rank-deficient update needs the digits.

An expert weight's LoRA (expert_lora.py) is one such update per expert, scale * B_e @ A_e: each expert gets its own
spectrum (its own row in `inspect`), and counts as one module in the verdict.

Energy is the sum of squared singular values (= ||dW||_F^2); "the rank that holds 90%" is the smallest k whose
top-k singular values hold 90% of it. By Eckart-Young the best rank-k approximation keeps the top k triplets, and
its relative Frobenius error is sqrt(sum of the discarded sigma^2) / ||dW||_F.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from qlora_trainer.errors import ArgumentError
from qlora_trainer.expert_lora import ExpertLoRA, per_expert_factors
from qlora_trainer.lora import lora_layers, lora_scale
from qlora_trainer.peft_layout import Adapter, Factors

ENERGY_LEVELS = (0.90, 0.99)  # the table's two energy ranks: r90 and r99
# The verdict's rule, the same rank the plot's map shows: the rank that holds VERDICT_ENERGY of the energy (r90) in at
# least VERDICT_SHARE of the modules, rounded up to a power of two, is the r that would likely do.
VERDICT_ENERGY = ENERGY_LEVELS[0]
VERDICT_SHARE = 0.95
KIND_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "gate_up_proj", "down_proj",
              "c_attn", "c_proj", "c_fc")  # LLaMA family (and MoE experts), then GPT-2; anything else sorts after


# ------------------------------------------------------------------------------------------ the maths

def factored_svd(A: torch.Tensor, B: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U (out, k), S (k,), Vh (k, in)) with scale * B @ A = U diag(S) Vh, S descending, k = min(r, out, in);
    fp64 on the CPU, without forming the (out, in) product."""
    A64, B64 = A.detach().to("cpu", torch.float64), B.detach().to("cpu", torch.float64)
    Qb, Rb = torch.linalg.qr(B64)  # (out, kb), (kb, r)
    Qa, Ra = torch.linalg.qr(A64.T)  # (in, ka), (ka, r)
    core = scale * (Rb @ Ra.T)  # (kb, ka), kb, ka <= r
    Uc, S, Vhc = torch.linalg.svd(core, full_matrices=False)
    return Qb @ Uc, S, Vhc @ Qa.T


def energy_rank(sigma: torch.Tensor, fraction: float) -> int:
    """The smallest k whose top-k singular values hold `fraction` of the energy (sum of sigma^2); 0 if all zero."""
    energy = sigma.double() ** 2
    total = float(energy.sum())
    if total == 0.0:
        return 0
    cumulative = energy.cumsum(0) / total
    # A tolerance of a few ulps, so that a spectrum holding exactly 90% in its first k values gives k.
    return int((cumulative < fraction - 1e-12).sum()) + 1


@dataclass
class ModuleSpectrum:
    name: str  # module path, e.g. model.layers.3.self_attn.q_proj, or an expert weight's (...mlp.experts.down_proj)
    sigma: torch.Tensor  # (k,) fp64, descending
    r: int
    base_norm: float | None = None  # ||W||_F of the dequantized base weight, with --base
    expert: int | None = None  # which expert of an expert weight this update is

    @property
    def kind(self) -> str:
        return self.name.rsplit(".", 1)[-1]

    @property
    def label(self) -> str:
        """The kind, and for an expert weight its expert: down_proj[3]."""
        return self.kind if self.expert is None else f"{self.kind}[{self.expert}]"

    @property
    def layer(self) -> int | None:
        match = re.search(r"\.(\d+)\.", self.name)
        return int(match.group(1)) if match else None

    @property
    def norm(self) -> float:
        """||dW||_F."""
        return float(self.sigma.norm())

    @property
    def rank90(self) -> int:
        return energy_rank(self.sigma, ENERGY_LEVELS[0])

    @property
    def rank99(self) -> int:
        return energy_rank(self.sigma, ENERGY_LEVELS[1])

    @property
    def condition(self) -> float:
        """sigma_1 / sigma_r (inf when the update has fewer than r independent directions)."""
        if len(self.sigma) < self.r or self.sigma[-1] == 0:
            return math.inf if float(self.sigma[0]) > 0 else math.nan
        return float(self.sigma[0] / self.sigma[-1])

    @property
    def relative(self) -> float | None:
        """||dW||_F / ||W||_F against the dequantized base weight (None without a base)."""
        return None if self.base_norm is None else self.norm / self.base_norm


def spectra(weights: Factors, scale: float, r: int, experts: Factors | None = None) -> list[ModuleSpectrum]:
    """One ModuleSpectrum per module of {module path: (A (r, in), B (out, r))} and per expert of each expert weight
    of {path: (A (r*E, in), B (out, r*E))}, in table order."""
    found = [ModuleSpectrum(name, factored_svd(A, B, scale)[1], r) for name, (A, B) in weights.items()]
    for name, (A, B) in (experts or {}).items():
        A_e, B_e = per_expert_factors(A, B, A.shape[0] // r)
        found += [ModuleSpectrum(name, factored_svd(A_e[e], B_e[e], scale)[1], r, expert=e) for e in range(len(A_e))]
    return sorted(found, key=table_key)


def model_spectra(model: nn.Module) -> list[ModuleSpectrum]:
    """The spectra of a model's LoRA layers (after training, before or without saving), one per expert of each
    expert weight."""
    found = []
    for name, layer in lora_layers(model).items():
        factors = {name: (layer.lora_A, layer.lora_B)}
        experts = isinstance(layer, ExpertLoRA)
        found += spectra({} if experts else factors, layer.scale, layer.r, factors if experts else None)
    return sorted(found, key=table_key)


def table_key(spectrum: ModuleSpectrum):
    kind = spectrum.kind
    rank = KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER)
    expert = -1 if spectrum.expert is None else spectrum.expert
    return rank, kind, -1 if spectrum.layer is None else spectrum.layer, spectrum.name, expert


def _next_power_of_two(k: int) -> int:
    return 1 << max(k - 1, 0).bit_length()


def verdict_rank(found: list[ModuleSpectrum]) -> tuple[int, float]:
    """(k, share): the smallest rank that holds 90% of the energy (r90) in at least 95% of the modules (at least 1
    unless every update is zero, then 0), and the share of modules whose r90 is at most k."""
    if not found:
        return 0, 0.0
    ranks = sorted(energy_rank(s.sigma, VERDICT_ENERGY) for s in found)
    k = ranks[min(len(ranks) - 1, math.ceil(VERDICT_SHARE * len(ranks)) - 1)]
    k = max(k, min(ranks[-1], 1))  # a few trained modules among untouched ones still need rank 1
    return k, sum(rank <= k for rank in ranks) / len(ranks)


def verdict(found: list[ModuleSpectrum]) -> str:
    """One line, one rule: k = the rank that holds 90% of the energy in 95% of the modules (the plot's map shows each
    module's 90% rank); r = k rounded up to a power of two would likely do. When no power of two below r holds
    it, keep r; when k is as high as a flat spectrum's, every direction is used and a higher r might help."""
    if not found:
        return "no LoRA modules to inspect"
    r = max(s.r for s in found)
    k, share = verdict_rank(found)
    if k == 0:
        return f"every update is zero (B = 0 in all {len(found)} modules): the adapter has not been trained"
    head = f"rank {k} of {r} holds {VERDICT_ENERGY:.0%} of the energy in {100 * share:.0f}% of modules"
    suggestion = min(_next_power_of_two(k), r)
    if suggestion < r:
        return f"{head}: r={suggestion} would likely do"
    if k >= energy_rank(torch.ones(r, dtype=torch.float64), VERDICT_ENERGY):  # as spread as a flat spectrum
        return f"{head}: the updates use every direction, keep r={r} (a higher r might help)"
    smaller = _next_power_of_two(k) // 2
    return (f"{head}: keep r={r} (r={smaller} would hold less than {VERDICT_ENERGY:.0%} of the energy in more than "
            f"{100 * (1 - VERDICT_SHARE):.0f}% of modules)")


# ------------------------------------------------------------------------------------------ truncation

def truncate(adapter: Adapter, rank: int) -> tuple[Factors, dict[str, float], float]:
    """The best rank-`rank` approximation of every module's update (Eckart-Young) as new LoRA factors.

    Returns ({module: (A (rank, in), B (out, rank))}, {module: relative Frobenius error}, new scale). lora_alpha
    and use_rslora stay as they were, so the new scale is lora_scale(rank, alpha); each factor takes
    sqrt(sigma / scale) of the kept singular values, so the two halves have the same size."""
    if rank < 1 or rank > adapter.r:
        raise ArgumentError("truncate_rank", f"{{arg}} {rank}: must be between 1 and the adapter's rank r={adapter.r}")
    new_scale = lora_scale(rank, adapter.alpha, adapter.use_rslora)
    truncated, errors = {}, {}
    for name, (A, B) in adapter.weights.items():
        *truncated[name], errors[name] = _truncated(A, B, adapter.scale, rank, new_scale)
    return truncated, errors, new_scale


def truncate_experts(adapter: Adapter, rank: int) -> tuple[Factors, dict[str, float]]:
    """truncate for the expert weights: each expert's update on its own, the factors stacked back in PEFT's
    interleaving (A (rank*E, in), B (out, rank*E)); the errors keyed "<path>[e]"."""
    new_scale = lora_scale(rank, adapter.alpha, adapter.use_rslora)
    truncated, errors = {}, {}
    for name, (A, B) in adapter.experts.items():
        experts = A.shape[0] // adapter.r
        new_A, new_B = [], []
        for e, (A_e, B_e) in enumerate(zip(*per_expert_factors(A, B, experts))):
            a, b, errors[f"{name}[{e}]"] = _truncated(A_e, B_e, adapter.scale, rank, new_scale)
            new_A.append(a)
            new_B.append(b)
        # row e*rank + k of A and column k*E + e of B belong to expert e (expert_lora.py)
        truncated[name] = (torch.cat(new_A), torch.stack(new_B, dim=-1).reshape(B.shape[0], rank * experts))
    return truncated, errors


def _truncated(A: torch.Tensor, B: torch.Tensor, scale: float, rank: int,
               new_scale: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A (rank, in), B (out, rank), relative Frobenius error): the best rank-`rank` approximation of scale * B @ A."""
    U, S, Vh = factored_svd(A, B, scale)
    total = float(S.norm())
    k = min(rank, len(S))
    root = (S[:k] / new_scale).sqrt()  # (k,)
    new_B = torch.zeros(B.shape[0], rank, dtype=torch.float64)
    new_A = torch.zeros(rank, A.shape[1], dtype=torch.float64)
    new_B[:, :k] = U[:, :k] * root  # (out, k)
    new_A[:k] = root[:, None] * Vh[:k]  # (k, in)
    error = float(S[rank:].norm()) / total if total > 0 else 0.0
    return new_A.float().contiguous(), new_B.float().contiguous(), error
