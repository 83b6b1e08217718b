"""What did the adapter learn? The singular values of every LoRA update, and rank truncation.

    dW = scale * B @ A,   B (out, r), A (r, in)
    B = Qb Rb,  A.T = Qa Ra                       (thin QR: Qb (out, r), Qa (in, r), Rb, Ra (r, r))
    dW = Qb (scale * Rb Ra.T) Qa.T = (Qb Uc) S (Vc.T Qa.T)     with  scale * Rb Ra.T = Uc S Vc.T  (r x r SVD)

so the SVD of an (out, in) update costs two thin QRs and one r x r SVD, and dW itself is never formed. All of it
runs in fp64 on the CPU: the factors are small, and sigma_r of a nearly rank-deficient update needs the digits.

Energy is the sum of squared singular values (= ||dW||_F^2); "the rank that holds 90%" is the smallest k whose
top-k singular values hold 90% of it. By Eckart-Young the best rank-k approximation keeps the top k triplets, and
its relative Frobenius error is sqrt(sum of the discarded sigma^2) / ||dW||_F.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qlora_trainer import atomic
from qlora_trainer.adapter import CONFIG_FILE, OURS_FILE, WEIGHTS_FILE, Adapter, read_adapter, write_adapter_files
from qlora_trainer.errors import UserError
from qlora_trainer.lora import LoRALinear, lora_modules, lora_scale

ENERGY_LEVELS = (0.90, 0.99)
VERDICT_SHARE = 0.95  # the verdict's rank must hold 99% of the energy in at least this share of modules
KIND_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
              "c_attn", "c_proj", "c_fc")  # LLaMA family, then GPT-2; anything else sorts after, by name


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
    name: str  # module path, e.g. model.layers.3.self_attn.q_proj
    sigma: torch.Tensor  # (k,) fp64, descending
    r: int
    base_norm: float | None = None  # ||W||_F of the dequantized base weight, with --base

    @property
    def kind(self) -> str:
        return self.name.rsplit(".", 1)[-1]

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
        return energy_rank(self.sigma, 0.90)

    @property
    def rank99(self) -> int:
        return energy_rank(self.sigma, 0.99)

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


def spectra(weights: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float, r: int) -> list[ModuleSpectrum]:
    """One ModuleSpectrum per module of {module path: (A (r, in), B (out, r))}, in table order."""
    found = [ModuleSpectrum(name, factored_svd(A, B, scale)[1], r) for name, (A, B) in weights.items()]
    return sorted(found, key=_table_key)


def model_spectra(model: nn.Module) -> list[ModuleSpectrum]:
    """The spectra of a model's LoRA layers (after training, before or without saving)."""
    layers = lora_modules(model)
    return sorted((ModuleSpectrum(name, factored_svd(layer.lora_A, layer.lora_B, layer.scale)[1], layer.r)
                   for name, layer in layers.items()), key=_table_key)


def _table_key(spectrum: ModuleSpectrum):
    kind = spectrum.kind
    rank = KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER)
    return rank, kind, -1 if spectrum.layer is None else spectrum.layer, spectrum.name


def _next_power_of_two(k: int) -> int:
    return 1 << max(k - 1, 0).bit_length()


def verdict(found: list[ModuleSpectrum]) -> str:
    """One line: the rank that holds 99% of the energy in 95% of the modules, and the rank that would likely do."""
    if not found:
        return "no LoRA modules to inspect"
    r = max(s.r for s in found)
    ranks = sorted(s.rank99 for s in found)
    if ranks[-1] == 0:
        return f"every update is zero (B = 0 in all {len(found)} modules): the adapter has not been trained"
    k = ranks[min(len(ranks) - 1, math.ceil(VERDICT_SHARE * len(ranks)) - 1)]
    share = 100.0 * sum(rank <= k for rank in ranks) / len(ranks)
    head = f"99% of the energy fits in rank {k} of {r} in {share:.0f}% of modules"
    suggestion = min(_next_power_of_two(max(k, 1)), r)
    if suggestion >= r:
        return f"{head}: the rank is used in full, keep r={r} (a higher rank might help)"
    return f"{head}: a rank of {suggestion} would likely do"


# ------------------------------------------------------------------------------------------ report

def _fmt(value: float | None, spec: str) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf"
    if math.isnan(value):
        return "nan"
    return format(value, spec)


