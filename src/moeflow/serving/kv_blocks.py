"""A KV cache in fixed-size blocks under a memory budget (vLLM's PagedAttention layout,
Kwon et al., SOSP'23).

The keys and values of every layer live in one pool of ``num_blocks`` blocks of
``block_size`` token positions. A sequence owns a list of blocks (its block table row);
position ``p`` of the sequence sits at offset ``p % block_size`` of its block
``p // block_size``. Blocks are taken as a sequence grows and returned when it leaves or is
preempted, so memory is bounded by the pool and never fragmented by sequence length.

:class:`PagedKVCache` has :class:`moeflow.models.KVCache`'s interface
(``write_and_read(layer, rows_B, pos_BT, k, v, upto)``), so :class:`moeflow.models.MoEDecoder`
runs over it unchanged: ``rows_B`` names block-table rows instead of dense slots. Reads
gather each sequence's blocks, whole blocks at a time (one ``index_select`` over the pool
viewed as (blocks, block_size, K, d): a few contiguous copies per sequence instead of an
index per position), into a contiguous (B, upto, K, d) tensor for
``scaled_dot_product_attention``; a fused paged-attention kernel that reads the blocks in
place is the GPU-side refinement. Table entries past a sequence's blocks point at a scratch
block outside the pool: padding positions of a batched prefill write there (never into
another sequence's block), and a query never reads them, since they are after it in causal
order and the mask keeps them out.
"""

from __future__ import annotations

import math
import os

import torch

from moeflow.errors import ConfigError
from moeflow.models import DecoderConfig
from moeflow.validate import is_int


def kv_bytes_per_token(cfg: DecoderConfig, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of keys and values one token position holds over all layers."""
    if cfg.attention == "mla":
        width = cfg.kv_lora_rank + cfg.head_dim
    else:
        width = 2 * cfg.num_kv_heads * cfg.head_dim
    return cfg.num_layers * width * torch.empty((), dtype=dtype).element_size()


def default_kv_cache_bytes(device) -> int:
    """The KV budget when none is given: 90% of a GPU's free memory (vLLM's default
    ``gpu_memory_utilization``, with the weights already loaded), a quarter of host memory
    on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.9)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows): 4 GiB
        return 4 << 30


class BlockPool:
    """Free list of block ids ``0 .. num_blocks-1`` (all-or-nothing allocation)."""

    def __init__(self, num_blocks: int):
        if not is_int(num_blocks) or num_blocks < 1:
            raise ConfigError("num_blocks", num_blocks, "an int >= 1")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int] | None:
        """``n`` block ids, or None (and nothing taken) when fewer are free."""
        if n > len(self._free):
            return None
        return [self._free.pop() for _ in range(n)]

    def release(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


class PagedKVCache:
    """Per-layer pools of (num_blocks * block_size) positions plus a block table with one
    row per running sequence (``max_seqs`` rows of ``ceil(max_len / block_size)`` entries)."""

    def __init__(
        self,
        cfg: DecoderConfig,
        num_blocks: int,
        block_size: int,
        max_seqs: int,
        dtype: torch.dtype = torch.float32,
        device=None,
    ):
        if not is_int(block_size) or block_size < 1:
            raise ConfigError("block_size", block_size, "an int >= 1")
        if not is_int(max_seqs) or max_seqs < 1:
            raise ConfigError("max_seqs", max_seqs, "an int >= 1")
        self.pool = BlockPool(num_blocks)
        self.block_size, self.max_len = block_size, cfg.max_position_embeddings
        self.scratch = num_blocks  # one more block, for writes past a sequence's blocks
        n = (num_blocks + 1) * block_size
        if cfg.attention == "mla":
            k_shape, v_shape = (n, 1, cfg.kv_lora_rank), (n, 1, cfg.head_dim)
        else:
            k_shape = v_shape = (n, cfg.num_kv_heads, cfg.head_dim)
        self.k = [torch.zeros(k_shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(v_shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.blocks_per_seq = math.ceil(self.max_len / block_size)
        self.table = torch.full(
            (max_seqs, self.blocks_per_seq), self.scratch, dtype=torch.long, device=device
        )

    def blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size)

    def assign(self, row: int, blocks: list[int]) -> None:
        """Give block-table row ``row`` the blocks ``blocks`` (positions 0 .. len*bs-1)."""
        self.table[row].fill_(self.scratch)
        self.table[row, : len(blocks)] = torch.tensor(blocks, dtype=torch.long)

    def _slots(self, rows_B: torch.Tensor, pos_BT: torch.Tensor) -> torch.Tensor:
        blk = self.table[rows_B.unsqueeze(1), pos_BT // self.block_size]
        return blk * self.block_size + pos_BT % self.block_size

    def write_and_read(self, layer, rows_B, pos_BT, k_BTKd, v_BTKd, upto):
        """Store the new keys/values at ``pos_BT`` of sequences ``rows_B`` and return their
        first ``upto`` positions, (B, K, upto, d) each."""
        slots = self._slots(rows_B, pos_BT)
        self.k[layer][slots] = k_BTKd.to(self.k[layer].dtype)
        self.v[layer][slots] = v_BTKd.to(self.v[layer].dtype)
        B, bs = rows_B.shape[0], self.block_size
        nb = math.ceil(upto / bs)
        blocks = self.table[rows_B, :nb].flatten()  # B*nb
        out = []
        for pool in (self.k[layer], self.v[layer]):
            x = pool.view(-1, bs, *pool.shape[1:]).index_select(0, blocks)
            out.append(x.view(B, nb * bs, *pool.shape[1:])[:, :upto].transpose(1, 2))
        return out[0], out[1]
