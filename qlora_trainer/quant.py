"""The bitsandbytes boundary: NF4 4-bit storage and the 8-bit optimizers. The only module that imports bitsandbytes,
so a second backend (torchao NF4, a fused kernel) is one file.

Every quantized weight is NF4 with double quantization (the absmax of each 64-value block is itself
quantized to 8 bits) and blocksize 64: the settings of the QLoRA paper and of transformers'
`BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)`,
so our packed weights are bit-identical to what transformers produces for the same checkpoint.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its CPU path warns about optional kernels
import bitsandbytes as bnb  # noqa: E402
import bitsandbytes.functional as bnbf  # noqa: E402

from qlora_trainer.names import NF4_BLOCKSIZE as BLOCKSIZE  # noqa: E402

QUANT_TYPE = "nf4"
DOUBLE_QUANT = True


def new_nf4_linear(in_features: int, out_features: int, bias: bool, compute_dtype: torch.dtype) -> nn.Module:
    """An empty 4-bit linear on the meta device; its weight arrives later through `quantize_into`."""
    if in_features % BLOCKSIZE:
        # bitsandbytes' CPU kernels need whole blocks per row; every real LLaMA shape has them.
        raise ValueError(f"in_features={in_features} is not a multiple of the NF4 blocksize {BLOCKSIZE}")
    module = bnb.nn.Linear4bit(
        in_features, out_features, bias=bias, compute_dtype=compute_dtype,
        compress_statistics=DOUBLE_QUANT, quant_type=QUANT_TYPE, quant_storage=torch.uint8, device="meta",
    )
    # On CPU in eval/no-grad mode bitsandbytes would repack the weight for a bf16 kernel: ~4e-3 relative
    # error, and the repacked weight no longer dequantizes. We always want the exact NF4 product.
    module.support_avx512bf16_for_cpu = False
    module.requires_grad_(False)
    return module


def is_nf4_linear(module: nn.Module) -> bool:
    return isinstance(module, bnb.nn.Linear4bit)


def is_nf4_param(param: torch.Tensor) -> bool:
    """A packed 4-bit weight (two values per byte)."""
    return isinstance(param, bnb.nn.Params4bit)


# Quantize this many values per call: bitsandbytes' CPU kernel makes temporaries several times the size of
# its input, so a whole 4096 x 14336 weight at once would cost hundreds of MB of host memory.
CHUNK = 1 << 20


def quantize_nf4(weight: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, "bnbf.QuantState"]:
    """NF4 + double quantization of `weight` cast to `dtype` (default: its own), bit-identical to
    `bnbf.quantize_4bit(weight.to(dtype), blocksize=64, compress_statistics=True, quant_type="nf4")` but done
    in chunks of whole blocks, cast chunk by chunk, so no full-size temporary ever exists.

    The first level (4-bit codes + one absmax per 64 values) is independent per block; the second level
    quantizes all the absmax values together, exactly as bitsandbytes does."""
    dtype = dtype or weight.dtype
    flat = weight.contiguous().view(-1)
    packed, absmax = [], []
    for start in range(0, flat.numel(), CHUNK):
        chunk = flat[start:start + CHUNK].to(dtype)
        p, a = torch.ops.bitsandbytes.quantize_4bit.default(chunk, BLOCKSIZE, QUANT_TYPE, torch.uint8)
        packed.append(p)
        absmax.append(a)
    absmax = torch.cat(absmax)
    offset = absmax.mean()
    qabsmax, state2 = bnbf.quantize_blockwise(absmax - offset, blocksize=256)
    state = bnbf.QuantState(absmax=qabsmax, shape=weight.shape, dtype=dtype, blocksize=BLOCKSIZE,
                            code=bnbf.get_4bit_type(QUANT_TYPE, device=weight.device), quant_type=QUANT_TYPE,
                            offset=offset, state2=state2)
    return torch.cat(packed), state


def quantize_into(module: nn.Module, weight: torch.Tensor, device: torch.device | str,
                  dtype: torch.dtype | None = None) -> None:
    """Quantize a full-precision (out, in) weight, cast to `dtype`, on `device`; install it in a 4-bit linear."""
    packed, state = quantize_nf4(weight.to(device), dtype)
    module.weight = bnb.nn.Params4bit(
        packed, requires_grad=False, quant_state=state, blocksize=BLOCKSIZE, compress_statistics=DOUBLE_QUANT,
        quant_type=QUANT_TYPE, quant_storage=torch.uint8, module=module, bnb_quantized=True,
    )
    module.quant_state = state


def quantize_nf4_parts(weight: torch.Tensor, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """quantize_nf4 as plain tensors, for storage that is not a Linear4bit (NF4 experts, one expert at a time):
    packed (uint8 codes, two per byte), absmax (uint8, one per 64 values), absmax2 (fp32, one per 256 absmax),
    offset (fp32 scalar). The two code tables are the same for every weight (nf4_code_tables)."""
    packed, state = quantize_nf4(weight, dtype)
    return {"packed": packed.view(-1), "absmax": state.absmax, "absmax2": state.state2.absmax,
            "offset": state.offset.reshape(())}


def nf4_code_tables(device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(the NF4 code, the 8-bit dynamic code of the double quantization's second level)."""
    return bnbf.get_4bit_type(QUANT_TYPE, device=device), bnbf.create_dynamic_map(signed=True).to(device)