def table(found: list[ModuleSpectrum], top: int = 4) -> str:
    """Rows grouped by module type, then layer; each group ends with its mean/median row."""
    with_base = any(s.base_norm is not None for s in found)
    head = f"{'module':<10} {'layer':>5} {'r90':>4} {'r99':>4} {'s1/sr':>8} {'|dW|_F':>9}"
    head += f" {'|dW|/|W|':>9}" if with_base else ""
    head += f"  top singular values"
    lines = [head, "-" * len(head)]
    kinds = list(dict.fromkeys(s.kind for s in found))
    for kind in kinds:
        group = [s for s in found if s.kind == kind]
        for s in group:
            row = (f"{kind:<10} {'-' if s.layer is None else s.layer:>5} {s.rank90:>4} {s.rank99:>4} "
                   f"{_fmt(s.condition, '8.1f'):>8} {s.norm:>9.3g}")
            row += f" {_fmt(s.relative, '9.2%'):>9}" if with_base else ""
            row += "  " + " ".join(f"{float(v):.3g}" for v in s.sigma[:top])
            lines.append(row)
        if len(group) > 1:
            mean = lambda values: sum(values) / len(values)  # noqa: E731
            conds = sorted(s.condition for s in group)
            row = (f"{kind:<10} {'mean':>5} {mean([s.rank90 for s in group]):>4.1f} "
                   f"{mean([s.rank99 for s in group]):>4.1f} {_fmt(conds[len(conds) // 2], '8.1f'):>8} "
                   f"{mean([s.norm for s in group]):>9.3g}")
            if with_base:
                rel = [s.relative for s in group if s.relative is not None]
                row += f" {_fmt(mean(rel) if rel else None, '9.2%'):>9}"
            lines.append(row)
    return "\n".join(lines)


def plot(found: list[ModuleSpectrum], path: str | os.PathLike) -> Path:
    """PNG: layers x module types coloured by the rank that holds 90% of the energy, and the mean normalized
    spectrum (sigma_i / sigma_1) per module type. Written to a temporary name, then renamed into place."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (matplotlib.ticker.MaxNLocator below)

    kinds = list(dict.fromkeys(s.kind for s in found))
    layers = sorted({s.layer for s in found if s.layer is not None}) or [None]
    grid = torch.full((len(layers), len(kinds)), float("nan"))
    for s in found:
        if s.layer in layers:
            grid[layers.index(s.layer), kinds.index(s.kind)] = s.rank90
    r = max(s.r for s in found)

    fig, (ax_map, ax_spec) = plt.subplots(1, 2, figsize=(11, max(3.5, 0.25 * len(layers) + 1.5)),
                                          gridspec_kw={"width_ratios": [max(len(kinds), 3), 4]})
    image = ax_map.imshow(grid.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=r, interpolation="nearest")
    ax_map.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right")
    ax_map.set_yticks(range(len(layers)), ["-" if layer is None else str(layer) for layer in layers])
    if len(layers) > 32:
        ax_map.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(16, integer=True))
    if len(layers) * len(kinds) <= 400:  # small enough to read: write each rank in its cell
        for (i, j), value in zip(torch.cartesian_prod(torch.arange(len(layers)), torch.arange(len(kinds))).tolist(),
                                 grid.flatten().tolist()):
            if not math.isnan(value):
                ax_map.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=8,
                            color="white" if value < 0.6 * r else "black")
    ax_map.set_ylabel("layer")
    ax_map.set_title(f"rank holding 90% of the energy (of r={r})")
    fig.colorbar(image, ax=ax_map)

    for kind in kinds:
        normalized = [_normalized(s.sigma, r) for s in found if s.kind == kind and float(s.sigma[0]) > 0]
        if normalized:
            ax_spec.plot(range(1, r + 1), torch.stack(normalized).mean(0).numpy(), marker=".", label=kind)
    ax_spec.set_yscale("log")
    ax_spec.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax_spec.set_xlabel("index i")
    ax_spec.set_ylabel("mean sigma_i / sigma_1")
    ax_spec.set_title("mean normalized spectrum")
    ax_spec.legend(fontsize="small")
    ax_spec.grid(True, alpha=0.3)
    fig.tight_layout()

    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{atomic.TMP_PREFIX}{final.name}-{os.getpid()}")
    try:
        fig.savefig(tmp, format="png", dpi=110)
        os.replace(tmp, final)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return final


def _normalized(sigma: torch.Tensor, r: int) -> torch.Tensor:
    """sigma / sigma_1, padded with a floor of 1e-12 to length r (log axis: zeros cannot be drawn)."""
    out = torch.full((r,), 1e-12, dtype=torch.float64)
    out[:len(sigma)] = (sigma / sigma[0]).clamp_min(1e-12)
    return out


# ------------------------------------------------------------------------------------------ base norms

def attach_base_norms(found: list[ModuleSpectrum], adapter: Adapter, base: str | os.PathLike, *,
                      device: str | None = None) -> None:
    """Set base_norm = ||W||_F of each module's dequantized NF4 base weight (the weight training saw)."""
    from qlora_trainer import quant
    from qlora_trainer.adapter import _check_shapes, check_base_fingerprint
    from qlora_trainer.loading import load_quantized

    from qlora_trainer.classify import num_labels_of_adapter

    classifier = adapter.config.get("task_type") == "SEQ_CLS"  # its head is checked against a classifier's
    model = load_quantized(base, compute_dtype=adapter.compute_dtype, device=device, progress=False,
                           task="classification" if classifier else "causal_lm",
                           num_labels=num_labels_of_adapter(adapter) if classifier else None)
    check_base_fingerprint(adapter, model)
    _check_shapes(model, adapter, Path(adapter.path or ".") / WEIGHTS_FILE)
    for s in found:
        module = model.get_submodule(s.name)
        weight = quant.dequantize(module) if quant.is_nf4_linear(module) else module.weight
        s.base_norm = float(weight.detach().double().norm())


