"""Tucker-decomposed product-key retrieval (TDQKR), REFERENCE.md section 2 steps 2-4 and 7.

A token brings r row queries and r column queries (each [Dk]). Against row keys and column keys
(each [r, n, Dk]) they give two score matrices S_row, S_col of shape [r, n]. With c Tucker cores
C_k [r, r], the exact score of grid cell (i, j) is G(i, j) = sum_k S_row[:, i]^T C_k S_col[:, j].

Scoring all n^2 cells is quadratic, so rows and columns are first pre-selected with the rank-1
approximation of sum_k C_k: its leading singular pair (u, v) ranks rows by u^T S_row[:, i] and
columns by v^T S_col[:, j]. The top `kr` of each give kr^2 candidates, scored exactly; the top m
of those are returned. With kr = n this is exactly brute force.

Sign convention: a singular pair is defined up to a joint flip (u, v) -> (-u, -v), which would
rank rows and columns in reverse. The sign is chosen for continuity: each layer keeps the last u it
used in a buffer saved with the model (`TuckerProductKeys.direction_ref`), and a new pair takes the
sign whose u is closest to it, so small changes of the cores never flip the ranking. The first pair
(an all-zero buffer: a new model) takes the sign that makes the entry of u with the largest
magnitude positive. A model reloaded from a checkpoint therefore retrieves exactly what it did
when saved. ("both_ends" pre-selection is the same for either sign and needs none of this.)

The pair is computed on the device without host synchronization (no `torch.linalg.svd`, whose
CUDA path waits for the host): closed form for r <= 2, repeated squaring of C^T C otherwise, and
only when the cores change (once per optimizer step, not per forward or micro-batch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ultramem.config import PRESELECT
from ultramem.precision import float32_region


def rms_norm(x: Tensor, gain: Tensor, eps: float = 1e-6) -> Tensor:
    """RMSNorm over the last dim with an affine gain."""
    return F.rms_norm(x.float(), (x.shape[-1],), gain.float(), eps).to(x.dtype)


@torch.no_grad()
def leading_singular_pair(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Leading singular pair (u, v) of a square matrix [r, r], each of unit norm, up to a joint
    sign; tensor ops only (no host synchronization on CUDA). M = 0: u = v = e_1.

    r = 1: (1, sign m). r = 2: v at angle theta = atan2(2b, a - c) / 2 for M^T M = [[a, b], [b, c]]
    (its leading eigenvector). r > 2: M^T M squared 40 times with renormalization converges to the
    projector on the leading right singular vector (any gap sigma_2 / sigma_1 < 1 - 1e-9), whose
    largest column is v. Then u = M v / |M v|.
    """
    m = matrix.double() if matrix.device.type != "mps" else matrix.float()
    r = m.shape[0]
    gram = m.T @ m  # [r, r]
    if r == 1:
        v = torch.where(m[0] < 0, -torch.ones_like(m[0]), torch.ones_like(m[0]))
    elif r == 2:
        theta = 0.5 * torch.atan2(2 * gram[0, 1], gram[0, 0] - gram[1, 1])
        v = torch.stack([torch.cos(theta), torch.sin(theta)])
    else:
        p = gram
        for _ in range(40):
            p = p / p.norm().clamp_min(torch.finfo(p.dtype).tiny)
            p = p @ p
        v = p[:, p.norm(dim=0).argmax()]
        v = gram @ v  # one more power step against round-off in the squares
        v = v / v.norm().clamp_min(torch.finfo(v.dtype).tiny)
        v = torch.where(v.norm() > 0, v, torch.eye(r, dtype=v.dtype, device=v.device)[0])
    mv = m @ v
    norm = mv.norm()
    e1 = torch.eye(r, dtype=m.dtype, device=m.device)[0]
    u = torch.where(norm > 0, mv / norm.clamp_min(torch.finfo(m.dtype).tiny), e1)
    return u.to(matrix.dtype), v.to(matrix.dtype)


