"""The running batch's tensors: one KV cache for every row decoding together, rows joining and leaving between steps.

Rows are left-padded to a common width W: the cache holds (B, heads, W, head_dim) per layer and `mask` (B, W) says
which columns are real. Each row's positions come from its own count of real tokens, so a row sees exactly what it
would see alone: its prompt and its own tokens, at the positions `generate` gives them. Joining rows are prefilled
(together, left-padded) and concatenated on the batch axis after padding the narrower side on the left; leaving rows
are index-selected away and the leading columns no row needs any more are trimmed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache


class KVBatch:
    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # (B, W) 1 = real column
        self.next_pos: torch.Tensor | None = None  # (B,) position of each row's next token

    @property
    def size(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
                 cache: DynamicCache | None) -> tuple[torch.Tensor, DynamicCache]:
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
                         logits_to_keep=1)  # only the last position's logits: a prompt's others are never read
        return out.logits[:, -1].float(), out.cache  # (B, V) as `generate` reads them: float32

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed each row its last token (B,); returns the next logits (B, V)."""
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.size, 1))], dim=1)
        logits, self.cache = self._forward(tokens[:, None], self.mask, self.next_pos[:, None], self.cache)
        self.next_pos = self.next_pos + 1
        return logits

    def join(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Prefill left-padded prompts (b, T) with their mask and append them as rows; returns their logits (b, V)."""
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # padding's positions are never attended to
        logits, cache = self._forward(ids, mask, pos, None)
        if self.cache is None:
            self.cache, self.mask, self.next_pos = cache, mask, mask.sum(-1)
            return logits
        width = max(self.mask.shape[1], mask.shape[1])

        def left(t: torch.Tensor, dim_from_end: int) -> torch.Tensor:  # pad to `width` on the left of that axis
            missing = width - t.shape[-dim_from_end]
            return F.pad(t, (0, 0) * (dim_from_end - 1) + (missing, 0)) if missing else t

        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([left(mine.keys, 2), left(theirs.keys, 2)])
            mine.values = torch.cat([left(mine.values, 2), left(theirs.values, 2)])
        self.mask = torch.cat([left(self.mask, 1), left(mask, 1)])
        self.next_pos = torch.cat([self.next_pos, mask.sum(-1)])
        return logits

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (in this order); drop the columns that are padding in all of them."""
        if not rows:
            self.cache = self.mask = self.next_pos = None
            return
        idx = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, idx)
        lead = int(mask.any(0).int().argmax())  # leading columns no kept row uses
        self.mask, self.next_pos = mask[:, lead:], self.next_pos.index_select(0, idx)
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, idx)[:, :, lead:]
            layer.values = layer.values.index_select(0, idx)[:, :, lead:]