# ------------------------------------------------------------------------------------------ truncation

def truncate(adapter: Adapter, rank: int) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, float],
                                                   float]:
    """The best rank-`rank` approximation of every module's update (Eckart-Young) as new LoRA factors.

    Returns ({module: (A (rank, in), B (out, rank))}, {module: relative Frobenius error}, new scale). lora_alpha
    and use_rslora stay as they were, so the new scale is lora_scale(rank, alpha); each factor takes
    sqrt(sigma / scale) of the kept singular values, so the two halves have the same size."""
    if rank < 1 or rank > adapter.r:
        raise UserError(f"--truncate-rank {rank}: must be between 1 and the adapter's rank r={adapter.r}")
    scale = lora_scale(rank, adapter.alpha, adapter.use_rslora)
    weights, errors = {}, {}
    for name, (A, B) in adapter.weights.items():
        U, S, Vh = factored_svd(A, B, adapter.scale)
        total = float(S.norm())
        errors[name] = float(S[rank:].norm()) / total if total > 0 else 0.0
        k = min(rank, len(S))
        root = (S[:k] / scale).sqrt()  # (k,)
        new_B = torch.zeros(B.shape[0], rank, dtype=torch.float64)
        new_A = torch.zeros(rank, A.shape[1], dtype=torch.float64)
        new_B[:, :k] = U[:, :k] * root  # (out, k)
        new_A[:k] = root[:, None] * Vh[:k]  # (k, in)
        weights[name] = (new_A.float().contiguous(), new_B.float().contiguous())
    return weights, errors, scale


def write_truncated(adapter: Adapter, rank: int, out: str | os.PathLike) -> dict[str, float]:
    """Write the rank-`rank` truncation of `adapter` as an adapter folder in PEFT's layout, atomically, through
    adapter.py's writer: the config (target_modules, task, ...), the base fingerprint, the compute dtype,
    modules_to_save tensors and tokenizer files carry over; only r and the factors change. Returns the errors."""
    final = Path(out)
    source = Path(adapter.path) if adapter.path is not None else None
    if source is not None and final.resolve() == source.resolve():
        raise UserError(f"--out {final}: is the adapter being truncated: choose another folder")
    if final.exists() and not (final.is_dir() and ((final / CONFIG_FILE).is_file() or not any(final.iterdir()))):
        raise UserError(f"{final}: exists and is not an adapter folder; refusing to replace it: "
                        "choose another --out or remove it")
    weights, errors, _ = truncate(adapter, rank)
    holder = _FactorHolder(weights, adapter.extra, rank, adapter.alpha, adapter.use_rslora, adapter.compute_dtype)
    config = adapter.config
    settings = dict(base_model_name_or_path=config.get("base_model_name_or_path") or "", r=rank, alpha=adapter.alpha,
                    dropout=float(config["lora_dropout"]), use_rslora=adapter.use_rslora,
                    task_type=config.get("task_type") or "CAUSAL_LM", fingerprint=adapter.fingerprint or {},
                    extra_config={**config, "r": rank})
    if getattr(adapter, "classifier", None):
        settings["classifier"] = adapter.classifier

    def write(folder: Path) -> None:
        write_adapter_files(holder, folder, **settings)
        if adapter.fingerprint is None:
            (folder / OURS_FILE).unlink()  # a source from PEFT has no record of ours, so neither has its truncation
        for extra in source.iterdir() if source is not None else []:  # a tokenizer saved with the adapter
            if extra.is_file() and extra.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                shutil.copy2(extra, folder / extra.name)

    atomic.write_folder(final, write)
    return errors