def dequantize_nf4_parts(packed: torch.Tensor, absmax: torch.Tensor, absmax2: torch.Tensor, offset: torch.Tensor,
                         shape: torch.Size, dtype: torch.dtype, code: torch.Tensor,
                         code2: torch.Tensor) -> torch.Tensor:
    """The weight of quantize_nf4_parts back, in `dtype` (what it was cast to before quantizing)."""
    state2 = bnbf.QuantState(absmax=absmax2, code=code2, blocksize=256, dtype=torch.float32)
    state = bnbf.QuantState(absmax=absmax, shape=torch.Size(shape), dtype=dtype, blocksize=BLOCKSIZE, code=code,
                            quant_type=QUANT_TYPE, offset=offset, state2=state2)
    return bnbf.dequantize_4bit(packed.view(-1, 1), state)


def dequantize(module: nn.Module) -> torch.Tensor:
    """The weight a 4-bit linear actually computes with, (out, in), in the dtype it was quantized from."""
    return bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state)


def quantize_dequantize(weight: torch.Tensor) -> torch.Tensor:
    """Round-trip a weight through NF4 exactly as loading does: what training saw instead of `weight`."""
    return bnbf.dequantize_4bit(*quantize_nf4(weight))


def quantized_bytes(module: nn.Module) -> int:
    """Bytes held by a 4-bit linear: packed weight plus its (double-quantized) statistics: the absmax per block, the
    code table, and with double quantization the offset and the second level's absmax and code."""
    state = module.weight.quant_state
    tensors = [module.weight.data, state.absmax, state.code]
    if state.nested:
        tensors += [state.offset, state.state2.absmax, state.state2.code]
    return sum(t.numel() * t.element_size() for t in tensors)


def store_as(model: nn.Module, dtype: torch.dtype) -> int:
    """Re-label the packed NF4 bytes of every 4-bit linear as `dtype` (bitsandbytes' `quant_storage`) without
    touching a bit: FSDP shards only float tensors, so FSDP-QLoRA stores the packed weight in the compute dtype (the
    documented bitsandbytes path). bitsandbytes' kernels view such storage back as uint8. Returns the layers changed."""
    changed = 0
    for module in model.modules():
        if not is_nf4_linear(module) or module.weight.dtype == dtype:
            continue
        weight = module.weight
        packed = weight.data.reshape(-1).view(torch.uint8).view(dtype).unsqueeze(1)  # (bytes / itemsize, 1)
        module.weight = bnb.nn.Params4bit(
            packed, requires_grad=False, quant_state=weight.quant_state, blocksize=BLOCKSIZE,
            compress_statistics=DOUBLE_QUANT, quant_type=QUANT_TYPE, quant_storage=dtype, module=module,
            bnb_quantized=True,
        )
        module.quant_storage = dtype
        changed += 1
    return changed


def packed_bytes(module: nn.Module) -> int:
    """Bytes of a 4-bit linear's packed weight as this process holds it (its shard under FSDP)."""
    data = module.weight.data
    local = data.to_local() if hasattr(data, "to_local") else data  # an FSDP2 shard is a DTensor
    return local.numel() * local.element_size()


def make_optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """adamw (torch, fp32 state), adamw_8bit or paged_adamw_8bit (bitsandbytes, 8-bit state)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw_8bit":
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    if name == "paged_adamw_8bit":
        return bnb.optim.PagedAdamW8bit(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}")
