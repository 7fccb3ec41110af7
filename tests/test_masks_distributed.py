"""The distributed threshold of ``sparsam._sharded`` in one process: R ranks simulated by
threads whose collectives meet at a barrier, against ``top_positions`` / ``select`` on the whole
scores (the one-process rule: the k largest, ties to the lower flat position)."""

from __future__ import annotations

import threading

import pytest
import torch

from sparsam._sharded import chunk_starts, order_keys, sharded_top
from sparsam.masks.selection import keep_count, top_positions


class _Meeting:
    def __init__(self, world):
        self.world, self.slots, self.barrier = world, [None] * world, threading.Barrier(world)


class ThreadComm:
    """The collectives ``sharded_top`` uses, between threads."""

    def __init__(self, rank, meeting):
        self.rank, self.world, self.meeting, self.calls = rank, meeting.world, meeting, 0

    def all_gather(self, t):
        self.calls += 1
        self.meeting.slots[self.rank] = t.clone()
        self.meeting.barrier.wait()
        out = torch.stack(list(self.meeting.slots))
        self.meeting.barrier.wait()
        return out

    def all_reduce_sum(self, t):
        return self.all_gather(t).sum(0)


def run_ranks(world, fn):
    """``fn(comm)`` on ``world`` threads; their results by rank (an exception in any is raised)."""
    meeting, results, errors = _Meeting(world), [None] * world, []

    def body(rank):
        try:
            results[rank] = fn(ThreadComm(rank, meeting))
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)
            meeting.barrier.abort()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    return results


def sharded_vs_reference(segments, groups, ks, world, *, largest=True):
    """Each segment cut in ``torch.chunk`` order over ``world`` ranks; the joined per-rank keeps
    against ``top_positions`` over each group's segments in order. Returns the comm call counts."""

    def rank_part(seg, rank):
        parts = seg.chunk(world)
        return parts[rank] if rank < len(parts) else seg[:0]

    def fn(comm):
        keeps = sharded_top([rank_part(s, comm.rank) for s in segments], groups, ks, comm, largest=largest)
        return keeps, comm.calls

    out = run_ranks(world, fn)
    for g, k in enumerate(ks):
        members = [i for i, gi in enumerate(groups) if gi == g]
        flat = torch.cat([segments[i] for i in members])
        ref = top_positions(flat, k, largest=largest)
        # and a plain reference: a stable sort on (value, position), the first k
        vals = flat.double().tolist()
        order = sorted(range(len(vals)), key=lambda j: (-vals[j] if largest else vals[j], j))[:k]
        plain = torch.zeros(len(vals), dtype=torch.bool)
        plain[order] = True
        assert torch.equal(ref, plain)
        got = torch.cat([torch.cat([out[r][0][i] for r in range(world)]) for i in members])
        assert torch.equal(got, ref), (g, k)
        assert int(got.sum()) == k
    return [calls for _, calls in out]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_order_keys_sort_like_the_values(dtype):
    g = torch.Generator().manual_seed(0)
    v = torch.randn(500, generator=g, dtype=torch.float64).to(dtype) * 1e3
    v = torch.cat([v, torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-40, -1e-40], dtype=dtype)])
    for wide in (False, True):
        for largest in (True, False):
            k = order_keys(v, wide=wide, largest=largest)
            sv = v.double() if largest else -v.double()
            i, j = torch.meshgrid(torch.arange(v.numel()), torch.arange(v.numel()), indexing="ij")
            assert torch.equal(k[i] < k[j], sv[i] < sv[j])
            assert torch.equal(k[i] == k[j], sv[i] == sv[j])  # -0.0 == +0.0, as in ==


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("largest", [True, False])
def test_random_scores_global_and_per_group(world, largest):
    g = torch.Generator().manual_seed(world)
    segs = [torch.randn(n, generator=g) for n in (13, 1, 40, 7, 0, 22)]
    total = sum(s.numel() for s in segs)
    for k in (0, 1, 17, keep_count(total, 0.5), total - 1, total):
        calls = sharded_vs_reference(segs, [0] * len(segs), [k], world, largest=largest)
        assert max(calls) <= 2 + 32  # float32 keys: at most 32 bisection rounds
    sharded_vs_reference(segs, [0, 1, 1, 0, 2, 2], [5, 20, 11], world, largest=largest)