class _FactorHolder(nn.Module):
    """The least of a model that write_adapter_files needs: LoRA layers (over weightless meta-device linears)
    holding the given factors at the adapter's module paths, the modules_to_save tensors at theirs, and an input
    embedding whose dtype is the compute dtype the adapter records."""

    def __init__(self, weights: dict[str, tuple[torch.Tensor, torch.Tensor]], extra: dict[str, torch.Tensor],
                 r: int, alpha: float, use_rslora: bool, compute_dtype: str | None):
        super().__init__()
        for path, (A, B) in weights.items():
            layer = LoRALinear(nn.Linear(A.shape[1], B.shape[0], bias=False, device="meta"), r, alpha,
                               use_rslora=use_rslora)
            layer.lora_A, layer.lora_B = nn.Parameter(A), nn.Parameter(B)
            self._parent_of(path).add_module(path.rpartition(".")[2], layer)
        for name, value in extra.items():
            module_path, _, param = name.rpartition(".")
            owner = self._parent_of(module_path + ".x")
            leaf = module_path.rpartition(".")[2]
            if not hasattr(owner, leaf):
                owner.add_module(leaf, nn.Module())
            getattr(owner, leaf).register_parameter(param, nn.Parameter(value))
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(compute_dtype or "", torch.float32)
        self.embedding = nn.Embedding(1, 1, device="meta", dtype=dtype)

    def _parent_of(self, path: str) -> nn.Module:
        module: nn.Module = self
        for part in path.split(".")[:-1]:
            if not hasattr(module, part):
                module.add_module(part, nn.Module())
            module = getattr(module, part)
        return module

    def get_input_embeddings(self) -> nn.Module:
        return self.embedding


def error_table(errors: dict[str, float]) -> str:
    found = sorted((ModuleSpectrum(name, torch.ones(1), 1) for name in errors), key=_table_key)
    lines = [f"{'module':<10} {'layer':>5} {'rel. error':>10}"]
    for s in found:
        lines.append(f"{s.kind:<10} {'-' if s.layer is None else s.layer:>5} {errors[s.name]:>10.2%}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ CLI

def run_inspect_command(args: argparse.Namespace) -> int:
    """`qlora-trainer inspect` (flags in cli.py)."""
    if (args.truncate_rank is None) != (args.out is None):
        raise UserError("--truncate-rank K and --out DIR go together: give both to write a truncated adapter")
    adapter = read_adapter(args.adapter)
    found = spectra(adapter.weights, adapter.scale, adapter.r)
    if args.base is not None:
        attach_base_norms(found, adapter, args.base, device=args.device)
    print(f"{adapter.path}: {len(found)} LoRA modules, r={adapter.r}, lora_alpha={adapter.alpha:g}, "
          f"scale={adapter.scale:g}")
    print(table(found))
    print(verdict(found))
    if args.plot is not None:
        print(f"plot: {plot(found, args.plot)}")
    if args.truncate_rank is not None:
        errors = write_truncated(adapter, args.truncate_rank, args.out)
        print(f"\nrank {args.truncate_rank} truncation, relative Frobenius error ||dW - dW_k||_F / ||dW||_F:")
        print(error_table(errors))
        values = list(errors.values())
        print(f"wrote {args.out}: rank {args.truncate_rank} of {adapter.r}; "
              f"error mean {sum(values) / len(values):.2%}, max {max(values):.2%}")
    return 0
