"""Which sequence-parallel degrees a model allows (torch-free: the launcher imports it).

Ulysses (Jacobs et al. 2023, "DeepSpeed Ulysses") gives each of the sp ranks of a group
seq_len / sp tokens, and inside attention all seq_len tokens of heads / sp query heads. So:

- sp must divide num_attention_heads (each rank gets whole query heads);
- sp must divide seq_len (each rank gets the same number of tokens: the all-to-all has equal
  pieces, and every rank's mean loss weighs the same number of tokens);
- key/value heads k: either sp divides k (each rank gets k / sp of them, exactly the ones its
  query heads read), or k divides sp (each kv head is replicated sp / k times before the
  all-to-all, so rank j receives kv head j // (sp / k), the one its query heads read). Any other
  pair would need a rank to receive a fractional set of kv heads.

`kv_heads_per_rank` is what attention sees on one rank after the all-to-all; `placement_reason`
says which degrees group the ranks of the hosts.
"""

from __future__ import annotations

__all__ = ["sp_reason", "placement_reason", "kv_replicas", "kv_heads_per_rank"]


def sp_reason(sp: int, *, heads: int, kv_heads: int, seq_len: int) -> str | None:
    """Why `sp` cannot split this model's attention and sequence, or None. Messages carry numbers."""
    if sp < 1:
        return f"sequence_parallel must be >= 1, got {sp}"
    if heads % sp:
        return (f"sequence_parallel ({sp}) must divide num_attention_heads ({heads}): each rank "
                f"attends with heads / sp whole heads")
    if kv_heads % sp and sp % kv_heads:
        return (f"sequence_parallel ({sp}) and num_key_value_heads ({kv_heads}) must divide one "
                f"another: kv heads are split over the ranks, or replicated when fewer than sp")
    if seq_len % sp:
        return (f"sequence_parallel ({sp}) must divide seq_len ({seq_len}): each rank holds "
                f"seq_len / sp tokens")
    return None


def placement_reason(sp: int, *, world_size: int | None, ranks_per_host: int | None) -> str | None:
    """Why `sp` cannot group these ranks, or None. SP groups are consecutive ranks (long/groups.py)
    and ranks fill hosts in order, so a group must be part of one host or whole hosts: sp and
    the ranks of a host divide one another. A group over several hosts runs its all-to-alls over
    the network (the planner costs that link and picks such a group only when it pays, as long
    context runs do: ALST trains with SP groups of 32 over 4 nodes of 8 GPUs)."""
    if world_size is not None and world_size % sp:
        return f"sequence_parallel ({sp}) must divide the number of ranks ({world_size})"
    if ranks_per_host is not None and ranks_per_host % sp and sp % ranks_per_host:
        return (f"sequence_parallel ({sp}) and the ranks of one host ({ranks_per_host}) must divide one "
                f"another: an SP group is part of one host or whole hosts")
    return None


def kv_replicas(sp: int, kv_heads: int) -> int:
    """How many copies of each kv head are made before the all-to-all (1 when sp divides k)."""
    return sp // kv_heads if kv_heads < sp else 1


def kv_heads_per_rank(sp: int, kv_heads: int) -> int:
    """kv heads attention holds on one rank after the all-to-all: k / sp, or 1 when k < sp."""
    return max(1, kv_heads // sp)