@torch.no_grad()
def rank1_directions(cores: Tensor, ref: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Leading singular pair (u [r], v [r]) of sum_k C_k with the sign of the module docstring:
    u . ref > 0 for a previous direction ref; the largest-magnitude entry of u positive when ref is
    None, all zero or orthogonal to u."""
    u, v = leading_singular_pair(cores.detach().float().sum(0))
    first = torch.sign(u[torch.argmax(u.abs())])
    first = torch.where(first == 0, torch.ones_like(first), first)
    if ref is None:
        sign = first
    else:
        dot = torch.dot(u, ref.to(u.dtype))
        sign = torch.where(dot != 0, torch.sign(dot), first)
    return u * sign, v * sign


class TuckerProductKeys(nn.Module):
    """Row/column keys, Tucker cores and the query/key RMSNorm gains of one memory layer.

    Parameters: keys [2, r, n, Dk] (row keys, column keys), cores [c, r, r],
    query_gain [Dk] and key_gain [Dk] (their product sets the score scale, see `ultramem.init`).
    """

    def __init__(self, n_keys: int, key_dim: int, tucker_rank: int = 2, n_cores: int = 2):
        super().__init__()
        self.n_keys, self.key_dim = n_keys, key_dim
        self.tucker_rank, self.n_cores = tucker_rank, n_cores
        self.keys = nn.Parameter(torch.empty(2, tucker_rank, n_keys, key_dim))
        self.cores = nn.Parameter(torch.empty(n_cores, tucker_rank, tucker_rank))
        self.query_gain = nn.Parameter(torch.ones(key_dim))
        self.key_gain = nn.Parameter(torch.ones(key_dim))
        # the u of the last pre-selection pair, for the continuous sign rule (module docstring)
        self.register_buffer("direction_ref", torch.zeros(tucker_rank))
        self._frozen: dict[str, tuple] = {}  # name -> (stamp, value)

    def _cached(self, name: str, compute, *, also_with_grad: bool = False):
        """compute(), reused until keys, key gain or cores change (in place, e.g. an optimizer
        step or a load, or by moving to another device/dtype). Only without gradients (decoding)
        unless also_with_grad: a value that carries no gradient (the pre-selection directions)
        is then computed once per optimizer step, not once per forward and micro-batch."""
        if torch.is_grad_enabled() and not also_with_grad:
            return compute()
        params = (self.keys, self.key_gain, self.cores)
        stamp = tuple((p._version, p.data_ptr(), p.dtype, p.device) for p in params)
        hit = self._frozen.get(name)
        if hit is None or hit[0] != stamp:
            hit = self._frozen[name] = (stamp, compute())
        return hit[1]

    def normed_keys(self) -> Tensor:
        """RMSNorm(keys) with the key gain: [2, r, n, Dk]."""
        return self._cached("keys", lambda: rms_norm(self.keys, self.key_gain))

    def directions(self) -> tuple[Tensor, Tensor]:
        """The rank-1 pre-selection pair (u, v) of the summed cores, its sign continuous with
        the last one (no gradient; recomputed only when the cores change)."""
        return self._cached("directions", self._new_directions, also_with_grad=True)

    @torch.no_grad()
    def _new_directions(self) -> tuple[Tensor, Tensor]:
        u, v = rank1_directions(self.cores, self.direction_ref)
        self.direction_ref.copy_(u)
        return u, v

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written before the continuous sign rule have no direction_ref: start afresh
        state_dict.setdefault(prefix + "direction_ref", torch.zeros_like(self.direction_ref))
        self._frozen.clear()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- scores ---------------------------------------------------------------------------

    def row_col_scores(self, queries: Tensor) -> tuple[Tensor, Tensor]:
        """queries [T, 2, r, Dk] (row, col) -> S_row, S_col, each [T, r, n] in float32.

        Always float32, also under bf16 autocast or with bf16 weights: these scores decide which
        rows are read, and bf16's 8-bit mantissa would turn close scores into ties.
        """
        with float32_region(queries.device.type):
            q = rms_norm(queries.float(), self.query_gain)  # [T, 2, r, Dk]
            k = self.normed_keys().float()  # [2, r, n, Dk]
            # one batched matmul for rows and columns: [2, r, T, Dk] @ [2, r, Dk, n]
            s = torch.matmul(q.permute(1, 2, 0, 3), k.transpose(-1, -2))  # [2, r, T, n]
        return s[0].transpose(0, 1), s[1].transpose(0, 1)  # [T, r, n] each

    def grid_scores(self, s_row: Tensor, s_col: Tensor) -> Tensor:
        """Exact summed Tucker score of every cell: [T, n, n]."""
        with float32_region(s_row.device.type):
            core_sum = self.cores.float().sum(0)  # [r, r]
            return torch.einsum("tpi,pq,tqj->tij", s_row.float(), core_sum, s_col.float())

    def select(self, s_row: Tensor, s_col: Tensor, top_m: int, kr: int,
               preselect: str = "rank1") -> tuple[Tensor, Tensor]:
        """Pre-select kr rows and columns, score kr^2 cells exactly, keep the top m.

        preselect "rank1" (the paper's): the top kr rows by u^T S_row and columns by v^T S_col.
        "both_ends": also the bottom kr of each ranking, paired with each other (2 kr^2
        candidates): the summed score is close to sigma_1 (u^T S_row)(v^T S_col), as large when
        both factors are strongly negative, a quadrant rank-1 pre-selection never looks at
        (REFERENCE.md section 10). Both are exact with kr = n.

        Returns per-core scores [T, m, c] (sorted by their sum, descending) and grid cells
        [T, m] as i * n + j.
        """
        if preselect not in PRESELECT:
            raise ValueError(f"preselect must be one of {PRESELECT}, got {preselect!r}")
        with float32_region(s_row.device.type):  # scoring and top-m stay float32 (no ties)
            return self._select(s_row.float(), s_col.float(), top_m, kr, preselect)

    def _select(self, s_row: Tensor, s_col: Tensor, top_m: int, kr: int,
                preselect: str) -> tuple[Tensor, Tensor]:
        t, r, n = s_row.shape
        u, v = self.directions()
        # Choosing cells needs no gradient: rank the candidates by their summed score.
        with torch.no_grad():
            a, b = torch.matmul(u, s_row), torch.matmul(v, s_col)  # [T, n] rank-1 factors
            # which kr, not their order, matters here: unsorted top-k is ~25% cheaper on CPU
            row_idx = a.topk(kr, dim=-1, sorted=False).indices  # [T, kr]
            col_idx = b.topk(kr, dim=-1, sorted=False).indices  # [T, kr]
            cand = self._candidates(s_row, s_col, row_idx, col_idx)  # [T, kr * kr]
            if preselect == "rank1" or kr == n:
                pos = cand.topk(top_m, dim=-1).indices  # [T, m]
                rows = row_idx.gather(1, torch.div(pos, kr, rounding_mode="floor"))  # [T, m]
                cols = col_idx.gather(1, pos % kr)  # [T, m]
            else:  # both ends: the (-, -) quadrant's kr x kr candidates too
                row_lo = a.topk(kr, dim=-1, largest=False, sorted=False).indices  # [T, kr]
                col_lo = b.topk(kr, dim=-1, largest=False, sorted=False).indices  # [T, kr]
                low = self._candidates(s_row, s_col, row_lo, col_lo)  # [T, kr * kr]
                # with kr > n / 2 the two blocks share cells: keep each once (the first block's)
                top_row = torch.zeros_like(a, dtype=torch.bool).scatter_(1, row_idx, True)
                top_col = torch.zeros_like(b, dtype=torch.bool).scatter_(1, col_idx, True)
                dup = top_row.gather(1, row_lo).unsqueeze(2) & top_col.gather(1, col_lo)[:, None]
                low.masked_fill_(dup.view(t, -1), float("-inf"))
                pos = torch.cat([cand, low], 1).topk(top_m, dim=-1).indices  # [T, m]
                block, pos = torch.div(pos, kr * kr, rounding_mode="floor"), pos % (kr * kr)
                i, j = torch.div(pos, kr, rounding_mode="floor"), pos % kr
                rows = torch.where(block == 0, row_idx.gather(1, i), row_lo.gather(1, i))
                cols = torch.where(block == 0, col_idx.gather(1, j), col_lo.gather(1, j))
        # Per-core scores of the m chosen cells, with gradients: G_k = S_row[:, i]^T C_k S_col[:, j]
        return self.cell_scores(s_row, s_col, rows, cols), rows * n + cols

    def _candidates(self, s_row: Tensor, s_col: Tensor, row_idx: Tensor,
                    col_idx: Tensor) -> Tensor:
        """Summed Tucker scores of the cells row_idx x col_idx ([T, kr] each) -> [T, kr * kr].

        G(i, j) = S_row[:, i]^T (sum_k C_k) S_col[:, j] as r outer products (a batched matmul
        with inner size r is several times slower on CPU)."""
        t, r, _ = s_row.shape
        kr = row_idx.shape[1]
        s_row_k = s_row.gather(2, row_idx.unsqueeze(1).expand(t, r, kr))  # [T, r, kr]
        s_col_k = s_col.gather(2, col_idx.unsqueeze(1).expand(t, r, kr))  # [T, r, kr]
        core_col = torch.matmul(self.cores.float().sum(0), s_col_k)  # [T, r, kr]
        cand = s_row_k[:, 0, :, None] * core_col[:, 0, None, :]  # [T, kr, kr]
        for p in range(1, r):
            cand.addcmul_(s_row_k[:, p, :, None], core_col[:, p, None, :])
        return cand.view(t, kr * kr)

    def cell_scores(self, s_row: Tensor, s_col: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
        """Per-core Tucker scores G_k(i, j) of the cells (rows[t, s], cols[t, s]) -> [T, m, c].

        Broadcast products over the tiny r x r cores instead of batched matmuls with inner size r,
        which run far below the matmul units' speed.
        """
        t, r, _ = s_row.shape
        m = rows.shape[1]
        sr = s_row.gather(2, rows.unsqueeze(1).expand(t, r, m))  # [T, r, m]
        sc = s_col.gather(2, cols.unsqueeze(1).expand(t, r, m))  # [T, r, m]
        cores = self.cores.float()  # [c, r(p), r(q)]
        core_col = (cores[None, :, :, :, None] * sc[:, None, None]).sum(3)  # [T, c, r, m]
        return (sr.unsqueeze(1) * core_col).sum(2).transpose(1, 2)  # [T, m, c]

    # -- auxiliary losses (off by default) --------------------------------------------------

    def tucker_penalty(self, alpha: float, tau: float) -> Tensor:
        """alpha/(r-1) * sum_k sum_{i>=2} max(0, lambda_i(C_k) - tau)^2; 0 for r = 1."""
        r = self.tucker_rank
        if r == 1:
            return self.cores.sum() * 0.0
        cores = self.cores.float()
        # svdvals refuses non-finite input on CPU: take it of finite cores, and let a NaN or inf
        # core turn the penalty (so the loss) non-finite, a step the trainer skips
        finite = torch.isfinite(cores).all()
        sv = torch.linalg.svdvals(torch.where(finite, cores, torch.zeros_like(cores)))  # [c, r]
        penalty = alpha / (r - 1) * torch.relu(sv[:, 1:] - tau).pow(2).sum()
        return penalty + torch.where(finite, 0.0, float("nan")).to(penalty)

    def balance_loss(self, s_row: Tensor, s_col: Tensor, kr: int, beta: float) -> Tensor:
        """beta * n * sum_i f_i p_i over the rank-1 row and column rankings (summed)."""
        u, v = self.directions()
        total = s_row.new_zeros(())
        for direction, scores in ((u, s_row), (v, s_col)):
            logits = torch.einsum("r,trn->tn", direction, scores)  # [T, n]
            probs = logits.softmax(-1).mean(0)  # [n]
            picked = logits.detach().topk(kr, dim=-1).indices.reshape(-1)
            frac = torch.bincount(picked, minlength=self.n_keys).float() / picked.numel()
            total = total + self.n_keys * (frac * probs).sum()
        return beta * total


# -------------------------------------------------------------------- additive product keys


def product_key_topk(s_first: Tensor, s_second: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """Additive product-key search (PKM, PEER, Memory+): cell (i, j) scores s1[i] + s2[j].

    s_first, s_second: [..., n] half-query scores. Keeps the top_k of each half, scores the
    top_k^2 sums and returns the best top_k: scores [..., k] (descending, with gradients) and
    cells [..., k] as i * n + j. Exact: the best k sums always lie among the k x k candidates.
    """
    n = s_first.shape[-1]
    v1, i1 = s_first.topk(top_k, dim=-1)  # [..., k]
    v2, i2 = s_second.topk(top_k, dim=-1)  # [..., k]
    cand = (v1.unsqueeze(-1) + v2.unsqueeze(-2)).flatten(-2)  # [..., k*k]
    scores, pos = cand.topk(top_k, dim=-1)  # [..., k]
    rows = i1.gather(-1, torch.div(pos, top_k, rounding_mode="floor"))
    cols = i2.gather(-1, pos % top_k)
    return scores, rows * n + cols
