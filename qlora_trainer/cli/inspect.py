"""`qlora-trainer inspect ADAPTER`: the spectrum of every LoRA update, a verdict on the rank, a plot, truncation."""

from __future__ import annotations

import argparse

from qlora_trainer.errors import UserError

HELP = "what the adapter learned: the spectrum of every LoRA update; rank truncation"
# argparse %-formats help= strings (so they write %%) but not a description without %(prog)s (so it writes %).
DESCRIPTION = ("Singular values of each module's update scale * B @ A (from QRs of B and A.T and an r x r SVD), the "
               "ranks holding 90%/99% of the energy, a verdict on the rank, and optionally a plot or a rank-K "
               "truncated adapter.")
FLAGS = {"adapter": "ADAPTER"}  # the adapter folder is the positional argument here


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--base", default=None, help="base model folder: adds ||dW||_F / ||W||_F against the "
                                                "dequantized base weight")
    p.add_argument("--plot", default=None, metavar="OUT.png", help="write a PNG: layers x module types coloured "
                                                                   "by the 90%%-energy rank, and the mean spectrum")
    p.add_argument("--truncate-rank", type=int, default=None, metavar="K",
                   help="write the best rank-K approximation of every update (needs --out)")
    p.add_argument("--out", default=None, help="output adapter folder for --truncate-rank")
    p.add_argument("--device", default=None, help="device for loading --base: cuda, cpu (default: cuda if available)")


def run(args: argparse.Namespace) -> int:
    from qlora_trainer.adapter import read_adapter
    from qlora_trainer.inspect_adapter import attach_base_norms, error_table, plot, table, write_truncated
    from qlora_trainer.spectrum import spectra, verdict

    if (args.truncate_rank is None) != (args.out is None):
        raise UserError("--truncate-rank K and --out DIR go together: give both to write a truncated adapter")
    adapter = read_adapter(args.adapter)
    found = spectra(adapter.weights, adapter.scale, adapter.r, adapter.experts)
    if args.base is not None:
        from qlora_trainer import progress

        attach_base_norms(found, adapter, args.base, device=args.device, progress=progress.bars())
    per_expert = sum(s.expert is not None for s in found)
    experts = f" and {len(adapter.experts)} expert weights ({per_expert} experts)" if adapter.experts else ""
    print(f"{adapter.path}: {len(found) - per_expert} LoRA modules{experts}, r={adapter.r}, "
          f"lora_alpha={adapter.alpha:g}, scale={adapter.scale:g}")
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
