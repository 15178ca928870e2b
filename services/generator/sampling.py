"""Choosing each row's next token in a running batch whose rows have different sampling parameters.

The same warpers as `generate` (temperature, top-k, top-p, min-p, in HF's order, HF's formulas), applied with (rows,
1) parameter tensors to the rows that use them, so a batch of plain sampling rows costs one softmax and one draw.
Greedy rows take the argmax. Draws use the row's own torch.Generator when it has one (seeded requests), else torch's
default generator.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from services.generator.engine import SamplingParams


def _rows(which: list[int], device) -> torch.Tensor:
    return torch.tensor(which, dtype=torch.long, device=device)


class RowSampler:
    """Built once per batch membership (rows joining or leaving), used every step."""

    def __init__(self, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None], device):
        self.size = len(params)
        greedy = [i for i, p in enumerate(params) if not p.do_sample]
        sampled = [i for i, p in enumerate(params) if p.do_sample]
        self.greedy = _rows(greedy, device) if greedy else None
        self.all_greedy = len(greedy) == self.size
        self.sampled = _rows(sampled, device) if sampled else None
        sp = [params[i] for i in sampled]  # below, row numbers are positions in `sampled`

        def column(values) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)[:, None]

        self.temperature = column([p.temperature for p in sp]) if any(p.temperature != 1.0 for p in sp) else None
        k_rows = [j for j, p in enumerate(sp) if p.top_k > 0]
        ks = [min(sp[j].top_k, 2**31) for j in k_rows]  # past the vocabulary means all of it
        self.top_k = (_rows(k_rows, device), _rows(ks, device)) if k_rows else None
        p_rows = [j for j, p in enumerate(sp) if p.top_p < 1.0]
        self.top_p = (_rows(p_rows, device), column([sp[j].top_p for j in p_rows])) if p_rows else None
        m_rows = [j for j, p in enumerate(sp) if p.min_p > 0]
        self.min_p = (_rows(m_rows, device), column([sp[j].min_p for j in m_rows])) if m_rows else None
        groups: dict[int, tuple[torch.Generator | None, list[int]]] = {}
        for j, i in enumerate(sampled):  # one draw per generator: rows of one seeded request draw together
            groups.setdefault(id(generators[i]), (generators[i], []))[1].append(j)
        self.draws = [(g, _rows(js, device) if len(groups) > 1 else None) for g, js in groups.values()]

    def choose(self, scores: torch.Tensor) -> torch.Tensor:
        """(B, V) processed float scores -> (B,) token ids."""
        if self.all_greedy:
            return scores.argmax(-1)
        out = torch.empty(self.size, dtype=torch.long, device=scores.device)
        if self.greedy is not None:
            out[self.greedy] = scores[self.greedy].argmax(-1)
        s = scores[self.sampled] if self.greedy is not None else scores
        if self.temperature is not None:
            s = s / self.temperature
        if self.top_k is not None:
            s = self._top_k(s, *self.top_k)
        if self.top_p is not None:
            s = self._top_p(s, *self.top_p)
        if self.min_p is not None:
            s = self._min_p(s, *self.min_p)
        probs = torch.softmax(s, dim=-1)
        chosen = torch.empty(probs.shape[0], dtype=torch.long, device=scores.device)
        for generator, rows in self.draws:
            part = probs if rows is None else probs[rows]
            drawn = torch.multinomial(part, 1, generator=generator)[:, 0]
            if rows is None:
                chosen = drawn
            else:
                chosen[rows] = drawn
        out[self.sampled] = chosen
        return out

    @staticmethod
    def _top_k(s: torch.Tensor, rows: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        sub = s[rows]
        k = k.clamp(max=sub.shape[-1])
        kth = sub.topk(int(k.max()), dim=-1).values.gather(1, (k - 1)[:, None])  # (r, 1)
        s[rows] = sub.masked_fill(sub < kth, -float("inf"))
        return s

    @staticmethod
    def _top_p(s: torch.Tensor, rows: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
        sub = s[rows]
        ordered, order = torch.sort(sub, descending=False)
        remove = ordered.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        remove[..., -1:] = False  # the most likely token always stays
        s[rows] = sub.masked_fill(remove.scatter(1, order, remove), -float("inf"))
        return s

    @staticmethod
    def _min_p(s: torch.Tensor, rows: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
        sub = s[rows]
        probs = torch.softmax(sub, dim=-1)
        remove = probs < min_p * probs.amax(dim=-1, keepdim=True)  # never the most likely token
        s[rows] = sub.masked_fill(remove, -float("inf"))
        return s