@pytest.mark.parametrize("world", [2, 3])
def test_ties_go_to_the_lower_global_position(world):
    # integer-valued scores: every threshold is a long run of ties spread over segments and ranks
    g = torch.Generator().manual_seed(1)
    segs = [torch.randint(0, 3, (n,), generator=g).float() for n in (9, 10, 5, 12)]
    segs.append(torch.zeros(8))  # all tied
    total = sum(s.numel() for s in segs)
    for k in range(0, total + 1, 3):
        sharded_vs_reference(segs, [0] * len(segs), [k], world)
    sharded_vs_reference(segs, [0, 0, 1, 1, 1], [7, 13], world, largest=False)


def test_float64_and_integer_scores_compare_as_float64():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(30, generator=g, dtype=torch.float64)
    close = [base, base + 1e-12]  # equal as float32, distinct as float64
    sharded_vs_reference(close, [0, 0], [30], 2)
    ints = [torch.randint(-5, 5, (17,), generator=g), torch.randint(-5, 5, (9,), generator=g)]
    sharded_vs_reference(ints, [0, 0], [11], 3)


def test_k_out_of_range_is_refused_on_every_rank():
    with pytest.raises(ValueError, match=r"k must be in \[0, 6\]"):
        run_ranks(2, lambda comm: sharded_top([torch.ones(3)], [0], [7], comm))


def test_chunk_starts_follow_torch_chunk():
    for length in (0, 1, 5, 7, 8, 9):
        for world in (1, 2, 3, 4):
            parts = torch.arange(length).chunk(world) if length else ()
            starts = [int(p[0]) if p.numel() else length for p in parts]
            starts += [length] * (world - len(starts))
            assert chunk_starts(length, world) == starts, (length, world)


def test_row_means_of_a_shard_are_those_of_the_whole_tensor():
    # channel-structured selection under FSDP2 takes each rank's row means of its own rows: they
    # must be the numbers one process computes on the whole tensor, bit for bit
    from sparsam.masks.selection import _unit_means

    g = torch.Generator().manual_seed(3)
    for shape in ((37, 515), (9, 64, 3, 3), (1000,)):
        t = torch.randn(*shape, generator=g)
        whole = _unit_means(t, "channel")
        parts = torch.cat([_unit_means(p, "channel") for p in t.chunk(3)])
        assert torch.equal(parts, whole), shape


@pytest.mark.parametrize("world", [4, 6])
def test_more_ranks_than_rows(world):
    # ranks past a segment's last chunk hold nothing of it (torch.chunk of 3 rows over 4 or 6 ranks)
    g = torch.Generator().manual_seed(4)
    segs = [torch.randn(n, generator=g) for n in (3, 1, 2, 0, 5)]
    total = sum(s.numel() for s in segs)
    for k in range(total + 1):
        sharded_vs_reference(segs, [0] * len(segs), [k], world)
    sharded_vs_reference(segs, [0, 1, 1, 2, 0], [4, 1, 0], world)
    sharded_vs_reference(segs, [0, 1, 1, 2, 0], [8, 3, 0], world, largest=False)


@pytest.mark.parametrize("world", [1, 3])
def test_all_equal_scores_keep_the_first_k_positions(world):
    for value in (0.0, -0.0, 2.5, -7.0, float("inf"), -float("inf")):
        segs = [torch.full((n,), value) for n in (4, 7, 1)]
        for k in (0, 1, 5, 11, 12):
            sharded_vs_reference(segs, [0, 0, 0], [k], world)
            sharded_vs_reference(segs, [0, 0, 0], [k], world, largest=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_extreme_values_and_low_precision_scores(dtype):
    # ±inf, ±0, the smallest subnormals, the largest finite numbers and negative scores, in the
    # scores' own dtype: the same keep masks as one process on the whole scores
    fi = torch.finfo(dtype)
    special = torch.tensor(
        [float("inf"), -float("inf"), 0.0, -0.0, fi.tiny, -fi.tiny, fi.max, -fi.max, fi.smallest_normal / 4, 1.0],
        dtype=dtype,
    )
    g = torch.Generator().manual_seed(5)
    noise = (torch.randn(40, generator=g, dtype=torch.float64) * 3).to(dtype)  # many ties in 16-bit
    segs = [torch.cat([special[:5], noise[:20]]), special[5:], -noise[20:].abs()]
    total = sum(s.numel() for s in segs)
    for world in (2, 3):
        for k in (1, 3, 10, 25, total - 2, total):
            sharded_vs_reference(segs, [0, 0, 0], [k], world)
            sharded_vs_reference(segs, [0, 0, 0], [k], world, largest=False)
