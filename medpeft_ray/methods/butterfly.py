"""A torch implementation of BOFT's block-diagonal assembly, in place of peft's CUDA extension.

peft builds the block-diagonal matrix of BOFT's butterfly factors with a CUDA extension that it
compiles on first use. Where that compilation fails (no nvcc, a CPU machine) peft does not fail:
it warns, sets the butterfly factor to 1 (plain OFT, other parameter shapes) and tries to
compile again for the next layer. The same config would then train a different method
depending on the machine, and its checkpoints would not load across machines. Handing peft this
torch implementation as "the extension" keeps every factor on every machine, and costs no
compilation.
"""

from __future__ import annotations

import torch


class TorchBlockDiagonal:
    """What peft's ``FastBlockDiag`` calls on its extension: ``forward`` and ``backward``, each returning a list."""

    @staticmethod
    def forward(blocks: torch.Tensor) -> list[torch.Tensor]:
        """(factors, n, b, b) blocks -> [(factors, n*b, n*b)] block-diagonal matrices."""
        factors, count, size, _ = blocks.shape
        out = blocks.new_zeros(factors, count, size, count, size)
        index = torch.arange(count, device=blocks.device)
        out[:, index, :, index, :] = blocks.transpose(0, 1)  # advanced indices first: (n, factors, b, b)
        return [out.reshape(factors, count * size, count * size)]

    @staticmethod
    def backward(grad: torch.Tensor, blocks: torch.Tensor) -> list[torch.Tensor]:
        """The gradient of the diagonal blocks: the matching blocks of ``grad``."""
        factors, count, size, _ = blocks.shape
        diagonal = grad.reshape(factors, count, size, count, size).diagonal(dim1=1, dim2=3)  # (f, b, b, n)
        return [diagonal.permute(0, 3, 1, 2).contiguous()]


def use_torch_block_diagonal() -> None:
    """Makes peft's BOFT layers use :class:`TorchBlockDiagonal` (where no extension is loaded yet)."""
    from peft.tuners.boft import layer

    if getattr(layer, "_FBD_CUDA", None) is None:
        layer._FBD_CUDA = TorchBlockDiagonal
